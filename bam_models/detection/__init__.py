""" Zoo (and plain timm) models in detection: torchvision detectors on a timm trunk with an FPN (`backbones`)
and their COCO fine-tuning (`train`, what `bam-models detect-train` runs). """
from bam_models.detection.backbones import (
    TimmFpnBackbone, backbone_with_fpn, fasterrcnn_fpn, maskrcnn_fpn, retinanet_fpn)

__all__ = ['TimmFpnBackbone', 'backbone_with_fpn', 'fasterrcnn_fpn', 'retinanet_fpn', 'maskrcnn_fpn']

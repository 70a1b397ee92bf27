""" bam_models: BAM and CBAM attention-augmented CNN backbones for timm.

`import bam_models` registers every zoo model with timm (`timm.list_models('*_bam')`, `'*_cbam'`).
"""
from .layers import BAM, CBAM
from .models import AttentionResNet, BamMobileNetV1, list_zoo_models
from .insert import insert_bam, insert_cbam

__version__ = '0.1.0'

""" Zoo (and plain timm) models as torchvision detection backbones with a Feature Pyramid Network.

The trunk is `timm.create_model(name, features_only=True, out_indices=...)`. BAM lives inside the stage it
refines (`layer1.bam`, `blocks.1.bam`) and CBAM inside every block, so every returned feature map is the
attention-refined one. Stages are counted as in torchvision's `resnet_fpn_backbone`: stage 1 is the first
feature after the stride-2 stem (stride 4 in an undilated network), stage 4 the last; trainable stage counts
follow its `trainable_layers` (5 also trains the stem).
"""
from collections import OrderedDict
from typing import Any, Dict, List, Optional, Sequence

import timm
import torch
import torch.nn as nn
from timm.layers import freeze_batch_norm_2d
from torchvision.models.detection import FasterRCNN, MaskRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.ops import FeaturePyramidNetwork, MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock, LastLevelMaxPool, LastLevelP6P7

__all__ = ['TimmFpnBackbone', 'backbone_with_fpn', 'fasterrcnn_fpn', 'retinanet_fpn', 'maskrcnn_fpn']

_NORMS = ('frozen', 'batchnorm')
NUM_STAGES = 4
_BACKBONE_ARGS = ('trainable_stages', 'returned_stages', 'norm', 'extra_blocks', 'out_channels', 'fpn_norm_layer')


def _stage_feature_indices(reductions: Sequence[int]) -> List[int]:
    """Feature-info indices of stages 0 (stem, or -1 when the model reports none) to 4.

    The stem is the last feature at stride <= 2; stages 1-4 are the features after it. Strides are not used
    beyond that because a dilated trunk (output_stride 8/16) repeats them.
    """
    stem = -1
    while stem + 1 < len(reductions) and reductions[stem + 1] <= 2:
        stem += 1
    stages = list(range(stem + 1, len(reductions)))
    if len(stages) != NUM_STAGES:
        raise ValueError(
            f"expected a trunk with {NUM_STAGES} stages after the stem, got feature strides {list(reductions)}; "
            f"backbone_with_fpn supports ResNet/MobileNet-like timm models with stride-4 to stride-32 stages")
    return [stem] + stages


def _module_stage(body: nn.Module, boundaries: Dict[int, str]) -> Dict[str, int]:
    """Stage index of every module of `body`, from the order in which named_modules lists them.

    `boundaries` maps a stage to the module whose output ends it; every module listed after the previous
    boundary's subtree and up to the end of this boundary's subtree belongs to that stage. Names are looked
    up as given ('blocks.1') and flattened as timm's FeatureListNet stores them ('blocks_1').
    """
    names = [name for name, _ in body.named_modules()]
    ends = []
    for stage, module_name in sorted(boundaries.items()):
        for candidate in (module_name, module_name.replace('.', '_')):
            inside = [i for i, name in enumerate(names) if name == candidate or name.startswith(candidate + '.')]
            if inside:
                ends.append((max(inside), stage))
                break
    result = {}
    for i, name in enumerate(names):
        # modules past the last boundary (none in a features_only trunk) count as the last stage
        result[name] = next((stage for end, stage in ends if i <= end), ends[-1][1] if ends else NUM_STAGES)
    return result


class TimmFpnBackbone(nn.Module):
    """A timm features_only trunk followed by torchvision's FeaturePyramidNetwork.

    Returns an OrderedDict of pyramid levels keyed '0', '1', ... (one per returned stage) plus the extra
    blocks' names ('pool' for LastLevelMaxPool, 'p6'/'p7' for LastLevelP6P7), like torchvision's
    BackboneWithFPN, and exposes `out_channels` as detection heads expect.
    """

    def __init__(
            self,
            body: nn.Module,
            in_channels_list: List[int],
            out_channels: int = 256,
            extra_blocks: Optional[ExtraFPNBlock] = None,
            fpn_norm_layer: Optional[Any] = None,
    ) -> None:
        super().__init__()
        self.body = body
        self.fpn = FeaturePyramidNetwork(
            in_channels_list=in_channels_list,
            out_channels=out_channels,
            extra_blocks=LastLevelMaxPool() if extra_blocks is None else extra_blocks,
            norm_layer=fpn_norm_layer,
        )
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        features = self.body(x)
        return self.fpn(OrderedDict((str(i), feature) for i, feature in enumerate(features)))


def backbone_with_fpn(
        name: str,
        pretrained: bool = False,
        trainable_stages: int = 3,
        returned_stages: Sequence[int] = (1, 2, 3, 4),
        norm: str = 'frozen',
        extra_blocks: Optional[ExtraFPNBlock] = None,
        out_channels: int = 256,
        fpn_norm_layer: Optional[Any] = None,
        **model_kwargs: Any,
) -> TimmFpnBackbone:
    """Any zoo model (or plain timm CNN) as a torchvision detection backbone with an FPN.

    Args:
        name: timm model name, e.g. 'resnet50_bam', 'mobilenetv1_100_bam' or 'resnet50'.
        pretrained: load the model's pretrained weights through timm.
        trainable_stages: how many stages, counted from the last, get gradients: 0-4 stages, 5 also the stem
            (torchvision's `trainable_layers`). Attention parameters follow the stage they live in.
        returned_stages: stages (1-4) whose maps feed the FPN.
        norm: 'frozen' turns every BatchNorm2d of the trunk (the attention modules' included) into a
            FrozenBatchNorm2d, as torchvision does for detection; 'batchnorm' keeps trainable BatchNorm.
        extra_blocks: torchvision FPN extra block; LastLevelMaxPool (a 'pool' level) when None.
        out_channels: FPN width.
        fpn_norm_layer: normalisation inside the FPN (torchvision's `norm_layer`), none by default.
        **model_kwargs: passed to timm.create_model (e.g. output_stride, drop_path_rate, bam_args).
    """
    if norm not in _NORMS:
        raise ValueError(f"norm must be one of {_NORMS}, got {norm!r}")
    if not 0 <= trainable_stages <= NUM_STAGES + 1:
        raise ValueError(f"trainable_stages must be 0-{NUM_STAGES + 1} (5 includes the stem), got {trainable_stages}")
    returned_stages = sorted(set(returned_stages))
    if not returned_stages or any(not 1 <= stage <= NUM_STAGES for stage in returned_stages):
        raise ValueError(f"returned_stages must be a non-empty subset of 1-{NUM_STAGES}, got {returned_stages}")

    # the stage layout comes from a weightless probe on the meta device; the real trunk then stops at the
    # last returned stage, so unused deeper stages are neither built nor run
    with torch.device('meta'):
        probe = timm.create_model(name, features_only=True, **model_kwargs)
    stage_index = _stage_feature_indices(probe.feature_info.reduction())
    module_names = [info['module'] for info in probe.feature_info.info]
    body = timm.create_model(
        name, pretrained=pretrained, features_only=True,
        out_indices=tuple(stage_index[stage] for stage in returned_stages), **model_kwargs)

    boundaries = {stage: module_names[index] for stage, index in enumerate(stage_index) if index >= 0}
    module_stage = _module_stage(body, boundaries)
    first_trainable = NUM_STAGES + 1 - trainable_stages
    for module_name, module in body.named_modules():
        for param in module.parameters(recurse=False):
            param.requires_grad_(module_stage[module_name] >= first_trainable)
    if norm == 'frozen':
        body = freeze_batch_norm_2d(body)

    return TimmFpnBackbone(
        body, body.feature_info.channels(), out_channels=out_channels, extra_blocks=extra_blocks,
        fpn_norm_layer=fpn_norm_layer)


def _level_names(backbone: TimmFpnBackbone) -> List[str]:
    return [str(i) for i in range(len(backbone.fpn.inner_blocks))]


def _num_levels(backbone: TimmFpnBackbone) -> int:
    extra = backbone.fpn.extra_blocks
    num_extra = 2 if isinstance(extra, LastLevelP6P7) else 1 if isinstance(extra, LastLevelMaxPool) else 0
    return len(backbone.fpn.inner_blocks) + num_extra


def _split_backbone_kwargs(kwargs: Dict[str, Any], **defaults: Any) -> Dict[str, Any]:
    """Pop backbone_with_fpn's own arguments out of a builder's kwargs, which then go to torchvision."""
    backbone_kwargs = dict(defaults)
    backbone_kwargs.update({key: kwargs.pop(key) for key in _BACKBONE_ARGS if key in kwargs})
    backbone_kwargs['pretrained'] = kwargs.pop('pretrained_backbone', False)
    backbone_kwargs.update(kwargs.pop('backbone_kwargs', None) or {})
    return backbone_kwargs


def _image_stats(backbone: TimmFpnBackbone, kwargs: Dict[str, Any]) -> None:
    """Normalise images with the backbone's own pretrained mean/std unless the caller chose others."""
    cfg = getattr(backbone.body, 'pretrained_cfg', None) or {}
    if 'mean' in cfg:
        kwargs.setdefault('image_mean', list(cfg['mean']))
        kwargs.setdefault('image_std', list(cfg['std']))


def _rcnn_defaults(backbone: TimmFpnBackbone, kwargs: Dict[str, Any], mask: bool = False) -> None:
    """Anchor and RoI-pool settings matching the number of pyramid levels when it differs from torchvision's 5."""
    num_levels = _num_levels(backbone)
    if num_levels != 5 and 'rpn_anchor_generator' not in kwargs:
        sizes = tuple((32 * 2 ** i,) for i in range(num_levels))
        kwargs['rpn_anchor_generator'] = AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * num_levels)
    names = _level_names(backbone)
    if names != ['0', '1', '2', '3']:
        kwargs.setdefault('box_roi_pool', MultiScaleRoIAlign(names, output_size=7, sampling_ratio=2))
        if mask:
            kwargs.setdefault('mask_roi_pool', MultiScaleRoIAlign(names, output_size=14, sampling_ratio=2))


def fasterrcnn_fpn(backbone: str = 'resnet50_bam', num_classes: int = 91, **kwargs: Any) -> FasterRCNN:
    """torchvision's Faster R-CNN on `backbone_with_fpn(backbone)`.

    Keyword arguments of backbone_with_fpn (trainable_stages, returned_stages, norm, extra_blocks,
    out_channels, fpn_norm_layer, `pretrained_backbone`, and `backbone_kwargs` for timm.create_model) go to
    the backbone; every other one (min_size, max_size, rpn_anchor_generator, box_score_thresh, ...) to
    torchvision's FasterRCNN.
    """
    fpn = backbone_with_fpn(backbone, **_split_backbone_kwargs(kwargs))
    _image_stats(fpn, kwargs)
    _rcnn_defaults(fpn, kwargs)
    return FasterRCNN(fpn, num_classes=num_classes, **kwargs)


def maskrcnn_fpn(backbone: str = 'resnet50_bam', num_classes: int = 91, **kwargs: Any) -> MaskRCNN:
    """torchvision's Mask R-CNN on `backbone_with_fpn(backbone)`; arguments as for `fasterrcnn_fpn`."""
    fpn = backbone_with_fpn(backbone, **_split_backbone_kwargs(kwargs))
    _image_stats(fpn, kwargs)
    _rcnn_defaults(fpn, kwargs, mask=True)
    return MaskRCNN(fpn, num_classes=num_classes, **kwargs)


def retinanet_fpn(backbone: str = 'resnet50_bam', num_classes: int = 91, **kwargs: Any) -> RetinaNet:
    """torchvision's RetinaNet on `backbone_with_fpn(backbone)`: stages 2-4 and P6/P7 from P5, as torchvision's
    retinanet_resnet50_fpn; arguments as for `fasterrcnn_fpn`."""
    out_channels = kwargs.get('out_channels', 256)
    fpn = backbone_with_fpn(backbone, **_split_backbone_kwargs(
        kwargs, returned_stages=(2, 3, 4), extra_blocks=LastLevelP6P7(out_channels, out_channels)))
    _image_stats(fpn, kwargs)
    num_levels = _num_levels(fpn)
    if num_levels != 5 and 'anchor_generator' not in kwargs:
        sizes = tuple(tuple(int(s * 2 ** (i / 3)) for i in range(3)) for s in (32 * 2 ** j for j in range(num_levels)))
        kwargs['anchor_generator'] = AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * num_levels)
    return RetinaNet(fpn, num_classes=num_classes, **kwargs)

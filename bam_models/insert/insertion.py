""" Add BAM or CBAM to a CNN you already have (timm or torchvision), in place.

`insert_bam` puts one BAM at the end of every stage followed by a downsampling, configured as the zoo's
(both by `bam_models.layers.placement`; `bam_models.insert._stages` finds the stages), inside the stage module,
so every trunk parameter keeps its name, a plain checkpoint loads with exactly the BAM keys missing, and
`features_only`, `forward_intermediates` and detection backbones see the refined maps. `insert_cbam` fills
every block's attention slot (`bam_models.insert._slots`) with placement's `cbam_layer`.

For ResNets and MobileNetV1 the result is the zoo's architecture: `insert_bam(torchvision.models.resnet50())`
has exactly the parameters (names and shapes) of `resnet50_bam`, and `insert_bam(timm.create_model('resnet50',
output_stride=8))` exactly the modules of `resnet50_bam` at output_stride 8; likewise `insert_cbam` and
`resnet50_cbam`.
"""
from typing import Any, Dict, Optional

import torch.nn as nn

from bam_models.layers import BAM, CBAM, cbam_layer, stage_bam
from ._slots import NO_SLOT_HELP, cbam_slots, fill
from ._stages import attach_after, bam_stages

__all__ = ['insert_bam', 'insert_cbam']


def _model_name(model: nn.Module) -> str:
    return f"{type(model).__module__}.{type(model).__name__}"


def _factory_kwargs(model: nn.Module) -> Dict[str, Any]:
    param = next(model.parameters())
    return {'device': param.device, 'dtype': param.dtype}


def insert_bam(model: nn.Module, bam_args: Optional[Dict[str, Any]] = None) -> nn.Module:
    """Insert one BAM at the end of every stage that is followed by a downsampling; returns the same model.

    Works for timm CNNs that describe their stages in `feature_info` (also their features_only wrappers) and for
    torchvision's ResNet, ConvNeXt, EfficientNet (v1/v2), RegNet, MobileNetV2/V3 and DenseNet families. Channels
    are read from the model. `bam_args` go to every BAM (e.g. dict(fusion='sum')). The new modules follow the
    model's device (the meta device too), dtype and train/eval mode. Raises ValueError if the model has BAM
    already and TypeError if no stage qualifies.
    """
    if any(isinstance(m, BAM) for m in model.modules()):
        raise ValueError("insert_bam: the model already has BAM modules; insert them only once.")
    stages = bam_stages(model)
    if not stages:
        raise TypeError(
            f"insert_bam does not support {_model_name(model)}: it has no stage of blocks followed by a "
            f"downsampling. Supported: timm CNNs with feature_info and torchvision's ResNet, ConvNeXt, EfficientNet, "
            f"RegNet, MobileNetV2/V3 and DenseNet families; place bam_models.BAM by hand elsewhere.")
    dd = _factory_kwargs(model)
    for stage in stages:
        attach_after(stage, stage_bam(stage.module, stage.channels, bam_args, **dd).train(model.training))
    return model


def insert_cbam(
        model: nn.Module,
        cbam_args: Optional[Dict[str, Any]] = None,
        replace_existing: bool = False,
) -> nn.Module:
    """Insert CBAM into every block's attention slot (timm's `se`, torchvision's SE module); returns the model.

    In ResNet blocks the slot is after the last BN, before the residual add: the zoo's `*_cbam` placement.
    A slot that holds an SE-style module already is refused unless `replace_existing=True`, which replaces it.
    Raises ValueError for a second insertion and TypeError for a model whose blocks have no attention slot.
    """
    slots = cbam_slots(model)
    if not slots:
        raise TypeError(f"insert_cbam does not support {_model_name(model)}: none of its blocks has an attention "
                        f"slot. {NO_SLOT_HELP}.")
    if any(isinstance(slot.existing, CBAM) for slot in slots):
        raise ValueError(
            "insert_cbam: the model's blocks already have an attention module (CBAM); insert it only once.")
    occupied = [slot for slot in slots if slot.existing is not None]
    if occupied and not replace_existing:
        raise ValueError(
            f"insert_cbam: the model's blocks already have an attention module ({type(occupied[0].existing).__name__}"
            f" in {len(occupied)} of {len(slots)} slots); pass replace_existing=True to replace them with CBAM.")
    make_cbam = cbam_layer(cbam_args)
    dd = _factory_kwargs(model)
    for slot in slots:
        fill(slot, make_cbam(slot.channels, **dd).train(model.training))
    return model

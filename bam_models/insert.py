""" Add BAM or CBAM to an existing torchvision or timm model, in place.

`insert_bam(torchvision.models.resnet50())` gives exactly the parameters (names and shapes) of
`resnet50_bam`, so the two exchange state dicts; likewise `insert_cbam` and `resnet50_cbam`.
"""
from typing import Any, Dict, Optional

import torch
import torch.nn as nn
import torchvision.models.resnet as tv_resnet
from timm.models.efficientnet import EfficientNet
from timm.models._efficientnet_blocks import DepthwiseSeparableConv
from timm.models.resnet import ResNet as TimmResNet

from bam_models.layers import BAM, CBAM
from bam_models.models.bam_mobilenetv1 import BAM_STAGES as MOBILENETV1_BAM_STAGES
from bam_models.models.attention_resnet import BAM_STAGES as RESNET_BAM_STAGES

__all__ = ['insert_bam', 'insert_cbam']

_SUPPORTED = (
    "torchvision ResNet/WideResNet/ResNeXt (torchvision.models.resnet50(), ...), timm ResNet-family models "
    "(timm.create_model('resnet50'), ...) and, for BAM, timm's MobileNetV1 (timm.create_model('mobilenetv1_100'))"
)


def _factory_kwargs(model: nn.Module) -> Dict[str, Any]:
    param = next(model.parameters())
    return {'device': param.device, 'dtype': param.dtype}


def _block_out_channels(block: nn.Module) -> int:
    last_conv = block.conv3 if hasattr(block, 'conv3') else block.conv2
    return last_conv.out_channels


def _is_resnet(model: nn.Module) -> bool:
    return isinstance(model, (TimmResNet, tv_resnet.ResNet))


def _is_mobilenetv1(model: nn.Module) -> bool:
    return (
        isinstance(model, EfficientNet)
        and len(model.blocks) == 5
        and all(isinstance(block, DepthwiseSeparableConv) for stage in model.blocks for block in stage)
    )


def _unsupported(model: nn.Module, what: str) -> TypeError:
    return TypeError(f"{what} does not support {type(model).__module__}.{type(model).__name__}; supported: {_SUPPORTED}.")


def insert_bam(model: nn.Module, bam_args: Optional[Dict[str, Any]] = None) -> nn.Module:
    """Insert BAM where the zoo puts it (after ResNet layer1-3; MobileNetV1 before each stride-2 stage).

    The new modules are initialised as in the zoo and follow the model's device, dtype and train/eval mode.
    Returns the same model object.
    """
    if _is_resnet(model):
        stages = [getattr(model, f'layer{i}') for i in RESNET_BAM_STAGES]
    elif _is_mobilenetv1(model):
        stages = [model.blocks[i] for i in MOBILENETV1_BAM_STAGES]
    else:
        raise _unsupported(model, 'insert_bam')
    if any(hasattr(stage, 'bam') for stage in stages):
        raise ValueError("insert_bam: the model already has BAM modules; insert them only once.")
    if _is_resnet(model):
        channels = [_block_out_channels(stage[-1]) for stage in stages]
    else:
        channels = [model.feature_info[i]['num_chs'] for i in MOBILENETV1_BAM_STAGES]
    dd = _factory_kwargs(model)
    # a stage's last block feeds only BAM, so in inference BAM may overwrite that block's output
    bam_args = {'inplace': True, **(bam_args or {})}
    for stage, num_chs in zip(stages, channels):
        stage.add_module('bam', BAM(num_chs, **bam_args, **dd).train(model.training))
    return model


class _TorchvisionBasicBlockCbam(tv_resnet.BasicBlock):
    """torchvision's BasicBlock with an attention module `se` before the residual add, as in timm's block."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.se(self.bn2(self.conv2(out)))
        return self.relu(out + shortcut)


class _TorchvisionBottleneckCbam(tv_resnet.Bottleneck):
    """torchvision's Bottleneck with an attention module `se` before the residual add, as in timm's block."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.se(self.bn3(self.conv3(out)))
        return self.relu(out + shortcut)


_TORCHVISION_CBAM_BLOCKS = {
    tv_resnet.BasicBlock: _TorchvisionBasicBlockCbam,
    tv_resnet.Bottleneck: _TorchvisionBottleneckCbam,
}


def insert_cbam(model: nn.Module, cbam_args: Optional[Dict[str, Any]] = None) -> nn.Module:
    """Insert CBAM into every residual block, after the last BN and before the residual add (block.se).

    Returns the same model object; its parameters match the zoo's `*_cbam` model of the same depth.
    """
    if _is_mobilenetv1(model):
        raise TypeError("insert_cbam: CBAM is defined for residual blocks and MobileNetV1 has none; use insert_bam.")
    if not _is_resnet(model):
        raise _unsupported(model, 'insert_cbam')
    blocks = [block for i in range(1, 5) for name, block in getattr(model, f'layer{i}').named_children()
              if name != 'bam']
    if any(getattr(block, 'se', None) is not None for block in blocks):
        raise ValueError("insert_cbam: the model's blocks already have an attention module (block.se).")
    dd = _factory_kwargs(model)
    # a block's last BN output feeds only its CBAM, so in inference CBAM may overwrite it
    cbam_args = {'inplace': True, **(cbam_args or {})}
    for block in blocks:
        cbam = CBAM(_block_out_channels(block), **cbam_args, **dd).train(model.training)
        if type(block) in _TORCHVISION_CBAM_BLOCKS:
            # swap in a subclass whose forward calls the attention; parameters and buffers stay as they are
            block.__class__ = _TORCHVISION_CBAM_BLOCKS[type(block)]
        elif not hasattr(block, 'se'):
            raise _unsupported(model, f'insert_cbam (block type {type(block).__name__})')
        block.se = cbam
    return model

""" Where CBAM goes in a CNN: the attention slot of every block that has one.

CBAM refines a block's residual branch where the block applies channel attention, which timm writes as the
block's `se` slot (an SE module, `nn.Identity()` when the model has none, or None in the ResNet family), and
torchvision as the block's `SqueezeExcitation` module (MobileNetV3, EfficientNet, RegNetY). torchvision's
ResNet blocks get timm's slot (before the residual add) through a subclass whose forward calls it.
"""
from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.nn as nn
import torchvision.models.resnet as tv_resnet
from timm.models.resnet import BasicBlock as TimmBasicBlock, Bottleneck as TimmBottleneck
from torchvision.ops.misc import SqueezeExcitation

from bam_models.models.attention_resnet import CBAM_BLOCKS, AttentionAfterNorm

__all__ = ['Slot', 'cbam_slots', 'fill', 'NO_SLOT_HELP']

NO_SLOT_HELP = (
    "CBAM goes into a block's attention slot: timm's `se` slot (ResNet family, EfficientNet, MobileNetV1-V3, "
    "RegNet, GhostNet, ...), torchvision's ResNet blocks, or the SqueezeExcitation modules of torchvision's "
    "MobileNetV3 / EfficientNet / RegNetY (replace_existing=True). ConvNeXt, DenseNet, VGG, torchvision's "
    "MobileNetV2 and EfficientNetV2's fused blocks have no such slot (their blocks apply no channel attention, so "
    "no position is defined); use insert_bam for those"
)


@dataclass
class Slot:
    """The attention position `parent.<name>` of one block, on `channels` channels."""
    parent: nn.Module
    name: str
    channels: int
    existing: Optional[nn.Module]  # the module there now; None for an empty slot


def _block_out_channels(block: nn.Module) -> int:
    last_conv = block.conv3 if hasattr(block, 'conv3') else block.conv2
    return last_conv.out_channels


def _width_before(block: nn.Module, slot: str) -> Optional[int]:
    """Channels at the slot: those of the last BatchNorm the block registers before it."""
    width = None
    for name, child in block.named_children():
        if name == slot:
            break
        width = next((m.num_features for m in reversed(list(child.modules())) if isinstance(m, nn.BatchNorm2d)), width)
    return width


def _occupant(module: Optional[nn.Module]) -> Optional[nn.Module]:
    return None if module is None or isinstance(module, nn.Identity) else module


def _block_slot(block: nn.Module) -> Optional[Slot]:
    if isinstance(block, (tv_resnet.BasicBlock, tv_resnet.Bottleneck, TimmBasicBlock, TimmBottleneck)):
        return Slot(block, 'se', _block_out_channels(block), _occupant(getattr(block, 'se', None)))
    if 'se' in block._modules:
        existing = _occupant(block.se)
        # an SE module reads exactly the slot's channels; an empty slot has those of the norm before it
        width = next((m.in_channels for m in existing.modules() if isinstance(m, nn.Conv2d)), None) \
            if existing is not None else None
        width = width or _width_before(block, 'se')
        if width is None:
            raise TypeError(f"insert_cbam: cannot tell the channels at the attention slot of "
                            f"{type(block).__name__}; insert CBAM by hand (block.se = bam_models.CBAM(channels)).")
        return Slot(block, 'se', width, existing)
    return None


def cbam_slots(model: nn.Module) -> List[Slot]:
    """Every attention slot of `model`, in module order."""
    slots = []
    for module in model.modules():
        slot = _block_slot(module)
        if slot is not None:
            slots.append(slot)
            continue
        for name, child in module.named_children():
            if isinstance(child, SqueezeExcitation):
                slots.append(Slot(module, name, child.fc1.in_channels, child))
    return slots


class _TorchvisionBasicBlockCbam(AttentionAfterNorm, tv_resnet.BasicBlock):
    """torchvision's BasicBlock with an attention module `se` before the residual add, as in timm's block."""
    last_norm = 'bn2'

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.conv2(self.relu(self.bn1(self.conv1(x))))
        out = self.se(self.bn2(out)) if torch.jit.is_scripting() else self._norm_attention(out)
        return self.relu(out + shortcut)


class _TorchvisionBottleneckCbam(AttentionAfterNorm, tv_resnet.Bottleneck):
    """torchvision's Bottleneck with an attention module `se` before the residual add, as in timm's block."""
    last_norm = 'bn3'

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.conv3(self.relu(self.bn2(self.conv2(out))))
        out = self.se(self.bn3(out)) if torch.jit.is_scripting() else self._norm_attention(out)
        return self.relu(out + shortcut)


# blocks whose forward changes with CBAM in their slot (parameters and buffers stay as they are): torchvision's
# get the slot itself, timm's the CBAM that applies the BN before it
_CBAM_BLOCKS = {
    tv_resnet.BasicBlock: _TorchvisionBasicBlockCbam,
    tv_resnet.Bottleneck: _TorchvisionBottleneckCbam,
    **CBAM_BLOCKS,
}


def fill(slot: Slot, attention: nn.Module) -> None:
    """Put `attention` into the slot; a ResNet block first gets the subclass whose forward calls it as the zoo's
    blocks do."""
    if type(slot.parent) in _CBAM_BLOCKS:
        slot.parent.__class__ = _CBAM_BLOCKS[type(slot.parent)]
    setattr(slot.parent, slot.name, attention)

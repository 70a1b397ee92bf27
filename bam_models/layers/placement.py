""" Where BAM and CBAM go, and how each one is configured: the one rule every zoo model and insert_bam /
insert_cbam follow.

- BAM refines the output of every stage that is followed by a downsampling (the papers' "bottleneck" of the
  network): layer1-3 of a ResNet, blocks.0-3 of MobileNetV1. A stage dilated by output_stride < 32 still counts
  as downsampling: the dilation replaces the stride, so the *natural* reduction (reduction x dilation) decides,
  and the BAM on a dilated stage's output widens its spatial gate's dilation by the same factor.
- CBAM sits in every block's attention slot (after the last norm of the residual branch, before the add).
- Both may overwrite their input in inference (nothing else reads it), and a BAM after a timm ResNet block
  applies that block's closing ReLU itself (`hand_final_relu_over`).
- `attention_keys` says which state-dict entries are attention: those of BAM / CBAM modules.
"""
from functools import partial
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from timm.models.resnet import BasicBlock, Bottleneck

from .bam import BAM
from .cbam import CBAM

__all__ = [
    'BAM_DILATION', 'attention_keys', 'bam_stage_indices', 'cbam_layer', 'hand_final_relu_over',
    'stage_bam', 'stage_dilation',
]

BAM_DILATION = 4  # BAM's spatial-gate dilation at the stride it was designed for (the paper's)


def bam_stage_indices(natural_reductions: Sequence[int]) -> Tuple[int, ...]:
    """Indices of the stages that get a BAM: those whose successor has a larger natural reduction.

    `natural_reductions[i]` is stage i's reduction times its dilation, the reduction it would have without
    output_stride, so a dilated network gets the BAMs (and the state-dict keys) of the undilated one.
    """
    return tuple(i for i, (here, after) in enumerate(zip(natural_reductions, natural_reductions[1:])) if after > here)


def stage_dilation(stage: nn.Module) -> int:
    """How much a stage is dilated: the largest dilation of its (non-attention) spatial convolutions, 1 if none."""
    attention = {id(m) for a in stage.modules() if isinstance(a, (BAM, CBAM)) for m in a.modules()}
    dilations = [
        max(m.dilation) for m in stage.modules()
        if isinstance(m, nn.Conv2d) and id(m) not in attention and max(m.kernel_size) > 1]
    return max(dilations, default=1)


def hand_final_relu_over(block: nn.Module) -> bool:
    """Make a timm ResNet block's closing ReLU an identity, for the BAM after it to apply (True); False for any
    other block, or one that closes with another activation (torchvision's blocks reuse one ReLU module
    inside, so it cannot be handed over).

    The output of that ReLU is BAM's input; apart from BAM only the ReLU's backward would keep it. BAM applying
    the ReLU itself keeps only its own output, which the next stage keeps anyway: the BAM network's training
    memory stays that of the plain trunk plus BAM's small branches. Parameters and outputs do not change.
    """
    if not isinstance(block, (BasicBlock, Bottleneck)):
        return False
    name = 'act3' if isinstance(block, Bottleneck) else 'act2'
    if type(getattr(block, name, None)) is not nn.ReLU:
        return False
    setattr(block, name, nn.Identity())
    return True


def stage_bam(
        stage: nn.Module,
        channels: int,
        bam_args: Optional[Dict[str, Any]] = None,
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
) -> BAM:
    """The BAM that refines `stage`'s output (`channels` wide), configured by the rule; the caller attaches it.

    - dilation: `bam_args['dilation']` (default BAM_DILATION) times the stage's dilation, so that on a map
      sampled more densely the spatial gate keeps its receptive field in image pixels;
    - in place (BAM is the only reader of the stage's output) unless `bam_args` says otherwise;
    - `input_relu`: unless `bam_args` sets it False, BAM takes over the closing ReLU of the stage's last block
      where that block allows it (see hand_final_relu_over); the block is changed accordingly.
    """
    args = {'inplace': True, **(bam_args or {})}
    args['dilation'] = args.get('dilation', BAM_DILATION) * stage_dilation(stage)
    blocks = [m for m in stage.children() if not isinstance(m, BAM)]
    if args.setdefault('input_relu', True):
        args['input_relu'] = bool(blocks) and hand_final_relu_over(blocks[-1])
    return BAM(channels, **args, device=device, dtype=dtype)


def cbam_layer(cbam_args: Optional[Dict[str, Any]] = None) -> Callable[..., CBAM]:
    """The CBAM for a block's attention slot, as a layer factory `(channels, device=, dtype=)`: in place, since
    the block's last norm output feeds only its CBAM; `cbam_args` (rd_ratio, ...) override."""
    return partial(CBAM, **{'inplace': True, **(cbam_args or {})})


def attention_keys(model: nn.Module) -> List[str]:
    """State-dict keys of every BAM/CBAM module in `model`: what a plain-trunk checkpoint lacks."""
    prefixes = tuple(f'{name}.' for name, module in model.named_modules() if isinstance(module, (BAM, CBAM)))
    return [k for k in model.state_dict() if k.startswith(prefixes)] if prefixes else []

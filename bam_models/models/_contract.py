""" The contract every zoo model class keeps, written once: the input check (FX-safe), the group_matcher rule
for attention, the total stride, and construction on the meta device.

The classes mix `AttentionModelContract` into their timm base (ResNet, EfficientNet) or nn.Module.
"""
import re
from typing import Any, Dict, List, Sequence

import torch
import torch.nn as nn
from timm.layers import calculate_drop_path_rates

from bam_models.layers import attention_keys

__all__ = ['AttentionModelContract', 'check_image_batch', 'stage_drop_path_rates', 'total_stride']

# timm's group ordinal meaning "join the previous group": a stage's BAM joins its stage's last block
MATCH_PREVIOUS_GROUP = 99999


def check_image_batch(x: torch.Tensor, in_chans: int, min_size: int) -> None:
    """Raise a ValueError naming the expected shape unless x is a (B, in_chans, H, W) batch with H, W >= min_size.

    `min_size` is the network's total stride: below it the last stage sees less than one pixel of image and
    its attention and pooling run on padding alone.
    """
    if x.dim() != 4 or x.shape[1] != in_chans:
        raise ValueError(
            f"expected an image batch of shape (B, {in_chans}, H, W), got shape {list(x.shape)}; "
            f"convert the images to {in_chans} channels or create the model with the matching in_chans")
    if x.shape[2] < min_size or x.shape[3] < min_size:
        raise ValueError(
            f"expected H and W of at least {min_size} (the network's total stride), got shape {list(x.shape)}; "
            f"resize the images to {min_size}x{min_size} or larger")


# the raise depends on the input shape, which FX cannot trace; FX patches wrapped names in the globals of the
# module that wraps them, which is why every model calls it through AttentionModelContract.check_input
torch.fx.wrap('check_image_batch')


def total_stride(feature_info: Sequence[Dict[str, Any]]) -> int:
    """The network's total stride (the reduction of its deepest feature map), output_stride included."""
    return max(info['reduction'] for info in feature_info)


def stage_drop_path_rates(drop_path_rate: float, depths: Sequence[int]) -> List[List[float]]:
    """Per-block stochastic-depth rates rising linearly over the whole network, split per stage.

    Computed on the host: under `with torch.device('meta')` a tensor computed here would have no values to read
    (the "Cannot copy out of meta tensor" failure of building on the meta device).
    """
    rates = calculate_drop_path_rates(drop_path_rate, sum(depths))
    starts = [sum(depths[:i]) for i in range(len(depths))]
    return [rates[start:start + depth] for start, depth in zip(starts, depths)]


def _stage_attention_groups(model: nn.Module, stage: str, blocks: str) -> List[Any]:
    """Matchers putting each stage-level attention module (by attention_keys: BAM / CBAM modules that are not
    inside a block) into the group of the last block of the stage that holds it."""
    under_stage = re.compile(stage + blocks + r'\.([^.\d][^.]*)\.')
    paths = {}
    for key in attention_keys(model):
        match = under_stage.match(key)
        if match:
            paths[key[:match.end()]] = tuple(int(g) for g in match.groups()[:-1])
    return [('^' + re.escape(path), (*index, MATCH_PREVIOUS_GROUP)) for path, index in sorted(paths.items())]


class AttentionModelContract:
    """What a zoo model class shares; the class sets `in_chans` and `min_input_size` (its total stride)."""

    def check_input(self, x: torch.Tensor) -> None:
        check_image_batch(x, self.in_chans, self.min_input_size)

    def attention_group_matcher(
            self,
            coarse: bool,
            stem: str,
            stage: str,
            blocks: str = '',
            tail: Sequence[str] = (),
    ) -> Dict[str, Any]:
        """timm's group_matcher dict: `stage` is the regex of a stage capturing its index (r'^layer(\\d+)'),
        `blocks` the path from a stage to its numbered blocks, `tail` groups after the last stage (head norm)."""
        if coarse:
            groups = [(stage, None)]
        else:
            groups = _stage_attention_groups(self, stage, blocks) + [(stage + blocks + r'\.(\d+)', None)]
        return dict(stem=stem, blocks=groups + [(pattern, (MATCH_PREVIOUS_GROUP,)) for pattern in tail])

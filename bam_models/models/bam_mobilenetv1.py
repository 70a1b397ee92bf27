""" BAM and CBAM MobileNetV1 on timm's EfficientNet builder

BAM: one BAM before each of MobileNetV1's four stride-2 stages, i.e. refining the outputs of blocks.0-3 (64, 128,
256 and 512 channels at width 1.0), which reproduces the paper's parameter count (4.32M vs 4.23M). Each BAM
lives inside the stage it refines (`blocks.0.bam`), so trunk keys are timm's `mobilenetv1_*` keys.

CBAM: two CBAMs in each of the 13 depthwise-separable blocks, one after each convolution: one in timm's block
attention slot (`blocks.1.0.se`, between the depthwise and the pointwise convolution, where timm's MobileNets
put SE) and one on the pointwise convolution's BN + activation output (`blocks.1.0.attn_pw`). Only this
placement reproduces the CBAM paper's parameter count (5.07M vs 4.23M; one CBAM per block after either
convolution alone gives 4.59M or 4.72M). Both use the paper's reduction ratio 16 and a ReLU MLP whatever the
trunk's activation; trunk keys are timm's `mobilenetv1_*` keys.
"""
from functools import partial
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from timm.models import checkpoint_seq, generate_default_cfgs, register_model
from timm.models.efficientnet import EfficientNet

from bam_models._compat import (
    DepthwiseSeparableConv, decode_arch_def, resolve_act_layer, resolve_bn_args, round_channels,
)
from bam_models.errors import ConfigError
from bam_models.weights import build_model_with_weights
from bam_models.layers import CBAM, bam_stage_indices, cbam_layer, stage_bam
from bam_models.weights import manifest_default_cfgs
from ._contract import AttentionModelContract, total_stride

__all__ = ['BamMobileNetV1', 'DepthwiseSeparableAttnPw']

# stages 0-3, the stages followed by a downsampling (MobileNetV1's five stages reduce by 2, 4, 8, 16, 32)
BAM_STAGES = bam_stage_indices((2, 4, 8, 16, 32))

_MOBILENETV1_ARCH = [
    ['dsa_r1_k3_s1_c64'],
    ['dsa_r2_k3_s2_c128'],
    ['dsa_r2_k3_s2_c256'],
    ['dsa_r6_k3_s2_c512'],
    ['dsa_r2_k3_s2_c1024'],
]


class DepthwiseSeparableAttnPw(DepthwiseSeparableConv):
    """timm's depthwise-separable block with a second attention module, `attn_pw`, on the pointwise conv's
    BN + activation output (before the skip add, if the block has one); `se` still follows the depthwise conv.

    timm's builder only makes its own block classes, so `from_block` turns a built block into this one in place:
    the same modules under the same names (trunk keys and weights unchanged), plus `attn_pw`.
    """

    @classmethod
    def from_block(cls, block: DepthwiseSeparableConv, attn_pw: nn.Module) -> 'DepthwiseSeparableAttnPw':
        if type(block) is not DepthwiseSeparableConv:
            raise ConfigError(
                f"an attention module after the pointwise conv needs timm's DepthwiseSeparableConv blocks, got "
                f"{type(block).__name__}; build the trunk from 'ds'/'dsa' blocks or leave pw_attn_layer unset")
        block.__class__ = cls
        block.add_module('attn_pw', attn_pw)
        return block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        if self.conv_s2d is not None:
            x = self.conv_s2d(x)
            x = self.bn_s2d(x)
        x = self.conv_dw(x)
        x = self.bn1(x)
        x = self.aa(x)
        x = self.se(x)
        x = self.conv_pw(x)
        x = self.bn2(x)
        # bn2's output is read by nothing else (the shortcut is the block input), so attn_pw may be in place
        x = self.attn_pw(x)
        if self.has_skip:
            x = self.drop_path(x) + shortcut
        return x


class BamMobileNetV1(AttentionModelContract, EfficientNet):
    """timm's EfficientNet (built as MobileNetV1) with BAM at the end of the stages in `bam_stages`; with
    `se_layer` and `pw_attn_layer` (and `bam_stages=()`) it is the CBAM MobileNetV1.

    `pw_attn_layer(channels, device=, dtype=)` builds the attention module put after every block's pointwise
    conv (see DepthwiseSeparableAttnPw).
    """

    def __init__(
            self,
            *args,
            bam_stages: Sequence[int] = BAM_STAGES,
            bam_args: Optional[Dict[str, Any]] = None,
            pw_attn_layer: Optional[Callable[..., nn.Module]] = None,
            **kwargs,
    ):
        super().__init__(*args, **kwargs)
        dd = {'device': kwargs.get('device'), 'dtype': kwargs.get('dtype')}
        if pw_attn_layer is not None:
            for stage in self.blocks:
                for block in stage:
                    DepthwiseSeparableAttnPw.from_block(block, pw_attn_layer(block.conv_pw.out_channels, **dd))
        for stage in bam_stages:
            if not 0 <= stage < len(self.blocks):
                raise ValueError(f"bam_stages entries must be stage indices 0-{len(self.blocks) - 1}, got {stage}.")
            layer = self.blocks[stage]
            layer.add_module('bam', stage_bam(layer, self.feature_info[stage]['num_chs'], bam_args, **dd))
        self.bam_stages = tuple(bam_stages)
        self.min_input_size = total_stride(self.feature_info)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return self.attention_group_matcher(
            coarse, stem=r'^conv_stem|bn1', stage=r'^blocks\.(\d+)', tail=(r'conv_head|bn2',))

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
            extra_blocks: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        self.check_input(x)
        return super().forward_intermediates(
            x, indices, norm=norm, stop_early=stop_early, output_fmt=output_fmt,
            intermediates_only=intermediates_only, extra_blocks=extra_blocks,
        )

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
            extra_blocks: bool = False,
    ) -> List[int]:
        if not extra_blocks:
            return super().prune_intermediate_layers(indices, prune_norm=prune_norm, prune_head=prune_head)
        # with extra_blocks timm sizes the cut by asking the kept stage's last child for its feature_info; that
        # child is BAM here, which keeps the width of the block before it, so timm asks without BAM attached
        stage_bams = [(stage, stage.bam) for stage in self.blocks if 'bam' in stage._modules]
        for stage, _ in stage_bams:
            del stage.bam
        try:
            return super().prune_intermediate_layers(
                indices, prune_norm=prune_norm, prune_head=prune_head, extra_blocks=True)
        finally:
            for stage, bam in stage_bams:
                stage.add_module('bam', bam)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        # timm's body plus the input check; TorchScript cannot compile a super() call here
        self.check_input(x)
        x = self.conv_stem(x)
        x = self.bn1(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(self.blocks, x, flatten=True)
        else:
            x = self.blocks(x)
        x = self.conv_head(x)
        x = self.bn2(x)
        return x


def _cbam_in_block(channels: int, act_layer=None, cbam_args: Optional[Dict[str, Any]] = None, **kwargs) -> CBAM:
    """CBAM (placement's `cbam_layer`) for either of a block's attention positions; the block's activation
    (ReLU6) is not CBAM's, whose MLP uses ReLU. In place is safe at both: nothing else reads bn1's or bn2's
    output."""
    return cbam_layer(cbam_args)(channels, **kwargs)


def _create_mobilenetv1_bam(
        variant: str,
        channel_multiplier: float = 1.0,
        pretrained: bool = False,
        cbam: bool = False,
        **kwargs,
) -> BamMobileNetV1:
    """Same arguments as timm's `_gen_mobilenet_v1` (headless MobileNetV1, ReLU6), built as BamMobileNetV1.

    features_only goes through timm's feature wrappers (not EfficientNetFeatures, which would rebuild the
    trunk without BAM), so every `feature_cls` sees the refined maps.
    """
    if cbam:
        # a CBAM after each convolution of every block (ratio 1/16 of the channels it refines), no BAM
        arch = [[f'{block}_se{1 / 16}' for block in stage] for stage in _MOBILENETV1_ARCH]
        cbam_args = kwargs.pop('cbam_args', None) or {}
        kwargs.setdefault('bam_stages', ())
        kwargs.setdefault('se_layer', partial(_cbam_in_block, cbam_args=cbam_args))
        kwargs.setdefault('pw_attn_layer', partial(_cbam_in_block, cbam_args=cbam_args))
    model_kwargs = dict(
        block_args=decode_arch_def(arch if cbam else _MOBILENETV1_ARCH),
        num_features=0,
        stem_size=32,
        round_chs_fn=partial(round_channels, multiplier=channel_multiplier),
        norm_layer=kwargs.pop('norm_layer', None) or partial(nn.BatchNorm2d, **resolve_bn_args(kwargs)),
        act_layer=resolve_act_layer(kwargs, 'relu6'),
        **kwargs,
    )
    return build_model_with_weights(
        BamMobileNetV1,
        variant,
        pretrained,
        feature_cfg=dict(flatten_sequential=True, out_indices=(0, 1, 2, 3, 4)),
        **model_kwargs,
    )


def _cfg(**kwargs) -> Dict[str, Any]:
    return {
        'url': '',
        'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': (7, 7),
        'crop_pct': 0.875, 'interpolation': 'bicubic',
        'mean': (0.485, 0.456, 0.406), 'std': (0.229, 0.224, 0.225),
        'first_conv': 'conv_stem', 'classifier': 'classifier',
        'license': 'mit',
        **kwargs,
    }


default_cfgs = generate_default_cfgs(manifest_default_cfgs((
    'mobilenetv1_100_bam',
    'mobilenetv1_125_bam',
    'mobilenetv1_100_cbam',
), _cfg))


@register_model
def mobilenetv1_100_bam(pretrained: bool = False, **kwargs) -> BamMobileNetV1:
    """MobileNetV1 (width 1.0) with BAM before each stride-2 stage."""
    return _create_mobilenetv1_bam('mobilenetv1_100_bam', 1.0, pretrained=pretrained, **kwargs)


@register_model
def mobilenetv1_125_bam(pretrained: bool = False, **kwargs) -> BamMobileNetV1:
    """MobileNetV1 (width 1.25) with BAM before each stride-2 stage."""
    return _create_mobilenetv1_bam('mobilenetv1_125_bam', 1.25, pretrained=pretrained, **kwargs)


@register_model
def mobilenetv1_100_cbam(pretrained: bool = False, **kwargs) -> BamMobileNetV1:
    """MobileNetV1 (width 1.0) with CBAM after both convolutions of every depthwise-separable block."""
    return _create_mobilenetv1_bam('mobilenetv1_100_cbam', 1.0, pretrained=pretrained, cbam=True, **kwargs)

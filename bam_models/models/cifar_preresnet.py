""" CIFAR pre-activation ResNets and Wide ResNets (32x32 input) with BAM and CBAM, on timm's ResNetV2 parts

- `preresnet110_cifar`: He et al.'s pre-activation ResNet-110 for CIFAR (three stages of 18 basic blocks,
  16-32-64 channels).
- `wrn28_8_cifar`, `wrn28_10_cifar`: Zagoruyko & Komodakis' Wide ResNet-28-8 / 28-10 (three stages of four
  basic blocks, 16k-32k-64k channels), the same pre-activation network made wider.

Both are: a 3x3 stem conv (16 channels, no BN), pre-activation basic blocks (BN-ReLU-conv twice; where the shape
changes the shortcut is a 1x1 conv of the pre-activated input), a final BN-ReLU, global average pooling, fc.
Blocks, stages and the 1x1 shortcut are timm's (`PreActBasic`, `ResNetStage`, `DownsampleConv`); what timm
lacks is the CIFAR stem and an attention slot in the pre-activation block: `PreActBasicAttn` adds it (`se`, on
the residual branch before the add, as timm's other blocks place SE/CBAM). BAM refines the output of stages 0
and 1, inside them (`stages.0.blocks.bam`).

The plain trunks equal pytorchcv's `preresnet110_cifar100` / `wrn28_10_cifar100` parameter for parameter and
load their weights through `bam-models convert --from pytorchcv`.
"""
from collections import OrderedDict
from functools import partial
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from timm.layers import BatchNormAct2d, ClassifierHead, create_conv2d
from timm.models import generate_default_cfgs, register_model
from timm.models.resnetv2 import PreActBasic, ResNetStage

from bam_models._compat import feature_take_indices
from bam_models.weights import build_model_with_weights
from bam_models.weights import manifest_default_cfgs
from bam_models.layers import BAM, bam_stage_indices, cbam_layer, stage_bam
from ._contract import AttentionModelContract, stage_drop_path_rates, total_stride
from .cifar_resnet import CIFAR100_MEAN, CIFAR100_STD

__all__ = ['CifarPreActResNet', 'PreActBasicAttn']


class PreActBasicAttn(PreActBasic):
    """timm's pre-activation basic block with an attention module (`se`) on the residual branch before the add."""

    def __init__(self, in_chs: int, out_chs: Optional[int] = None, attn_layer=None, **kwargs):
        super().__init__(in_chs, out_chs, **kwargs)
        dd = {'device': kwargs.get('device'), 'dtype': kwargs.get('dtype')}
        self.se = attn_layer(out_chs or in_chs, **dd) if attn_layer is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_preact = self.norm1(x)
        shortcut = x if self.downsample is None else self.downsample(x_preact)
        x = self.conv2(self.norm2(self.conv1(x_preact)))
        return self.drop_path(self.se(x)) + shortcut


class CifarPreActResNet(AttentionModelContract, nn.Module):
    """Pre-activation ResNet for 32x32 images: stem conv, stride 1/2/2 stages, final BN-ReLU, pool, fc.

    Not a subclass of timm's `ResNetV2`, whose stages and blocks it uses: every ResNetV2 stem (`stem_type`)
    reduces by 4 with a 7x7 or deep conv stem, and its stage strides are fixed at 1-2-2-2, while this network
    (and pytorchcv's CIFAR trunks, whose weights `convert` maps) has a bare 3x3 stride-1 conv stem and three
    stages; a subclass would replace the stem, feature_info and forward_intermediates, i.e. all ResNetV2 adds.

    Args:
        layers: blocks per stage.
        channels: output channels per stage.
        stem_width: channels of the stem conv.
        bam_stages: stages (0-based) whose output BAM refines; () for none.
        bam_args: keyword arguments for every BAM.
        block_args: extra block arguments, e.g. `attn_layer` (CBAM in every block).
    """

    def __init__(
            self,
            layers: Sequence[int],
            channels: Sequence[int],
            num_classes: int = 100,
            in_chans: int = 3,
            stem_width: int = 16,
            global_pool: str = 'avg',
            drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            bam_stages: Sequence[int] = (),
            bam_args: Optional[Dict[str, Any]] = None,
            block_args: Optional[Dict[str, Any]] = None,
            act_layer=nn.ReLU,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        norm_layer = partial(BatchNormAct2d, act_layer=act_layer)
        self.stem = nn.Sequential(OrderedDict(conv=create_conv2d(in_chans, stem_width, 3, **dd)))
        self.feature_info = [dict(num_chs=stem_width, reduction=1, module='stem.conv')]
        self.stages = nn.Sequential()
        prev_chs, stride = stem_width, 1
        depth_rates = stage_drop_path_rates(drop_path_rate, layers)
        for index, (depth, out_chs, rates) in enumerate(zip(layers, channels, depth_rates)):
            stage_stride = 1 if index == 0 else 2
            stage = ResNetStage(
                prev_chs, out_chs, stride=stage_stride, dilation=1, depth=depth, bottle_ratio=1.0,
                block_dpr=rates, block_fn=PreActBasicAttn, act_layer=act_layer, conv_layer=create_conv2d,
                norm_layer=norm_layer, **(block_args or {}), **dd)
            stride *= stage_stride
            if index in bam_stages:
                stage.blocks.add_module('bam', stage_bam(stage.blocks, out_chs, bam_args, **dd))
            self.stages.add_module(str(index), stage)
            self.feature_info.append(dict(num_chs=out_chs, reduction=stride, module=f'stages.{index}'))
            prev_chs = out_chs
        self.bam_stages = tuple(bam_stages)
        self.min_input_size = total_stride(self.feature_info)
        self.num_features = self.head_hidden_size = prev_chs
        self.norm = norm_layer(prev_chs, **dd)
        self.head = ClassifierHead(prev_chs, num_classes, pool_type=global_pool, drop_rate=drop_rate, **dd)
        self.init_weights()

    @torch.jit.ignore
    def init_weights(self) -> None:
        """timm's ResNet init for the convolutions; each BAM keeps its own (as in AttentionResNet)."""
        bam_convs = {id(m) for bam in self.modules() if isinstance(bam, BAM) for m in bam.modules()}
        for module in self.modules():
            if isinstance(module, nn.Conv2d) and id(module) not in bam_convs:
                nn.init.kaiming_normal_(module.weight, mode='fan_out', nonlinearity='relu')

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return self.attention_group_matcher(
            coarse, stem=r'^stem', stage=r'^stages\.(\d+)', blocks=r'\.blocks', tail=(r'^norm',))

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for stage in self.stages:
            stage.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self.num_classes = num_classes
        param = next(self.parameters())
        self.head.reset(num_classes, pool_type=global_pool, device=param.device, dtype=param.dtype)

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Taps: the stem conv, then each stage (the last one through the final BN-ReLU if `norm`)."""
        assert output_fmt == 'NCHW', 'Output shape must be NCHW.'
        self.check_input(x)
        take_indices, max_index = feature_take_indices(len(self.feature_info), indices)
        x = self.stem(x)
        intermediates = [x] if 0 in take_indices else []
        stages = self.stages[:max_index] if stop_early else self.stages
        last = len(self.stages)
        for feat_idx, stage in enumerate(stages, start=1):
            x = stage(x)
            if feat_idx in take_indices:
                intermediates.append(self.norm(x) if norm and feat_idx == last else x)
        if intermediates_only:
            return intermediates
        return (self.norm(x) if len(stages) == last else x), intermediates

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> List[int]:
        take_indices, max_index = feature_take_indices(len(self.feature_info), indices)
        prune_end = max_index < len(self.stages)
        if prune_norm or prune_end:
            self.norm = nn.Identity()  # sized for (and only applied to) the last stage
        self.stages = self.stages[:max_index]
        if prune_end:
            self.num_features = self.head_hidden_size = self.feature_info[max_index]['num_chs']
        if prune_head or prune_end:
            self.head = ClassifierHead(self.num_features, 0, pool_type='')
            self.num_classes = 0
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        return self.norm(self.stages(self.stem(x)))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=True) if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _create_cifar_preresnet(variant: str, pretrained: bool = False, **kwargs) -> CifarPreActResNet:
    return build_model_with_weights(
        CifarPreActResNet, variant, pretrained, feature_cfg=dict(flatten_sequential=True, out_indices=(0, 1, 2, 3)),
        **kwargs)


def _arch(layers: Sequence[int], channels: Sequence[int], attn: str, **kwargs) -> Dict[str, Any]:
    """Model kwargs for `attn` '' (plain), 'bam' (after stages 0 and 1) or 'cbam' (every block)."""
    if attn == 'bam':
        # stage strides 1, 2, 2: BAM after every stage but the last
        reductions = [2 ** index for index in range(len(layers))]
        kwargs.setdefault('bam_stages', bam_stage_indices(reductions))
    if attn == 'cbam':
        attn_layer = cbam_layer(kwargs.pop('cbam_args', None))
        kwargs['block_args'] = {'attn_layer': attn_layer, **(kwargs.get('block_args') or {})}
    return dict(layers=layers, channels=channels, **kwargs)


def _preresnet110(attn: str, **kwargs) -> Dict[str, Any]:
    return _arch((18, 18, 18), (16, 32, 64), attn, **kwargs)


def _wrn28(widen: int, attn: str, **kwargs) -> Dict[str, Any]:
    return _arch((4, 4, 4), (16 * widen, 32 * widen, 64 * widen), attn, **kwargs)


def _cfg(**kwargs) -> Dict[str, Any]:
    return {
        'url': '',
        'num_classes': 100, 'input_size': (3, 32, 32), 'pool_size': (8, 8),
        'crop_pct': 1.0, 'interpolation': 'bilinear',
        'mean': CIFAR100_MEAN, 'std': CIFAR100_STD,
        'first_conv': 'stem.conv', 'classifier': 'head.fc',
        'license': 'mit',
        **kwargs,
    }


default_cfgs = generate_default_cfgs(manifest_default_cfgs(
    [f'{net}_cifar{attn}' for net in ('preresnet110', 'wrn28_8', 'wrn28_10') for attn in ('', '_bam', '_cbam')],
    _cfg))


@register_model
def preresnet110_cifar(pretrained: bool = False, **kwargs) -> CifarPreActResNet:
    """Pre-activation ResNet-110 for CIFAR (the BAM paper's CIFAR-100 PreResNet110 row)."""
    return _create_cifar_preresnet('preresnet110_cifar', pretrained, **_preresnet110('', **kwargs))


@register_model
def preresnet110_cifar_bam(pretrained: bool = False, **kwargs) -> CifarPreActResNet:
    """Pre-activation ResNet-110 with BAM after stages 0 and 1."""
    return _create_cifar_preresnet('preresnet110_cifar_bam', pretrained, **_preresnet110('bam', **kwargs))


@register_model
def preresnet110_cifar_cbam(pretrained: bool = False, **kwargs) -> CifarPreActResNet:
    """Pre-activation ResNet-110 with CBAM in every block."""
    return _create_cifar_preresnet('preresnet110_cifar_cbam', pretrained, **_preresnet110('cbam', **kwargs))


@register_model
def wrn28_8_cifar(pretrained: bool = False, **kwargs) -> CifarPreActResNet:
    """Wide ResNet-28-8 for CIFAR (the BAM paper's CIFAR-100 WideResNet28 (w=8) row)."""
    return _create_cifar_preresnet('wrn28_8_cifar', pretrained, **_wrn28(8, '', **kwargs))


@register_model
def wrn28_8_cifar_bam(pretrained: bool = False, **kwargs) -> CifarPreActResNet:
    """Wide ResNet-28-8 with BAM after stages 0 and 1."""
    return _create_cifar_preresnet('wrn28_8_cifar_bam', pretrained, **_wrn28(8, 'bam', **kwargs))


@register_model
def wrn28_8_cifar_cbam(pretrained: bool = False, **kwargs) -> CifarPreActResNet:
    """Wide ResNet-28-8 with CBAM in every block."""
    return _create_cifar_preresnet('wrn28_8_cifar_cbam', pretrained, **_wrn28(8, 'cbam', **kwargs))


@register_model
def wrn28_10_cifar(pretrained: bool = False, **kwargs) -> CifarPreActResNet:
    """Wide ResNet-28-10 for CIFAR (the BAM paper's CIFAR-100 WideResNet28 (w=10) row)."""
    return _create_cifar_preresnet('wrn28_10_cifar', pretrained, **_wrn28(10, '', **kwargs))


@register_model
def wrn28_10_cifar_bam(pretrained: bool = False, **kwargs) -> CifarPreActResNet:
    """Wide ResNet-28-10 with BAM after stages 0 and 1."""
    return _create_cifar_preresnet('wrn28_10_cifar_bam', pretrained, **_wrn28(10, 'bam', **kwargs))


@register_model
def wrn28_10_cifar_cbam(pretrained: bool = False, **kwargs) -> CifarPreActResNet:
    """Wide ResNet-28-10 with CBAM in every block."""
    return _create_cifar_preresnet('wrn28_10_cifar_cbam', pretrained, **_wrn28(10, 'cbam', **kwargs))

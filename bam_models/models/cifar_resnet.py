""" CIFAR ResNets and ResNeXts (32x32 input) with BAM and CBAM, on timm's ResNet

- `resnet{18,34,50,101}_cifar`: the BAM/CBAM authors' CIFAR ResNet (their released
  `ResidualNet('CIFAR100', depth, 100, att)`): a 3x3 stride-1 stem conv with 64 channels, BN, ReLU, no max-pool,
  the four ImageNet stages (stride in the 3x3 conv of a bottleneck), global average pooling, fc. The authors pool
  with a fixed 4x4 kernel (32 px inputs only); pooling over the whole map is the same there and takes any size.
- `resnext29_{8,16}x64d_cifar`: Xie et al.'s CIFAR ResNeXt-29: the same stem, three stages of three bottlenecks
  (cardinality 8 / 16, 64 channels per group in the first stage, 256-512-1024 output channels).

timm's ResNet builds every block; only the stem differs (timm's stems all reduce by 4). BAM refines the output
of every stage but the last (the BAM paper's "before each downsampling"), inside that stage (`layer1.bam`, the
authors' `bam1`); CBAM sits in every block's attention slot (`layer1.0.se`, the authors' `layer1.0.cbam`), so
`bam-models convert --from official` maps the authors' CIFAR checkpoints exactly as their ImageNet ones.
"""
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from timm.models import checkpoint_seq, generate_default_cfgs, register_model
from timm.models.resnet import BasicBlock, Bottleneck

from bam_models._compat import feature_take_indices
from bam_models.weights import build_model_with_weights
from bam_models.layers import bam_stage_indices
from bam_models.weights import manifest_default_cfgs
from ._contract import total_stride
from .attention_resnet import AttentionResNet, cbam_resnet_args

__all__ = ['CifarResNet', 'CIFAR100_MEAN', 'CIFAR100_STD']

CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
STAGE_NAMES = ('layer1', 'layer2', 'layer3', 'layer4')


class CifarResNet(AttentionResNet):
    """AttentionResNet with a CIFAR stem (3x3 stride-1 conv, no max-pool) and three or four stages.

    A subclass of timm's `ResNet` (through AttentionResNet): timm builds every stage and block exactly as the
    authors' CIFAR ResNet has them, so only the stem, the stage count and the taps are replaced here.

    The network's total stride is 2 ** (stages - 1): 8 for four stages, 4 for three. Arguments are
    AttentionResNet's; `output_stride` (dilated stages) is not offered, the maps are already large.
    """

    def __init__(self, block, layers: Sequence[int], channels: Sequence[int] = (64, 128, 256, 512), **kwargs):
        if kwargs.get('output_stride', 32) != 32:
            raise ValueError(f"CIFAR networks keep their natural stride; got output_stride={kwargs['output_stride']}, "
                             f"leave it unset")
        if len(layers) not in (3, 4) or len(channels) != len(layers):
            raise ValueError(f"expected 3 or 4 stages with one channel count each, got layers={tuple(layers)}, "
                             f"channels={tuple(channels)}")
        super().__init__(block, layers, channels=channels, **kwargs)
        dd = {'device': kwargs.get('device'), 'dtype': kwargs.get('dtype')}
        stem_width = self.conv1.out_channels
        self.conv1 = nn.Conv2d(self.in_chans, stem_width, 3, padding=1, bias=False, **dd)
        nn.init.kaiming_normal_(self.conv1.weight, mode='fan_out', nonlinearity='relu')
        self.maxpool = nn.Identity()
        self.num_stages = len(layers)
        if self.num_stages == 3:
            # an empty Sequential (an identity without parameters) keeps timm's four-stage forward, TorchScript
            # and gradient checkpointing working unchanged
            self.layer4 = nn.Sequential()
        for info in self.feature_info:  # timm's stem reduces by 4, this one by 1
            info['reduction'] = max(info['reduction'] // 4, 1)
        self.min_input_size = total_stride(self.feature_info)
        self.stage_names = STAGE_NAMES[:self.num_stages]

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """timm's ResNet.forward_intermediates for any number of stages (taps: stem, then each stage)."""
        assert output_fmt == 'NCHW', 'Output shape must be NCHW.'
        self.check_input(x)
        take_indices, max_index = feature_take_indices(len(self.feature_info), indices)
        intermediates = []
        x = self.act1(self.bn1(self.conv1(x)))
        if 0 in take_indices:
            intermediates.append(x)
        for feat_idx, name in enumerate(self.stage_names[:max_index] if stop_early else self.stage_names, start=1):
            layer = getattr(self, name)
            x = checkpoint_seq(layer, x) if self.grad_checkpointing and not torch.jit.is_scripting() else layer(x)
            if feat_idx in take_indices:
                intermediates.append(x)
        if intermediates_only:
            return intermediates
        return x, intermediates

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> List[int]:
        take_indices, max_index = feature_take_indices(len(self.feature_info), indices)
        for name in self.stage_names[max_index:]:
            setattr(self, name, nn.Sequential())
        prune_end = max_index < self.num_stages
        if prune_end:
            # features now end at the last kept tap; the head is sized for the final features so it goes too
            self.num_features = self.head_hidden_size = self.feature_info[max_index]['num_chs']
        if prune_head or prune_end:
            self.reset_classifier(0, '')
        return take_indices


def _create_cifar_resnet(variant: str, pretrained: bool = False, **kwargs) -> CifarResNet:
    num_stages = len(kwargs['layers'])
    return build_model_with_weights(
        CifarResNet, variant, pretrained, feature_cfg=dict(out_indices=tuple(range(num_stages + 1))), **kwargs)


def _arch(block, layers: Sequence[int], attn: str, **kwargs) -> Dict:
    """Model kwargs for `attn` '' (plain), 'bam' (after every stage but the last) or 'cbam' (every block)."""
    if attn == 'cbam':
        return cbam_resnet_args(block, layers, **kwargs)
    if attn == 'bam':
        # the stem does not reduce, each stage after the first halves the map: BAM after every stage but the last
        reductions = [2 ** index for index in range(len(layers))]
        kwargs.setdefault('bam_stages', tuple(index + 1 for index in bam_stage_indices(reductions)))
    return dict(block=block, layers=layers, **kwargs)


def _resnext29(cardinality: int, attn: str, **kwargs) -> Dict:
    return _arch(Bottleneck, (3, 3, 3), attn, channels=(64, 128, 256), cardinality=cardinality, base_width=64,
                 **kwargs)


def _cfg(**kwargs) -> Dict:
    return {
        'url': '',
        'num_classes': 100, 'input_size': (3, 32, 32), 'pool_size': (4, 4),
        'crop_pct': 1.0, 'interpolation': 'bilinear',
        'mean': CIFAR100_MEAN, 'std': CIFAR100_STD,
        'first_conv': 'conv1', 'classifier': 'fc',
        'license': 'mit',
        **kwargs,
    }


def _resnext_cfg(**kwargs) -> Dict:
    return _cfg(pool_size=(8, 8), **kwargs)


_RESNETS = [f'resnet{depth}_cifar{attn}' for depth in (18, 34, 50, 101) for attn in ('', '_bam', '_cbam')]
_RESNEXTS = [f'resnext29_{c}x64d_cifar{attn}' for c in (8, 16) for attn in ('', '_bam', '_cbam')]
default_cfgs = generate_default_cfgs({
    **manifest_default_cfgs(_RESNETS, _cfg),
    **manifest_default_cfgs(_RESNEXTS, _resnext_cfg),
})


@register_model
def resnet18_cifar(pretrained: bool = False, **kwargs) -> CifarResNet:
    """The BAM/CBAM authors' CIFAR ResNet-18."""
    return _create_cifar_resnet('resnet18_cifar', pretrained, **_arch(BasicBlock, (2, 2, 2, 2), '', **kwargs))


@register_model
def resnet18_cifar_bam(pretrained: bool = False, **kwargs) -> CifarResNet:
    """The authors' CIFAR ResNet-18 with BAM after layer1-3."""
    return _create_cifar_resnet('resnet18_cifar_bam', pretrained, **_arch(BasicBlock, (2, 2, 2, 2), 'bam', **kwargs))


@register_model
def resnet18_cifar_cbam(pretrained: bool = False, **kwargs) -> CifarResNet:
    """The authors' CIFAR ResNet-18 with CBAM in every block."""
    return _create_cifar_resnet(
        'resnet18_cifar_cbam', pretrained, **_arch(BasicBlock, (2, 2, 2, 2), 'cbam', **kwargs))


@register_model
def resnet34_cifar(pretrained: bool = False, **kwargs) -> CifarResNet:
    """The BAM/CBAM authors' CIFAR ResNet-34."""
    return _create_cifar_resnet('resnet34_cifar', pretrained, **_arch(BasicBlock, (3, 4, 6, 3), '', **kwargs))


@register_model
def resnet34_cifar_bam(pretrained: bool = False, **kwargs) -> CifarResNet:
    """The authors' CIFAR ResNet-34 with BAM after layer1-3."""
    return _create_cifar_resnet('resnet34_cifar_bam', pretrained, **_arch(BasicBlock, (3, 4, 6, 3), 'bam', **kwargs))


@register_model
def resnet34_cifar_cbam(pretrained: bool = False, **kwargs) -> CifarResNet:
    """The authors' CIFAR ResNet-34 with CBAM in every block."""
    return _create_cifar_resnet(
        'resnet34_cifar_cbam', pretrained, **_arch(BasicBlock, (3, 4, 6, 3), 'cbam', **kwargs))


@register_model
def resnet50_cifar(pretrained: bool = False, **kwargs) -> CifarResNet:
    """The BAM/CBAM authors' CIFAR ResNet-50 (the BAM paper's CIFAR-100 ResNet50 row)."""
    return _create_cifar_resnet('resnet50_cifar', pretrained, **_arch(Bottleneck, (3, 4, 6, 3), '', **kwargs))


@register_model
def resnet50_cifar_bam(pretrained: bool = False, **kwargs) -> CifarResNet:
    """The authors' CIFAR ResNet-50 with BAM after layer1-3."""
    return _create_cifar_resnet('resnet50_cifar_bam', pretrained, **_arch(Bottleneck, (3, 4, 6, 3), 'bam', **kwargs))


@register_model
def resnet50_cifar_cbam(pretrained: bool = False, **kwargs) -> CifarResNet:
    """The authors' CIFAR ResNet-50 with CBAM in every block."""
    return _create_cifar_resnet(
        'resnet50_cifar_cbam', pretrained, **_arch(Bottleneck, (3, 4, 6, 3), 'cbam', **kwargs))


@register_model
def resnet101_cifar(pretrained: bool = False, **kwargs) -> CifarResNet:
    """The BAM/CBAM authors' CIFAR ResNet-101."""
    return _create_cifar_resnet('resnet101_cifar', pretrained, **_arch(Bottleneck, (3, 4, 23, 3), '', **kwargs))


@register_model
def resnet101_cifar_bam(pretrained: bool = False, **kwargs) -> CifarResNet:
    """The authors' CIFAR ResNet-101 with BAM after layer1-3."""
    return _create_cifar_resnet(
        'resnet101_cifar_bam', pretrained, **_arch(Bottleneck, (3, 4, 23, 3), 'bam', **kwargs))


@register_model
def resnet101_cifar_cbam(pretrained: bool = False, **kwargs) -> CifarResNet:
    """The authors' CIFAR ResNet-101 with CBAM in every block."""
    return _create_cifar_resnet(
        'resnet101_cifar_cbam', pretrained, **_arch(Bottleneck, (3, 4, 23, 3), 'cbam', **kwargs))


@register_model
def resnext29_8x64d_cifar(pretrained: bool = False, **kwargs) -> CifarResNet:
    """Xie et al.'s CIFAR ResNeXt-29 8x64d."""
    return _create_cifar_resnet('resnext29_8x64d_cifar', pretrained, **_resnext29(8, '', **kwargs))


@register_model
def resnext29_8x64d_cifar_bam(pretrained: bool = False, **kwargs) -> CifarResNet:
    """CIFAR ResNeXt-29 8x64d with BAM after layer1-2."""
    return _create_cifar_resnet('resnext29_8x64d_cifar_bam', pretrained, **_resnext29(8, 'bam', **kwargs))


@register_model
def resnext29_8x64d_cifar_cbam(pretrained: bool = False, **kwargs) -> CifarResNet:
    """CIFAR ResNeXt-29 8x64d with CBAM in every block."""
    return _create_cifar_resnet('resnext29_8x64d_cifar_cbam', pretrained, **_resnext29(8, 'cbam', **kwargs))


@register_model
def resnext29_16x64d_cifar(pretrained: bool = False, **kwargs) -> CifarResNet:
    """Xie et al.'s CIFAR ResNeXt-29 16x64d (the BAM paper's CIFAR-100 ResNeXt29 row)."""
    return _create_cifar_resnet('resnext29_16x64d_cifar', pretrained, **_resnext29(16, '', **kwargs))


@register_model
def resnext29_16x64d_cifar_bam(pretrained: bool = False, **kwargs) -> CifarResNet:
    """CIFAR ResNeXt-29 16x64d with BAM after layer1-2."""
    return _create_cifar_resnet('resnext29_16x64d_cifar_bam', pretrained, **_resnext29(16, 'bam', **kwargs))


@register_model
def resnext29_16x64d_cifar_cbam(pretrained: bool = False, **kwargs) -> CifarResNet:
    """CIFAR ResNeXt-29 16x64d with CBAM in every block."""
    return _create_cifar_resnet('resnext29_16x64d_cifar_cbam', pretrained, **_resnext29(16, 'cbam', **kwargs))

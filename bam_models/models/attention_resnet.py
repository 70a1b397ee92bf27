""" BAM and CBAM ResNets, Wide ResNets and ResNeXts on timm's ResNet

BAM (Park et al. 2018) refines the output of layer1, layer2 and layer3, just before each downsampling stage.
The module lives inside the stage it refines (`layer1.bam`), so every trunk parameter keeps timm's (and
torchvision's) name, plain-trunk checkpoints load with only the BAM keys missing, and every features_only
wrapper and forward_intermediates return BAM-refined maps. Each BAM applies the ReLU that ends the block
before it (that block's last activation is an identity; see `bam_models.layers.hand_final_relu_over`), which
leaves every output unchanged and keeps one full-size tensor fewer for backward. Where BAM goes and how each is
configured (dilation under output_stride < 32 included) is `bam_models.layers.placement`, which insert_bam
follows too.

CBAM (Woo et al. 2018) sits in every residual block after the last BN and before the residual add, which is
timm's block attention slot (`layer1.0.se`). The CBAM networks' blocks are timm's with one change: in a training
step the CBAM applies that last BN itself (`CBAM.forward_after_norm`), so the block keeps the BN's input for
backward and not its output besides; modules and parameter names are timm's, outputs too (in a training step up
to float rounding).

`wide_resnet18_150` / `wide_resnet18_200` are both papers' "WideResNet18 (widen=1.5 / 2.0)": ResNet-18 with
every stage 1.5x / 2x wider (96-192-384-768 / 128-256-512-1024 channels) and the stem unchanged. They are
registered with their BAM and CBAM twins, as the papers compare them.
"""
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch

from timm.models import checkpoint_seq, generate_default_cfgs, register_model
from timm.models.resnet import BasicBlock, Bottleneck, ResNet

from bam_models.weights import build_model_with_weights
from bam_models.layers import CBAM, bam_stage_indices, cbam_layer, stage_bam
from bam_models.weights import manifest_default_cfgs
from ._contract import AttentionModelContract, total_stride

__all__ = [
    'AttentionAfterNorm', 'AttentionResNet', 'CBAM_BLOCKS', 'CbamBasicBlock', 'CbamBottleneck', 'bam_resnet_args',
    'cbam_resnet_args',
]

# layer1-3: the stages followed by a downsampling (bam_stage_indices of timm's 4-8-16-32 stage reductions)
BAM_STAGES = tuple(stage + 1 for stage in bam_stage_indices((4, 8, 16, 32)))


class AttentionAfterNorm:
    """The last BN and the attention module `se` after it, for a block whose `last_norm` names that BN: a CBAM
    applies both where that keeps less for backward (`CBAM.forward_after_norm`)."""
    last_norm = ''

    @torch.jit.unused
    def _norm_attention(self, x: torch.Tensor) -> torch.Tensor:
        norm = getattr(self, self.last_norm)
        if isinstance(self.se, CBAM):
            return self.se.forward_after_norm(x, norm)
        x = norm(x)
        return x if self.se is None else self.se(x)

    def _shortcut_sum(self, x: torch.Tensor, shortcut: torch.Tensor) -> torch.Tensor:
        """The residual branch's output `x` plus the (downsampled) shortcut, before the block's last activation."""
        if self.drop_path is not None:
            x = self.drop_path(x)
        if self.downsample is not None:
            shortcut = self.downsample(shortcut)
        x += shortcut
        return x


class CbamBasicBlock(AttentionAfterNorm, BasicBlock):
    """timm's BasicBlock whose CBAM applies bn2 in a training step (see the module docstring)."""
    last_norm = 'bn2'

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.conv1(x)
        x = self.bn1(x)
        x = self.drop_block(x)
        x = self.act1(x)
        x = self.aa(x)
        x = self.conv2(x)
        if torch.jit.is_scripting():
            x = self.bn2(x)
            x = x if self.se is None else self.se(x)
        else:
            x = self._norm_attention(x)
        return self.act2(self._shortcut_sum(x, shortcut))


class CbamBottleneck(AttentionAfterNorm, Bottleneck):
    """timm's Bottleneck whose CBAM applies bn3 in a training step (see the module docstring)."""
    last_norm = 'bn3'

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.conv1(x)
        x = self.bn1(x)
        x = self.act1(x)
        x = self.conv2(x)
        x = self.bn2(x)
        x = self.drop_block(x)
        x = self.act2(x)
        x = self.aa(x)
        x = self.conv3(x)
        if torch.jit.is_scripting():
            x = self.bn3(x)
            x = x if self.se is None else self.se(x)
        else:
            x = self._norm_attention(x)
        return self.act3(self._shortcut_sum(x, shortcut))


# timm's blocks and their CBAM twins (insert_cbam gives a timm ResNet's blocks the same)
CBAM_BLOCKS = {BasicBlock: CbamBasicBlock, Bottleneck: CbamBottleneck}


class AttentionResNet(AttentionModelContract, ResNet):
    """timm's ResNet with BAM inside the stages named by `bam_stages` (CBAM goes in through `block_args`).

    Args:
        bam_stages: stages (1-4) whose output BAM refines; () for none.
        bam_args: keyword arguments for every BAM (fusion, rd_ratio, dilation, ...).
        All other arguments are timm's ResNet's.
    """

    def __init__(
            self,
            *args,
            bam_stages: Sequence[int] = (),
            bam_args: Optional[Dict[str, Any]] = None,
            **kwargs,
    ):
        super().__init__(*args, **kwargs)
        dd = {'device': kwargs.get('device'), 'dtype': kwargs.get('dtype')}
        for stage in bam_stages:
            if stage not in (1, 2, 3, 4):
                raise ValueError(f"bam_stages entries must be ResNet stages 1-4, got {stage}.")
            layer = getattr(self, f'layer{stage}')
            layer.add_module('bam', stage_bam(layer, self.feature_info[stage]['num_chs'], bam_args, **dd))
        self.bam_stages = tuple(bam_stages)
        self.min_input_size = total_stride(self.feature_info)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return self.attention_group_matcher(coarse, stem=r'^conv1|bn1|maxpool', stage=r'^layer(\d+)')

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        self.check_input(x)
        return super().forward_intermediates(
            x, indices, norm=norm, stop_early=stop_early, output_fmt=output_fmt,
            intermediates_only=intermediates_only,
        )

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        # timm's body plus the input check; TorchScript cannot compile a super() call here
        self.check_input(x)
        x = self.conv1(x)
        x = self.bn1(x)
        x = self.act1(x)
        x = self.maxpool(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq([self.layer1, self.layer2, self.layer3, self.layer4], x, flatten=True)
        else:
            x = self.layer1(x)
            x = self.layer2(x)
            x = self.layer3(x)
            x = self.layer4(x)
        return x


def _create_resnet_attn(variant: str, pretrained: bool = False, **kwargs) -> AttentionResNet:
    return build_model_with_weights(AttentionResNet, variant, pretrained, **kwargs)


def bam_resnet_args(block, layers, **kwargs) -> Dict[str, Any]:
    """Architecture kwargs of a BAM ResNet; user kwargs (e.g. bam_args=dict(fusion='sum')) win."""
    return dict(dict(block=block, layers=layers, bam_stages=BAM_STAGES), **kwargs)


def cbam_resnet_args(block, layers, **kwargs) -> Dict[str, Any]:
    """Architecture kwargs of a CBAM ResNet; `cbam_args` configure every block's CBAM (timm's `attn_layer`)."""
    block_args = dict(kwargs.pop('block_args', None) or {})
    block_args.setdefault('attn_layer', cbam_layer(kwargs.pop('cbam_args', None)))
    return dict(block=CBAM_BLOCKS.get(block, block), layers=layers, block_args=block_args, **kwargs)


def _cfg(**kwargs) -> Dict[str, Any]:
    return {
        'url': '',
        'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': (7, 7),
        'crop_pct': 0.875, 'interpolation': 'bilinear',
        'mean': (0.485, 0.456, 0.406), 'std': (0.229, 0.224, 0.225),
        'first_conv': 'conv1', 'classifier': 'fc',
        'license': 'mit',
        **kwargs,
    }


default_cfgs = generate_default_cfgs(manifest_default_cfgs((
    'resnet18_bam',
    'resnet34_bam',
    'resnet50_bam',
    'resnet101_bam',
    'resnet152_bam',
    'wide_resnet50_2_bam',
    'wide_resnet101_2_bam',
    'resnext50_32x4d_bam',
    'resnext101_32x4d_bam',
    'resnext101_32x8d_bam',
    'wide_resnet18_150',
    'wide_resnet18_200',
    'wide_resnet18_150_bam',
    'wide_resnet18_200_bam',
    'resnet18_cbam',
    'resnet34_cbam',
    'resnet50_cbam',
    'resnet101_cbam',
    'resnet152_cbam',
    'wide_resnet50_2_cbam',
    'wide_resnet101_2_cbam',
    'wide_resnet18_150_cbam',
    'wide_resnet18_200_cbam',
    'resnext50_32x4d_cbam',
    'resnext101_32x4d_cbam',
    'resnext101_32x8d_cbam',
), _cfg))

# the papers' WideResNet18: ResNet-18 stage widths x1.5 / x2
WIDE18_150_CHANNELS = (96, 192, 384, 768)
WIDE18_200_CHANNELS = (128, 256, 512, 1024)


@register_model
def resnet18_bam(pretrained: bool = False, **kwargs) -> AttentionResNet:
    """ResNet-18 with BAM after layer1-3."""
    return _create_resnet_attn('resnet18_bam', pretrained, **bam_resnet_args(BasicBlock, (2, 2, 2, 2), **kwargs))


@register_model
def resnet34_bam(pretrained: bool = False, **kwargs) -> AttentionResNet:
    """ResNet-34 with BAM after layer1-3."""
    return _create_resnet_attn('resnet34_bam', pretrained, **bam_resnet_args(BasicBlock, (3, 4, 6, 3), **kwargs))


@register_model
def resnet50_bam(pretrained: bool = False, **kwargs) -> AttentionResNet:
    """ResNet-50 with BAM after layer1-3 (the authors' ImageNet architecture)."""
    return _create_resnet_attn('resnet50_bam', pretrained, **bam_resnet_args(Bottleneck, (3, 4, 6, 3), **kwargs))


@register_model
def resnet101_bam(pretrained: bool = False, **kwargs) -> AttentionResNet:
    """ResNet-101 with BAM after layer1-3."""
    return _create_resnet_attn('resnet101_bam', pretrained, **bam_resnet_args(Bottleneck, (3, 4, 23, 3), **kwargs))


@register_model
def resnet152_bam(pretrained: bool = False, **kwargs) -> AttentionResNet:
    """ResNet-152 with BAM after layer1-3."""
    return _create_resnet_attn('resnet152_bam', pretrained, **bam_resnet_args(Bottleneck, (3, 8, 36, 3), **kwargs))


@register_model
def wide_resnet50_2_bam(pretrained: bool = False, **kwargs) -> AttentionResNet:
    """Wide ResNet-50-2 with BAM after layer1-3."""
    return _create_resnet_attn(
        'wide_resnet50_2_bam', pretrained, **bam_resnet_args(Bottleneck, (3, 4, 6, 3), base_width=128, **kwargs))


@register_model
def wide_resnet101_2_bam(pretrained: bool = False, **kwargs) -> AttentionResNet:
    """Wide ResNet-101-2 with BAM after layer1-3."""
    return _create_resnet_attn(
        'wide_resnet101_2_bam', pretrained, **bam_resnet_args(Bottleneck, (3, 4, 23, 3), base_width=128, **kwargs))


@register_model
def resnext50_32x4d_bam(pretrained: bool = False, **kwargs) -> AttentionResNet:
    """ResNeXt-50 32x4d with BAM after layer1-3."""
    return _create_resnet_attn(
        'resnext50_32x4d_bam', pretrained,
        **bam_resnet_args(Bottleneck, (3, 4, 6, 3), cardinality=32, base_width=4, **kwargs))


@register_model
def resnext101_32x4d_bam(pretrained: bool = False, **kwargs) -> AttentionResNet:
    """ResNeXt-101 32x4d with BAM after layer1-3."""
    return _create_resnet_attn(
        'resnext101_32x4d_bam', pretrained,
        **bam_resnet_args(Bottleneck, (3, 4, 23, 3), cardinality=32, base_width=4, **kwargs))


@register_model
def resnext101_32x8d_bam(pretrained: bool = False, **kwargs) -> AttentionResNet:
    """ResNeXt-101 32x8d with BAM after layer1-3."""
    return _create_resnet_attn(
        'resnext101_32x8d_bam', pretrained,
        **bam_resnet_args(Bottleneck, (3, 4, 23, 3), cardinality=32, base_width=8, **kwargs))


@register_model
def resnet18_cbam(pretrained: bool = False, **kwargs) -> AttentionResNet:
    """ResNet-18 with CBAM in every block."""
    return _create_resnet_attn('resnet18_cbam', pretrained, **cbam_resnet_args(BasicBlock, (2, 2, 2, 2), **kwargs))


@register_model
def resnet34_cbam(pretrained: bool = False, **kwargs) -> AttentionResNet:
    """ResNet-34 with CBAM in every block."""
    return _create_resnet_attn('resnet34_cbam', pretrained, **cbam_resnet_args(BasicBlock, (3, 4, 6, 3), **kwargs))


@register_model
def resnet50_cbam(pretrained: bool = False, **kwargs) -> AttentionResNet:
    """ResNet-50 with CBAM in every block (the authors' ImageNet architecture)."""
    return _create_resnet_attn('resnet50_cbam', pretrained, **cbam_resnet_args(Bottleneck, (3, 4, 6, 3), **kwargs))


@register_model
def resnet101_cbam(pretrained: bool = False, **kwargs) -> AttentionResNet:
    """ResNet-101 with CBAM in every block."""
    return _create_resnet_attn('resnet101_cbam', pretrained, **cbam_resnet_args(Bottleneck, (3, 4, 23, 3), **kwargs))


@register_model
def resnet152_cbam(pretrained: bool = False, **kwargs) -> AttentionResNet:
    """ResNet-152 with CBAM in every block."""
    return _create_resnet_attn('resnet152_cbam', pretrained, **cbam_resnet_args(Bottleneck, (3, 8, 36, 3), **kwargs))


@register_model
def wide_resnet50_2_cbam(pretrained: bool = False, **kwargs) -> AttentionResNet:
    """Wide ResNet-50-2 with CBAM in every block."""
    return _create_resnet_attn(
        'wide_resnet50_2_cbam', pretrained, **cbam_resnet_args(Bottleneck, (3, 4, 6, 3), base_width=128, **kwargs))


@register_model
def resnext50_32x4d_cbam(pretrained: bool = False, **kwargs) -> AttentionResNet:
    """ResNeXt-50 32x4d with CBAM in every block."""
    return _create_resnet_attn(
        'resnext50_32x4d_cbam', pretrained,
        **cbam_resnet_args(Bottleneck, (3, 4, 6, 3), cardinality=32, base_width=4, **kwargs))


@register_model
def resnext101_32x8d_cbam(pretrained: bool = False, **kwargs) -> AttentionResNet:
    """ResNeXt-101 32x8d with CBAM in every block."""
    return _create_resnet_attn(
        'resnext101_32x8d_cbam', pretrained,
        **cbam_resnet_args(Bottleneck, (3, 4, 23, 3), cardinality=32, base_width=8, **kwargs))


@register_model
def wide_resnet101_2_cbam(pretrained: bool = False, **kwargs) -> AttentionResNet:
    """Wide ResNet-101-2 with CBAM in every block."""
    return _create_resnet_attn(
        'wide_resnet101_2_cbam', pretrained, **cbam_resnet_args(Bottleneck, (3, 4, 23, 3), base_width=128, **kwargs))


@register_model
def resnext101_32x4d_cbam(pretrained: bool = False, **kwargs) -> AttentionResNet:
    """ResNeXt-101 32x4d with CBAM in every block."""
    return _create_resnet_attn(
        'resnext101_32x4d_cbam', pretrained,
        **cbam_resnet_args(Bottleneck, (3, 4, 23, 3), cardinality=32, base_width=4, **kwargs))


@register_model
def wide_resnet18_150(pretrained: bool = False, **kwargs) -> AttentionResNet:
    """WideResNet-18 (widen 1.5) of the BAM and CBAM papers, without attention (their baseline)."""
    return _create_resnet_attn(
        'wide_resnet18_150', pretrained, block=BasicBlock, layers=(2, 2, 2, 2), channels=WIDE18_150_CHANNELS, **kwargs)


@register_model
def wide_resnet18_200(pretrained: bool = False, **kwargs) -> AttentionResNet:
    """WideResNet-18 (widen 2.0) of the BAM and CBAM papers, without attention (their baseline)."""
    return _create_resnet_attn(
        'wide_resnet18_200', pretrained, block=BasicBlock, layers=(2, 2, 2, 2), channels=WIDE18_200_CHANNELS, **kwargs)


@register_model
def wide_resnet18_150_bam(pretrained: bool = False, **kwargs) -> AttentionResNet:
    """WideResNet-18 (widen 1.5) with BAM after layer1-3."""
    return _create_resnet_attn(
        'wide_resnet18_150_bam', pretrained,
        **bam_resnet_args(BasicBlock, (2, 2, 2, 2), channels=WIDE18_150_CHANNELS, **kwargs))


@register_model
def wide_resnet18_200_bam(pretrained: bool = False, **kwargs) -> AttentionResNet:
    """WideResNet-18 (widen 2.0) with BAM after layer1-3."""
    return _create_resnet_attn(
        'wide_resnet18_200_bam', pretrained,
        **bam_resnet_args(BasicBlock, (2, 2, 2, 2), channels=WIDE18_200_CHANNELS, **kwargs))


@register_model
def wide_resnet18_150_cbam(pretrained: bool = False, **kwargs) -> AttentionResNet:
    """WideResNet-18 (widen 1.5) with CBAM in every block."""
    return _create_resnet_attn(
        'wide_resnet18_150_cbam', pretrained,
        **cbam_resnet_args(BasicBlock, (2, 2, 2, 2), channels=WIDE18_150_CHANNELS, **kwargs))


@register_model
def wide_resnet18_200_cbam(pretrained: bool = False, **kwargs) -> AttentionResNet:
    """WideResNet-18 (widen 2.0) with CBAM in every block."""
    return _create_resnet_attn(
        'wide_resnet18_200_cbam', pretrained,
        **cbam_resnet_args(BasicBlock, (2, 2, 2, 2), channels=WIDE18_200_CHANNELS, **kwargs))

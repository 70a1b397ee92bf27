""" Convolutional Block Attention Module (CBAM)

Woo, Park, Lee, Kweon, "CBAM: Convolutional Block Attention Module", ECCV 2018 (arXiv:1807.06521).

The default is the architecture of the authors' released ImageNet weights: a channel gate (average- and
max-pooled descriptors through one shared MLP with biases, summed, sigmoid) followed by a spatial gate
(channel-wise [max, mean] -> 7x7 conv without bias -> BatchNorm -> sigmoid). The authors' code stacks the max map
first while the paper writes the mean first; we keep the released order so their weights load unchanged.

Every option of the authors' `CBAM(gate_channels, reduction_ratio, pool_types, no_spatial)` and every row of the
paper's ImageNet ablations (its Tables 1-3) is an argument here: `pool_types`, `no_spatial` (channel attention
alone), `no_channel` (spatial attention alone), `spatial_descriptor` ('pool' or the learned 1x1 'conv'),
`spatial_kernel_size` (3 or 7) and `arrangement`. The fused gating (`fused_gates.cbam_refine`) covers the
default configuration only; every other one runs the plain formulas of `gating_reference` (`CBAM.path` says
which).

timm's `CbamModule` is the same idea with the spatial maps stacked [mean, max], no MLP biases by default and
the default BN momentum, so its weights do not transfer without swapping the 7x7 conv's two input channels.
"""
from typing import List, Optional, Sequence, Type

import torch
import torch.nn as nn
import torch.nn.functional as F

from timm.layers import make_divisible, register_notrace_module

from .bounds import CBAM_BOUNDS, check_bounds
from .config import exporting, use_fused_gating, use_gate_ops
from .fused_gates import cbam_op_config, cbam_refine, cbam_refine_compiled, has_forward_hooks, takes_norm
from .gating_reference import (
    CBAM_POOL_TYPES, cbam_channel_descriptors, cbam_channel_weights_for_export, cbam_spatial_descriptors,
    mlp_pool_sum,
)
from .gating_tuning import tuning_for

__all__ = ['CBAM', 'CBAM_ARRANGEMENTS', 'CBAM_SPATIAL_DESCRIPTORS', 'CbamChannelGate', 'CbamSpatialGate']

CBAM_ARRANGEMENTS = ('channel_first', 'spatial_first', 'parallel')
CBAM_SPATIAL_DESCRIPTORS = ('pool', 'conv')
_RELEASED_POOLS = ('avg', 'max')


class CbamChannelGate(nn.Module):
    """Channel weights sigmoid(sum over `pool_types` of MLP(Pool(x))), shape (B, C, 1, 1)."""

    def __init__(
            self,
            channels: int,
            rd_channels: int,
            act_layer: Type[nn.Module] = nn.ReLU,
            mlp_bias: bool = True,
            pool_types: Sequence[str] = _RELEASED_POOLS,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.pool_types: List[str] = list(pool_types)  # a list: TorchScript iterates it
        # the released [avg, max] exports as global pools through the MLP's 1x1 convolutions
        self.released_pools = tuple(pool_types) == _RELEASED_POOLS
        self.fc1 = nn.Conv2d(channels, rd_channels, 1, bias=mlp_bias, **dd)
        self.act = act_layer(inplace=True)
        self.fc2 = nn.Conv2d(rd_channels, channels, 1, bias=mlp_bias, **dd)

    def forward(self, x: Optional[torch.Tensor] = None, pooled: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Mc(F) for the feature map `x`, or from `pooled`, its (len(pool_types) * B, C) stack of descriptors in
        `pool_types` order (`from_pooled`): exactly one of the two. Both go through the module call, so forward
        hooks see the weights either way."""
        if pooled is None:
            assert x is not None, 'CbamChannelGate needs the feature map x or its pooled descriptors'
            if self.released_pools and not torch.jit.is_scripting() and exporting():
                return cbam_channel_weights_for_export(x, self.fc1, self.act, self.fc2)
            pooled = cbam_channel_descriptors(x, self.pool_types)
        else:
            assert x is None, 'CbamChannelGate takes the feature map x or its pooled descriptors, not both'
        # every descriptor goes through the shared MLP as one batch, and the 1x1 convs on pooled vectors run as
        # plain matrix products (same weights, no convolution dispatch)
        hidden = self.act(F.linear(pooled, self.fc1.weight.flatten(1), self.fc1.bias))
        return mlp_pool_sum(F.linear(hidden, self.fc2.weight.flatten(1), self.fc2.bias), len(self.pool_types))

    @torch.jit.unused
    def from_pooled(self, pooled: torch.Tensor) -> torch.Tensor:
        """Mc from the stacked descriptors over H, W, which the fused node computes itself ([mean; max])."""
        return self(pooled=pooled)

    def extra_repr(self) -> str:
        return f'pool_types={tuple(self.pool_types)}'


class CbamSpatialGate(nn.Module):
    """Spatial weights sigmoid(BN(conv_kxk(D(x)))), shape (B, 1, H, W), where the descriptor D(x) is the authors'
    [max over C, mean over C] ('pool') or a learned 1x1 convolution to one map ('conv', the paper's spatial
    ablation); the BN after the kxk conv absorbs any offset, so neither conv has a bias."""

    def __init__(
            self,
            kernel_size: int = 7,
            bn_momentum: float = 0.01,
            descriptor: str = 'pool',
            channels: Optional[int] = None,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.descriptor = descriptor
        self.reduce = nn.Conv2d(channels, 1, 1, bias=False, **dd) if descriptor == 'conv' else None
        self.conv = nn.Conv2d(2 if self.reduce is None else 1, 1, kernel_size, padding=kernel_size // 2, bias=False,
                              **dd)
        self.bn = nn.BatchNorm2d(1, momentum=bn_momentum, **dd)

    def forward(self, x: Optional[torch.Tensor] = None, pooled: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Ms(F') for the channel-refined map `x`, or from `pooled`, its (B, 2, H, W) stack [max over C, mean over
        C] (`from_pooled`, 'pool' descriptor only): exactly one of the two. Both go through the module call, so
        forward hooks see the weights either way."""
        if pooled is None:
            assert x is not None, 'CbamSpatialGate needs the feature map x or its pooled descriptors'
            pooled = cbam_spatial_descriptors(x) if self.reduce is None else self.reduce(x)
        else:
            assert x is None, 'CbamSpatialGate takes the feature map x or its pooled descriptors, not both'
        return torch.sigmoid(self.bn(self.conv(pooled)))

    @torch.jit.unused
    def from_pooled(self, pooled: torch.Tensor) -> torch.Tensor:
        """Ms from the (B, 2, H, W) [max, mean] over channels, which the fused node computes itself."""
        return self(pooled=pooled)

    def extra_repr(self) -> str:
        return f'descriptor={self.descriptor!r}'


def _check_options(pool_types: Sequence[str], spatial_descriptor: str, arrangement: str, spatial_kernel_size: int,
                   no_channel: bool, no_spatial: bool) -> None:
    if not pool_types or any(p not in CBAM_POOL_TYPES for p in pool_types) or len(set(pool_types)) < len(pool_types):
        raise ValueError(f"CBAM pool_types must be a non-empty subset of {CBAM_POOL_TYPES}, got {pool_types!r}")
    if spatial_descriptor not in CBAM_SPATIAL_DESCRIPTORS:
        raise ValueError(f"CBAM spatial_descriptor must be one of {CBAM_SPATIAL_DESCRIPTORS}, "
                         f"got {spatial_descriptor!r}")
    if arrangement not in CBAM_ARRANGEMENTS:
        raise ValueError(f"CBAM arrangement must be one of {CBAM_ARRANGEMENTS}, got {arrangement!r}")
    if spatial_kernel_size < 1 or spatial_kernel_size % 2 == 0:
        raise ValueError(f"CBAM spatial_kernel_size must be odd and positive, got {spatial_kernel_size}")
    if no_channel and no_spatial:
        raise ValueError('CBAM needs at least one gate: no_channel and no_spatial cannot both be True')


@register_notrace_module  # its training path is one autograd function, which FX cannot trace into
class CBAM(nn.Module):
    """Convolutional Block Attention Module: a channel gate and a spatial gate, each multiplied into x.

    Args:
        channels: input (= output) channels C.
        rd_ratio: hidden width ratio of the channel MLP (paper: 1/16; the authors' `reduction_ratio` = 1 / this).
        rd_channels: explicit hidden width, overrides `rd_ratio`.
        rd_divisor: hidden width is rounded to a multiple of this (and never below it, so C < 16 works).
        spatial_kernel_size: kernel of the spatial gate's convolution (paper: 7; its ablation also 3).
        act_layer: activation inside the channel MLP.
        mlp_bias: biases in the channel MLP (the authors' weights have them).
        spatial_bn_momentum: momentum of the spatial gate's BN (authors: 0.01).
        pool_types: the channel gate's descriptors, any non-empty subset of 'avg', 'max', 'lp', 'lse' (the
            authors' `pool_types`; the paper's channel ablation compares avg, max and avg & max).
        no_spatial: channel gate alone (the authors' `no_spatial=True`).
        no_channel: spatial gate alone.
        spatial_descriptor: 'pool', the authors' [max, mean] over channels, or 'conv', a learned 1x1
            convolution to one map (the paper's spatial ablation, "1x1 conv" rows).
        arrangement: the paper's arrangement ablation (its Section 4.1, Table 3). 'channel_first' follows its
            Eq. 1, F' = Mc(F) * F, F'' = Ms(F') * F', the released module; 'spatial_first' is the "sequential
            spatial-channel" row, the same two steps in the other order, F' = Ms(F) * F, F'' = Mc(F') * F';
            'parallel' is the "channel and spatial in parallel" row: both gates see the same F, and as each is
            multiplied into its input in the sequential forms, both are multiplied into F:
            F'' = Mc(F) * Ms(F) * F (the paper gives the parallel combination no equation of its own).
        inplace: write the output over the input when autograd records nothing (inference), saving a full-size
            allocation; for a CBAM whose input nothing else reads, as a block's last BN output (the zoo's
            models set it).
        fused: True / False runs this module with / without the fused gating whatever the process-wide switch
            says (`bam_models.layers.set_fused_gating`); None (default) follows the switch. The fused gating
            covers the released configuration only (`path` says which one a module takes).

    The numeric arguments are checked against `BOUNDS` (`bam_models.layers.bounds`).
    """
    BOUNDS = CBAM_BOUNDS

    def __init__(
            self,
            channels: int,
            rd_ratio: float = 1. / 16,
            rd_channels: Optional[int] = None,
            rd_divisor: int = 1,
            spatial_kernel_size: int = 7,
            act_layer: Type[nn.Module] = nn.ReLU,
            mlp_bias: bool = True,
            spatial_bn_momentum: float = 0.01,
            pool_types: Sequence[str] = _RELEASED_POOLS,
            no_spatial: bool = False,
            no_channel: bool = False,
            spatial_descriptor: str = 'pool',
            arrangement: str = 'channel_first',
            inplace: bool = False,
            fused: Optional[bool] = None,
            device=None,
            dtype=None,
    ):
        super().__init__()
        pool_types = tuple(pool_types)
        check_bounds('CBAM', self.BOUNDS, dict(rd_ratio=rd_ratio, rd_channels=rd_channels, rd_divisor=rd_divisor,
                                              spatial_kernel_size=spatial_kernel_size,
                                              spatial_bn_momentum=spatial_bn_momentum))
        _check_options(pool_types, spatial_descriptor, arrangement, spatial_kernel_size, no_channel, no_spatial)
        dd = {'device': device, 'dtype': dtype}
        if rd_channels is None:
            rd_channels = make_divisible(channels * rd_ratio, rd_divisor, round_limit=0.)
        self.channels = channels
        self.rd_channels = rd_channels
        self.arrangement = arrangement
        self.inplace = inplace
        self.fused = fused
        self.channel_gate = None if no_channel else CbamChannelGate(
            channels, rd_channels, act_layer=act_layer, mlp_bias=mlp_bias, pool_types=pool_types, **dd)
        self.spatial_gate = None if no_spatial else CbamSpatialGate(
            spatial_kernel_size, bn_momentum=spatial_bn_momentum, descriptor=spatial_descriptor, channels=channels,
            **dd)
        # the fused node computes [mean; max] over H, W and [max; mean] over C itself, channel gate first
        self.fusable = (self.channel_gate is not None and self.spatial_gate is not None
                        and pool_types == _RELEASED_POOLS and spatial_descriptor == 'pool'
                        and arrangement == 'channel_first')
        self.init_weights()

    @property
    def path(self) -> str:
        """'fused' or 'reference': what `forward` runs for this module now, given its configuration and the fused
        gating switch (scripting and empty batches always take the reference formulas)."""
        return 'fused' if self.fusable and use_fused_gating(self.fused) else 'reference'

    @torch.jit.ignore
    def init_weights(self) -> None:
        """The authors' init: default-initialised MLP with zero biases, kaiming-normal (fan_out) spatial conv,
        spatial BN weight zero so that every spatial map starts at sigmoid(0) = 0.5."""
        if self.spatial_gate is not None:
            nn.init.kaiming_normal_(self.spatial_gate.conv.weight, mode='fan_out')
            nn.init.zeros_(self.spatial_gate.bn.weight)
            nn.init.zeros_(self.spatial_gate.bn.bias)
        if self.channel_gate is not None:
            for fc in (self.channel_gate.fc1, self.channel_gate.fc2):
                if fc.bias is not None:
                    nn.init.zeros_(fc.bias)

    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        """The plain formulas (`gating_reference`), differentiated by autograd itself, in `arrangement` order."""
        if self.channel_gate is None:
            assert self.spatial_gate is not None
            return x * self.spatial_gate(x)
        if self.spatial_gate is None:
            return x * self.channel_gate(x)
        if self.arrangement == 'parallel':
            return x * self.channel_gate(x) * self.spatial_gate(x)
        if self.arrangement == 'spatial_first':
            refined = x * self.spatial_gate(x)
            return refined * self.channel_gate(refined)
        refined = x * self.channel_gate(x)
        return refined * self.spatial_gate(refined)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting() or not self.fusable or x.shape[0] == 0:
            # an empty batch has nothing to save memory on
            return self.forward_reference(x)
        if use_fused_gating(self.fused):
            return self._forward_fused(x)
        if use_gate_ops(self.fused):
            return self._forward_op(x)
        return self.forward_reference(x)

    @torch.jit.unused
    def forward_after_norm(self, x: torch.Tensor, norm: nn.Module) -> torch.Tensor:
        """`self(norm(x))`, for the BatchNorm whose output only this CBAM reads (a residual block's last). In an
        eager training step on the fused path, with `norm` a training-mode BatchNorm2d, one autograd node applies
        the norm too and keeps x for backward, which BatchNorm keeps anyway, instead of norm(x) besides it: one
        full-size tensor fewer per block; outputs, gradients and running statistics are BatchNorm's up to float
        rounding. Forward hooks on either module keep both calls, so that the hooks run and see what they would
        see."""
        fx_tracing = isinstance(x, torch.fx.Proxy)  # FX records norm and this module as calls, as in the block
        if (not fx_tracing and torch.is_grad_enabled() and self.path == 'fused' and x.shape[0] > 0
                and not has_forward_hooks(self) and takes_norm(x, norm)):
            return cbam_refine(x, self.channel_gate, self.spatial_gate, tuning=tuning_for(x.device), norm=norm)
        return self(norm(x))

    @torch.jit.unused
    def _forward_op(self, x: torch.Tensor) -> torch.Tensor:
        """Under torch.compile: the whole refinement, small networks included, as the custom op
        `bam_models::cbam_refine`, so the compiled step keeps only what the eager node keeps; gates the op has no
        template for take the plain formulas."""
        config = cbam_op_config(self.channel_gate, self.spatial_gate)
        if config is None:
            return self.forward_reference(x)
        return cbam_refine_compiled(x, self.channel_gate, self.spatial_gate, config)

    @torch.jit.unused
    def _forward_fused(self, x: torch.Tensor) -> torch.Tensor:
        return cbam_refine(x, self.channel_gate, self.spatial_gate, self.inplace, tuning_for(x.device))

    def extra_repr(self) -> str:
        return (f'channels={self.channels}, rd_channels={self.rd_channels}, arrangement={self.arrangement!r}, '
                f'inplace={self.inplace}' + ('' if self.fused is None else f', fused={self.fused}'))

""" Convolutional Block Attention Module (CBAM)

Woo, Park, Lee, Kweon, "CBAM: Convolutional Block Attention Module", ECCV 2018 (arXiv:1807.06521).

This is the architecture of the authors' released ImageNet weights: a channel gate (average- and max-pooled
descriptors through one shared MLP with biases, summed, sigmoid) followed by a spatial gate (channel-wise
[max, mean] -> 7x7 conv without bias -> BatchNorm -> sigmoid). The authors' code stacks the max map first
while the paper writes the mean first; we keep the released order so their weights load unchanged.

timm's `CbamModule` is the same idea with the spatial maps stacked [mean, max], no MLP biases by default and
the default BN momentum, so its weights do not transfer without swapping the 7x7 conv's two input channels.
"""
from typing import Optional, Type

import torch
import torch.nn as nn
import torch.nn.functional as F

from timm.layers import make_divisible, register_notrace_module

from .config import exporting, use_fused_gating
from .fused_gates import cbam_refine
from .gating_reference import (
    cbam_channel_descriptors, cbam_channel_weights_for_export, cbam_spatial_descriptors, mlp_pool_sum,
)
from .gating_tuning import tuning_for

__all__ = ['CBAM', 'CbamChannelGate', 'CbamSpatialGate']


class CbamChannelGate(nn.Module):
    """Channel weights sigmoid(MLP(avgpool(x)) + MLP(maxpool(x))), shape (B, C, 1, 1)."""

    def __init__(
            self,
            channels: int,
            rd_channels: int,
            act_layer: Type[nn.Module] = nn.ReLU,
            mlp_bias: bool = True,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.fc1 = nn.Conv2d(channels, rd_channels, 1, bias=mlp_bias, **dd)
        self.act = act_layer(inplace=True)
        self.fc2 = nn.Conv2d(rd_channels, channels, 1, bias=mlp_bias, **dd)

    def forward(self, x: Optional[torch.Tensor] = None, pooled: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Mc(F) for the feature map `x`, or from `pooled`, its (2B, C) stack [mean over H, W; max over H, W]
        (`from_pooled`): exactly one of the two. Both go through the module call, so forward hooks see the
        weights either way."""
        if pooled is None:
            assert x is not None, 'CbamChannelGate needs the feature map x or its pooled descriptors'
            if not torch.jit.is_scripting() and exporting():
                return cbam_channel_weights_for_export(x, self.fc1, self.act, self.fc2)
            pooled = cbam_channel_descriptors(x)
        else:
            assert x is None, 'CbamChannelGate takes the feature map x or its pooled descriptors, not both'
        # both descriptors go through the shared MLP as one batch, and the 1x1 convs on pooled vectors run as
        # plain matrix products (same weights, no convolution dispatch)
        hidden = self.act(F.linear(pooled, self.fc1.weight.flatten(1), self.fc1.bias))
        return mlp_pool_sum(F.linear(hidden, self.fc2.weight.flatten(1), self.fc2.bias))

    @torch.jit.unused
    def from_pooled(self, pooled: torch.Tensor) -> torch.Tensor:
        """Mc from the (2B, C) [mean; max] over H, W, which the fused node computes itself."""
        return self(pooled=pooled)


class CbamSpatialGate(nn.Module):
    """Spatial weights sigmoid(BN(conv7x7([max_c(x), mean_c(x)]))), shape (B, 1, H, W)."""

    def __init__(
            self,
            kernel_size: int = 7,
            bn_momentum: float = 0.01,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=False, **dd)
        self.bn = nn.BatchNorm2d(1, momentum=bn_momentum, **dd)

    def forward(self, x: Optional[torch.Tensor] = None, pooled: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Ms(F') for the channel-refined map `x`, or from `pooled`, its (B, 2, H, W) stack [max over C, mean over
        C] (`from_pooled`): exactly one of the two. Both go through the module call, so forward hooks see the
        weights either way."""
        if pooled is None:
            assert x is not None, 'CbamSpatialGate needs the feature map x or its pooled descriptors'
            pooled = cbam_spatial_descriptors(x)
        else:
            assert x is None, 'CbamSpatialGate takes the feature map x or its pooled descriptors, not both'
        return torch.sigmoid(self.bn(self.conv(pooled)))

    @torch.jit.unused
    def from_pooled(self, pooled: torch.Tensor) -> torch.Tensor:
        """Ms from the (B, 2, H, W) [max, mean] over channels, which the fused node computes itself."""
        return self(pooled=pooled)


@register_notrace_module  # its training path is one autograd function, which FX cannot trace into
class CBAM(nn.Module):
    """Convolutional Block Attention Module: channel gate, then spatial gate, each multiplied into x.

    Args:
        channels: input (= output) channels C.
        rd_ratio: hidden width ratio of the channel MLP (paper: 1/16).
        rd_channels: explicit hidden width, overrides `rd_ratio`.
        rd_divisor: hidden width is rounded to a multiple of this (and never below it, so C < 16 works).
        spatial_kernel_size: kernel of the spatial gate's convolution (paper: 7).
        act_layer: activation inside the channel MLP.
        mlp_bias: biases in the channel MLP (the authors' weights have them).
        spatial_bn_momentum: momentum of the spatial gate's BN (authors: 0.01).
        inplace: write the output over the input when autograd records nothing (inference), saving a full-size
            allocation; for a CBAM whose input nothing else reads, as a block's last BN output (the zoo's
            models set it).
        fused: True / False runs this module with / without the fused gating whatever the process-wide switch
            says (`bam_models.layers.set_fused_gating`); None (default) follows the switch.
    """

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
            inplace: bool = False,
            fused: Optional[bool] = None,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        if rd_channels is None:
            rd_channels = make_divisible(channels * rd_ratio, rd_divisor, round_limit=0.)
        self.channels = channels
        self.rd_channels = rd_channels
        self.inplace = inplace
        self.fused = fused
        self.channel_gate = CbamChannelGate(channels, rd_channels, act_layer=act_layer, mlp_bias=mlp_bias, **dd)
        self.spatial_gate = CbamSpatialGate(spatial_kernel_size, bn_momentum=spatial_bn_momentum, **dd)
        self.init_weights()

    @torch.jit.ignore
    def init_weights(self) -> None:
        """The authors' init: default-initialised MLP with zero biases, kaiming-normal (fan_out) spatial conv,
        spatial BN weight zero so that every spatial map starts at sigmoid(0) = 0.5."""
        nn.init.kaiming_normal_(self.spatial_gate.conv.weight, mode='fan_out')
        nn.init.zeros_(self.spatial_gate.bn.weight)
        nn.init.zeros_(self.spatial_gate.bn.bias)
        for fc in (self.channel_gate.fc1, self.channel_gate.fc2):
            if fc.bias is not None:
                nn.init.zeros_(fc.bias)

    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        """The plain formulas (`gating_reference`), differentiated by autograd itself: F' = Mc(F) * F,
        F'' = Ms(F') * F'."""
        refined = x * self.channel_gate(x)
        return refined * self.spatial_gate(refined)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting() or not use_fused_gating(self.fused) or x.shape[0] == 0:
            # an empty batch has nothing to save memory on
            return self.forward_reference(x)
        return self._forward_fused(x)

    @torch.jit.unused
    def _forward_fused(self, x: torch.Tensor) -> torch.Tensor:
        return cbam_refine(x, self.channel_gate, self.spatial_gate, self.inplace, tuning_for(x.device))

    def extra_repr(self) -> str:
        return (f'channels={self.channels}, rd_channels={self.rd_channels}, inplace={self.inplace}'
                + ('' if self.fused is None else f', fused={self.fused}'))

""" Bottleneck Attention Module (BAM)

Park, Woo, Lee, Kweon, "BAM: Bottleneck Attention Module", BMVC 2018 (arXiv:1807.06514).

The default configuration is the architecture of the authors' released ImageNet weights, which differs from
the paper's equation: the two branches are combined by an element-wise PRODUCT, `F * (1 + sigmoid(Mc * Ms))`,
and neither branch ends in BatchNorm. `fusion="sum"` gives the paper's `sigmoid(BN(Mc) + BN(Ms))`, and
`fusion="max"` the max-combination of the paper's ablation (also with a closing BN per branch, as there).
`gates="channel"` / `gates="spatial"` keep a single branch, as in the paper's Table 1 ablations.
"""
import contextlib
from collections import OrderedDict
from typing import Optional, Type

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.fusion import fuse_conv_bn_eval
from torch.utils.checkpoint import checkpoint

from timm.layers import make_divisible, register_notrace_module

from bam_models.errors import UsageError

from .bounds import BAM_BOUNDS, check_bounds
from .config import exporting, use_fused_gating, use_gate_ops
from .fused_gates import bam_op_config, bam_refine, bam_refine_compiled, bam_single_branch
from .gating_reference import bam_attention_logits, bam_refine_reference
from .gating_tuning import choose_kernel, tuning_for

__all__ = ['BAM', 'BamChannelGate', 'BamSpatialGate', 'DilatedConv2d', 'GateBatchNorm2d', 'space_to_batch_conv2d']

_FUSIONS = ('product', 'sum', 'max')
_GATES = ('both', 'channel', 'spatial')


@register_notrace_module  # the single-value check depends on the input shape, which FX cannot trace
class GateBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d for globally pooled (B, C, 1, 1) gate activations that also trains at batch size 1.

    A pooled batch of one sample holds a single value per channel, where batch statistics are undefined
    (plain BatchNorm raises "Expected more than 1 value per channel when training"). Detection and
    segmentation fine-tuning routinely runs at one image per device, so for such a batch this layer
    normalises with its running statistics, exactly as in eval mode, and leaves them untouched. With two or
    more values per channel it is an ordinary BatchNorm2d: same state dict, same numerics, and still an
    instance of nn.BatchNorm2d, so `timm.layers.freeze_batch_norm_2d`, SyncBatchNorm conversion and
    torchvision's FrozenBatchNorm2d replacement cover it.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        use_batch_stats = not self.track_running_stats
        if self.training and not use_batch_stats:
            # a bool also for symbolic shapes (the compiled BAM op's backward traces this), which F.batch_norm needs
            use_batch_stats = bool(x.shape[0] * x.shape[2] * x.shape[3] > 1)
        momentum = 0.0 if self.momentum is None else self.momentum
        if self.training and use_batch_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                momentum = 1.0 / float(self.num_batches_tracked)
        return F.batch_norm(
            x,
            self.running_mean,
            self.running_var,
            self.weight,
            self.bias,
            use_batch_stats,
            momentum,
            self.eps,
        )


class BamChannelGate(nn.Module):
    """Channel branch Mc: global average pool -> FC -> BN -> ReLU -> FC, giving (B, C, 1, 1) logits.

    The FCs are 1x1 convolutions on the pooled map so every norm is a BatchNorm2d.
    """

    def __init__(
            self,
            channels: int,
            rd_channels: int,
            act_layer: Type[nn.Module] = nn.ReLU,
            out_norm: bool = False,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.fc1 = nn.Conv2d(channels, rd_channels, 1, bias=True, **dd)
        self.bn = GateBatchNorm2d(rd_channels, **dd)
        self.act = act_layer(inplace=True)
        self.fc2 = nn.Conv2d(rd_channels, channels, 1, bias=True, **dd)
        self.bn_out = GateBatchNorm2d(channels, **dd) if out_norm else nn.Identity()

    def forward(self, x: Optional[torch.Tensor] = None, pooled: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Mc(F) for the feature map `x`, or from its (B, C) average `pooled` over H, W (`from_pooled`): exactly one
        of the two. Both go through the module call, so forward hooks see the logits either way."""
        if pooled is None:
            assert x is not None, 'BamChannelGate needs the feature map x or its pooled (B, C) mean'
            if not torch.jit.is_scripting() and exporting():
                return self._forward_for_export(x)
            # pooled over both dims: any H != W, no size-derived kernel
            pooled = x.mean((2, 3))
        else:
            assert x is None, 'BamChannelGate takes the feature map x or its pooled mean, not both'
        batch, rd_channels = pooled.shape[0], self.fc1.out_channels
        # the 1x1 convs on pooled vectors run as plain matrix products (same weights, no convolution dispatch)
        hidden = F.linear(pooled, self.fc1.weight.flatten(1), self.fc1.bias).view(batch, rd_channels, 1, 1)
        hidden = self.act(self.bn(hidden))
        logits = F.linear(hidden.flatten(1), self.fc2.weight.flatten(1), self.fc2.bias)
        return self.bn_out(logits.view(batch, self.fc2.out_channels, 1, 1))

    @torch.jit.unused
    def _forward_for_export(self, x: torch.Tensor) -> torch.Tensor:
        """The same Mc as a (B, C, 1, 1) pool and 1x1 convolutions: the pool becomes ONNX's GlobalAveragePool
        (`export.export_onnx`) and each BatchNorm follows a convolution that runtimes fold it into."""
        hidden = self.act(self.bn(self.fc1(x.mean((2, 3), keepdim=True))))
        return self.bn_out(self.fc2(hidden))

    @torch.jit.ignore
    def fuse(self) -> 'BamChannelGate':
        """For inference (timm's `reparameterize_model` convention): the BatchNorms folded into the 1x1
        convolutions before them, in place; the same Mc in eval mode, one pass fewer per norm."""
        _fold(self, 'fc1', 'bn')
        _fold(self, 'fc2', 'bn_out')
        return self

    @torch.jit.unused
    def from_pooled(self, pooled: torch.Tensor) -> torch.Tensor:
        """Mc from the (B, C) mean of the feature map over H, W, which the fused node computes itself."""
        return self(pooled=pooled)


def _fold(module: nn.Module, conv_name: str, norm_name: str) -> None:
    """Fold the eval-mode BatchNorm `norm_name` of `module` into the convolution `conv_name` before it, leaving an
    nn.Identity in its place."""
    conv, norm = getattr(module, conv_name), getattr(module, norm_name)
    if not isinstance(norm, nn.BatchNorm2d):
        return
    if module.training:
        raise UsageError(f"{type(module).__name__}.fuse() folds BatchNorm running statistics for inference; call "
                         f"model.eval() first (timm.utils.reparameterize_model on an eval-mode model)")
    setattr(module, conv_name, fuse_conv_bn_eval(conv, norm))
    setattr(module, norm_name, nn.Identity())


def space_to_batch_conv2d(
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: Optional[torch.Tensor],
        dilation: int,
) -> torch.Tensor:
    """A 3x3 convolution with dilation d and padding d, computed as an undilated 3x3 convolution (padding 1)
    over the d x d interleaved sub-images of x stacked along the batch.

    Output pixel (i, j) of a dilated 3x3 kernel reads only pixels congruent to (i, j) modulo d, which form one
    sub-image in which those taps are adjacent. Zero-padding H and W up to multiples of d adds only zeros the
    dilated convolution would read as padding, so the result is the same sum of the same products.
    """
    batch, channels, height, width = x.shape
    d = dilation
    sub_h, sub_w = (height + d - 1) // d, (width + d - 1) // d
    x = F.pad(x, (0, sub_w * d - width, 0, sub_h * d - height))
    x = x.view(batch, channels, sub_h, d, sub_w, d).permute(0, 3, 5, 1, 2, 4)
    x = x.reshape(batch * d * d, channels, sub_h, sub_w)
    y = F.conv2d(x, weight, bias, padding=1)
    out_channels = y.shape[1]
    y = y.view(batch, d, d, out_channels, sub_h, sub_w).permute(0, 3, 4, 1, 5, 2)
    return y.reshape(batch, out_channels, sub_h * d, sub_w * d)[:, :, :height, :width]


@register_notrace_module  # the path depends on the input shape, which FX cannot trace
class DilatedConv2d(nn.Conv2d):
    """The spatial gate's 3x3 convolution with dilation d and padding d, an nn.Conv2d with the same parameters.

    With the fused gating on, where ATen would run it through a slow kernel (on CPU its native dilated kernel for
    small batch-1 inputs), it runs as an undilated convolution over space-to-batch sub-images instead
    (`space_to_batch_conv2d`): the same sums, several times faster there. Which form runs for a shape is measured
    at first use (`gating_tuning.choose_kernel`), else taken from `gating_tuning.TUNING`. With the fused gating
    off, and for scripting, tracing, export and compilation, it is the plain dilated convolution. `fused`
    overrides the process-wide switch for this module (BAM passes its own).
    """

    def __init__(
            self,
            in_channels: int,
            out_channels: int,
            dilation: int,
            bias: bool = True,
            fused: Optional[bool] = None,
            device=None,
            dtype=None,
    ):
        # padding = dilation keeps H x W for a 3x3 kernel at any dilation
        super().__init__(
            in_channels, out_channels, 3, padding=dilation, dilation=dilation, bias=bias, device=device, dtype=dtype)
        self.fused = fused

    @torch.jit.unused
    def _space_to_batch_pays(self, x: torch.Tensor) -> bool:
        # tracing and export must not see a shape-dependent branch, so that check comes first
        if not use_fused_gating(self.fused):
            return False
        default = x.shape[0] == 1 and x.numel() <= tuning_for(x.device).space_to_batch_max_numel
        candidates = {'dilated': self._conv_forward, 'space-to-batch': self._space_to_batch_forward}
        kernel = choose_kernel('bam_dilated_conv3x3', (x, self.weight, self.bias), candidates,
                               'space-to-batch' if default else 'dilated', detail=self.dilation)
        return kernel == 'space-to-batch'

    @torch.jit.unused
    def _space_to_batch_forward(self, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]):
        return space_to_batch_conv2d(x, weight, bias, self.dilation[0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting() and self._space_to_batch_pays(x):
            return self._space_to_batch_forward(x, self.weight, self.bias)
        return self._conv_forward(x, self.weight, self.bias)


@register_notrace_module  # the recompute decision depends on the autograd state, which FX cannot trace
class BamSpatialGate(nn.Sequential):
    """Spatial branch Ms: 1x1 reduce -> `num_dilated` dilated 3x3 convs -> 1x1 to one map, (B, 1, H, W).

    `from_reduced(reduced, recompute=True)` (the fused BAM node, on device kinds where recomputation was measured
    to pay) keeps none of its reduced-width activations after the first convolution for backward: they are
    recomputed from that convolution's output during backward, with the BatchNorm running statistics restored
    after the recomputation so that they are updated exactly once per forward, as without recomputation.
    """

    def __init__(
            self,
            channels: int,
            rd_channels: int,
            dilation: int = 4,
            num_dilated: int = 2,
            act_layer: Type[nn.Module] = nn.ReLU,
            out_norm: bool = False,
            fused: Optional[bool] = None,
            device=None,
            dtype=None,
    ):
        dd = {'device': device, 'dtype': dtype}
        layers = OrderedDict()
        layers['conv_reduce'] = nn.Conv2d(channels, rd_channels, 1, bias=True, **dd)
        layers['bn_reduce'] = nn.BatchNorm2d(rd_channels, **dd)
        layers['act_reduce'] = act_layer(inplace=True)
        for i in range(num_dilated):
            layers[f'conv_dil{i}'] = DilatedConv2d(rd_channels, rd_channels, dilation, bias=True, fused=fused, **dd)
            layers[f'bn_dil{i}'] = nn.BatchNorm2d(rd_channels, **dd)
            layers[f'act_dil{i}'] = act_layer(inplace=True)
        layers['conv_out'] = nn.Conv2d(rd_channels, 1, 1, bias=True, **dd)
        if out_norm:
            layers['bn_out'] = nn.BatchNorm2d(1, **dd)
        super().__init__(layers)

    def forward(self, x: Optional[torch.Tensor] = None, reduced: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Ms(F) for the feature map `x`, or from `reduced`, the output of `conv_reduce` on it (`from_reduced`):
        exactly one of the two. Both go through the module call, so forward hooks see the logits either way."""
        if reduced is None:
            assert x is not None, 'BamSpatialGate needs the feature map x or its 1x1-reduced map'
            reduced = self.conv_reduce(x)
        else:
            assert x is None, 'BamSpatialGate takes the feature map x or its 1x1-reduced map, not both'
        for i, module in enumerate(self):
            if i > 0:
                reduced = module(reduced)
        return reduced

    @torch.jit.ignore
    def fuse(self) -> 'BamSpatialGate':
        """For inference (timm's `reparameterize_model` convention): every BatchNorm folded into the convolution
        before it, in place; the same Ms in eval mode without a pass over each reduced-width map per norm."""
        names = list(self._modules)
        for conv_name, norm_name in zip(names, names[1:]):
            if isinstance(self._modules[conv_name], nn.Conv2d):
                _fold(self, conv_name, norm_name)
        return self

    @torch.jit.unused
    def from_reduced(self, reduced: torch.Tensor, recompute: bool = False) -> torch.Tensor:
        """Ms from the output of `conv_reduce`, which the fused node computes itself; with `recompute`, the
        activations after it are recomputed in backward instead of kept."""
        if recompute and torch.is_grad_enabled():
            return checkpoint(self._call_from_reduced, reduced, use_reentrant=False, context_fn=self._contexts)
        return self(reduced=reduced)

    @torch.jit.unused
    def _call_from_reduced(self, reduced: torch.Tensor) -> torch.Tensor:
        return self(reduced=reduced)

    @torch.jit.unused
    def _contexts(self):
        return contextlib.nullcontext(), _RestoredBuffers(self)


class _RestoredBuffers:
    """Snapshots a module's buffers (BatchNorm running statistics) and puts them back on exit."""

    def __init__(self, module: nn.Module):
        self.module = module
        self.saved = []

    def __enter__(self):
        self.saved = [(b, b.detach().clone()) for b in self.module.buffers()]

    def __exit__(self, *exc):
        with torch.no_grad():
            for buffer, value in self.saved:
                buffer.copy_(value)
        self.saved = []
        return False


@register_notrace_module  # its training path is one autograd function, which FX cannot trace into
class BAM(nn.Module):
    """Bottleneck Attention Module: `out = F + F * sigmoid(fuse(Mc(F), Ms(F)))`.

    Args:
        channels: input (= output) channels C.
        rd_ratio: hidden width ratio, the paper's 1/r with r = 16.
        rd_channels: explicit hidden width, overrides `rd_ratio`.
        rd_divisor: hidden width is rounded to a multiple of this (and never below it, so C < 16 works).
        dilation: dilation of the spatial branch's 3x3 convolutions (paper: 4).
        num_dilated: number of dilated 3x3 convolutions (paper: 2).
        fusion: 'product' (authors' released weights), 'sum' (paper's equation) or 'max' (paper's ablation).
        gates: 'both', or 'channel' / 'spatial' for single-branch ablations.
        act_layer: activation inside both branches.
        inplace: write the output over the input when autograd records nothing (inference), saving a full-size
            allocation; for a BAM whose input nothing else reads, as after a stage's last block (the zoo's
            models set it).
        input_relu: apply a ReLU to the input first, F = relu(input), taking over the ReLU that ends the layer
            before: in training BAM then keeps only its output for backward, which the next layer keeps anyway,
            instead of its input next to the ReLU's copy of it (the zoo's ResNets set it and make that block's
            last activation an identity).

    The numeric arguments are checked against `BOUNDS` (`bam_models.layers.bounds`).
    """
    BOUNDS = BAM_BOUNDS

    def __init__(
            self,
            channels: int,
            rd_ratio: float = 1. / 16,
            rd_channels: Optional[int] = None,
            rd_divisor: int = 1,
            dilation: int = 4,
            num_dilated: int = 2,
            fusion: str = 'product',
            gates: str = 'both',
            act_layer: Type[nn.Module] = nn.ReLU,
            inplace: bool = False,
            input_relu: bool = False,
            fused: Optional[bool] = None,
            device=None,
            dtype=None,
    ):
        super().__init__()
        if fusion not in _FUSIONS:
            raise ValueError(f"BAM fusion must be one of {_FUSIONS}, got {fusion!r}.")
        if gates not in _GATES:
            raise ValueError(f"BAM gates must be one of {_GATES}, got {gates!r}.")
        if gates != 'both' and fusion != 'product':
            raise ValueError(
                f"BAM fusion={fusion!r} combines two branches but gates={gates!r} keeps one; "
                f"use fusion='product' (ignored for a single branch) or gates='both'.")
        check_bounds('BAM', self.BOUNDS, dict(rd_ratio=rd_ratio, rd_channels=rd_channels, rd_divisor=rd_divisor,
                                             dilation=dilation, num_dilated=num_dilated))
        dd = {'device': device, 'dtype': dtype}
        if rd_channels is None:
            rd_channels = make_divisible(channels * rd_ratio, rd_divisor, round_limit=0.)
        self.channels = channels
        self.rd_channels = rd_channels
        self.fusion = fusion
        self.gates = gates
        self.inplace = inplace
        self.input_relu = input_relu
        self.fused = fused
        # the paper closes each branch with BN before combining; the released product form does not
        out_norm = fusion != 'product'
        self.channel_gate = BamChannelGate(
            channels, rd_channels, act_layer=act_layer, out_norm=out_norm, **dd,
        ) if gates in ('both', 'channel') else None
        self.spatial_gate = BamSpatialGate(
            channels, rd_channels, dilation=dilation, num_dilated=num_dilated, act_layer=act_layer,
            out_norm=out_norm, fused=fused, **dd,
        ) if gates in ('both', 'spatial') else None
        self.init_weights()

    @torch.jit.ignore
    def init_weights(self) -> None:
        """The authors' init: kaiming-normal (fan_out) convs in the spatial branch, default-initialised FCs,
        every bias zero, BN weight one."""
        for name, module in self.named_modules():
            if isinstance(module, nn.Conv2d):
                if name.startswith('spatial_gate'):
                    nn.init.kaiming_normal_(module.weight, mode='fan_out')
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def attention_logits(self, x: torch.Tensor) -> torch.Tensor:
        """The pre-sigmoid attention map for input x, broadcastable to x: (B, C, H, W), (B, C, 1, 1) or
        (B, 1, H, W)."""
        if self.input_relu:
            x = F.relu(x)
        return self._logits(x)

    def _logits(self, features: torch.Tensor) -> torch.Tensor:
        channel = None if self.channel_gate is None else self.channel_gate(features)
        spatial = None if self.spatial_gate is None else self.spatial_gate(features)
        return bam_attention_logits(channel, spatial, self.fusion)

    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        """The plain formulas (`gating_reference`), differentiated by autograd itself."""
        features = F.relu(x) if self.input_relu else x
        return bam_refine_reference(features, self._logits(features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting() or x.shape[0] == 0:
            # an empty batch has nothing to save memory on
            return self.forward_reference(x)
        if use_fused_gating(self.fused):
            return self._forward_fused(x)
        if self.channel_gate is not None and self.spatial_gate is not None and use_gate_ops(self.fused):
            return self._forward_op(x)
        return self.forward_reference(x)

    @torch.jit.unused
    def _forward_op(self, x: torch.Tensor) -> torch.Tensor:
        """Under torch.compile: the whole refinement, small networks included, as the custom op
        `bam_models::bam_refine`, so the compiled step keeps only what the eager node keeps; gates the op has no
        template for take the plain formulas."""
        config = bam_op_config(self.channel_gate, self.spatial_gate, self.fusion)
        if config is None:
            return self.forward_reference(x)
        return bam_refine_compiled(x, self.channel_gate, self.spatial_gate, config, self.fusion, self.input_relu)

    @torch.jit.unused
    def _forward_fused(self, x: torch.Tensor) -> torch.Tensor:
        tuning = tuning_for(x.device)
        if self.channel_gate is not None and self.spatial_gate is not None:
            # two branches broadcast to full size: one node that rebuilds their product in backward
            return bam_refine(x, self.channel_gate, self.spatial_gate, self.fusion, self.input_relu, self.inplace,
                              tuning)
        # a single branch's gate is small (B, C, 1, 1) or (B, 1, H, W): plain ops keep nothing large
        return bam_single_branch(x, self.channel_gate, self.spatial_gate, self.input_relu, tuning)

    def extra_repr(self) -> str:
        return (f'channels={self.channels}, rd_channels={self.rd_channels}, fusion={self.fusion}, gates={self.gates}'
                f', inplace={self.inplace}, input_relu={self.input_relu}'
                + ('' if self.fused is None else f', fused={self.fused}'))

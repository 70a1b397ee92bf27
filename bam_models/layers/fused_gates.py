""" Memory-lean gating for BAM and CBAM

Written with plain tensor ops, `x * (1 + sigmoid(Mc * Ms))` makes autograd keep two full-size B x C x H x W
tensors per BAM (the sigmoid output and `1 + sigmoid`), and CBAM's `x * Mc * Ms` keeps the channel-refined
map `x * Mc` alive as well; in backward each of x's uses adds a full-size gradient of its own. Those are the
largest tensors of the network, and on CPU every fresh one above glibc's largest mmap threshold (32 MiB) is
new zeroed pages, which cost about as much as the arithmetic. BAM (`bam_refine`) and CBAM (`cbam_refine`) are
each one autograd node that saves the input (or, for a BAM that takes over the ReLU before it, its output) and
the small gates instead (B x C x 1 x 1 and B x 1 x H x W), rebuilds full-size products in backward one batch
slice at a time in reused buffers, and writes the gradient of x into a single full-size tensor. Reductions over
the broadcast dimensions are batched matrix products.

Gradients equal those of the plain formulas (`gating_reference.py`) up to float rounding. The modules run these
nodes only where `config.use_fused_gating` says so: scripting, tracing, ONNX export, torch.export and torch.func
see the plain formulas, because custom autograd functions are opaque to them. A torch.compile'd training step runs
the nodes' steps as the custom ops at the end of this file (`config.use_gate_ops`); compiled inference sees the
plain formulas, which the compiler fuses. Double backward through a node raises `FusedGatingError`, naming the switch
that turns the nodes off. FX symbolic tracing (timm's feature extractors) treats BAM and CBAM as leaf modules.
Memory choices (batch slices, recomputation) come from `gating_tuning.TUNING` for the input's device kind;
speed choices between equivalent kernels (BAM's 1x1 reduction as a convolution or a matrix product, CBAM's max
over channels in one step or two) are measured at first use by `gating_tuning.choose_kernel`, with the table's
defaults where nothing is measured.
"""
import functools
import types
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F

from .config import double_backward_error, fused_gating_supported
from .gating_tuning import GatingTuning, choose_kernel, gating_autotune, tuning_for

__all__ = [
    'bam_op_config', 'bam_refine', 'bam_refine_compiled', 'bam_refine_op', 'bam_single_branch', 'cbam_op_config',
    'cbam_refine', 'cbam_refine_compiled', 'cbam_refine_op', 'channel_amax', 'has_forward_hooks', 'takes_norm',
]


# CBAM's max over channels in two steps runs over strided groups of one of these many channels
_AMAX_GROUPS = (8, 16, 32)


@torch.jit.unused
def channel_amax(x: torch.Tensor, group: Optional[int] = None) -> torch.Tensor:
    """`x.amax(1, keepdim=True)` for a (B, C, H, W) map, in one reduction or in two steps over strided groups of
    channels, whichever `choose_kernel` measured fastest for x; where nothing is measured, two steps over groups
    of `group` channels (None: the table's for x's device; that None too: one amax).

    ATen vectorises a max over channels of a contiguous map along H*W, which is short in late stages. Reducing
    first over C / group strided groups runs along group * H * W contiguous elements and leaves a group-channel
    map for the second step. Both give the same values. Where autograd records, it is the plain amax, whose
    gradient splits tied maxima evenly (two steps would split them per step).
    """
    if group is None:
        group = tuning_for(x.device).amax_group
    recorded = torch.is_grad_enabled() and x.requires_grad
    if recorded or not fused_gating_supported() or not x.is_contiguous():
        return x.amax(1, keepdim=True)
    channels = x.shape[1]
    candidates = {'amax': _amax}
    for g in sorted(set(_AMAX_GROUPS) | ({group} if group else set())):
        if channels > g and channels % g == 0:
            candidates[f'two-step/{g}'] = functools.partial(_grouped_amax, group=g)
    default = f'two-step/{group}' if f'two-step/{group}' in candidates else 'amax'
    return candidates[choose_kernel('cbam_channel_max', (x,), candidates, default)](x)


def _amax(x: torch.Tensor) -> torch.Tensor:
    return x.amax(1, keepdim=True)


def _grouped_amax(x: torch.Tensor, group: int) -> torch.Tensor:
    batch, channels, height, width = x.shape
    groups = x.view(batch, channels // group, group * height * width).amax(1)
    return groups.view(batch, group, height * width).amax(1, keepdim=True).view(batch, 1, height, width)


def _as_matrix(t: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, H*W) as a view for both contiguous and channels_last layouts."""
    return t.flatten(2)


def _gate_like(x: torch.Tensor, channel: torch.Tensor, spatial: torch.Tensor) -> torch.Tensor:
    """An uninitialised full-size gate buffer laid out like x (channels_last stays so), in the promoted dtype."""
    return torch.empty_like(x, dtype=torch.promote_types(x.dtype, torch.promote_types(channel.dtype, spatial.dtype)))


def _combined_sigmoid(channel: torch.Tensor, spatial: torch.Tensor, fusion: str, out: torch.Tensor) -> torch.Tensor:
    """sigmoid(fuse(channel, spatial)) written into the full-size buffer `out`."""
    if fusion == 'product':
        torch.mul(channel, spatial, out=out)
    elif fusion == 'sum':
        torch.add(channel, spatial, out=out)
    else:
        torch.maximum(channel, spatial, out=out)
    return out.sigmoid_()


class _Bam(torch.autograd.Function):
    """BAM's refinement `r * (1 + sigmoid(fuse(Mc(r), Ms(r))))` of r = x, or r = relu(x) where BAM takes over the
    ReLU before it, as one autograd node that keeps one full-size tensor for backward and writes the gradient of
    x into one full-size tensor.

    Written with plain ops, autograd keeps the gate and `1 + gate`, and x gets three full-size gradients (the
    output product's, the average pool's and the 1x1 reduction's) that it adds. Here the branches' small
    networks keep their own graph from the pooled (B, C) vector and the reduced (B, C/r, H, W) map, and backward
    walks the full-size steps itself, one batch slice at a time in reused buffers.

    With r = x it keeps x. With r = relu(x) it keeps only its output y, which the next layer keeps anyway: r is
    rebuilt as y / (1 + gate), exact up to rounding since 1 + gate lies in (1, 2), and y > 0 exactly where x > 0,
    so the ReLU's mask comes from y as well. The ReLU's own output, which a separate ReLU would keep for its
    backward, is never kept: BAM's memory cost in training is its small branches only.
    """

    @staticmethod
    def forward(ctx, x, channel_gate, spatial_gate, fusion, input_relu, tuning, num_channel_params, *params):
        conv_reduce = spatial_gate.conv_reduce
        r = torch.relu(x) if input_relu else x
        pooled = r.mean((2, 3)).requires_grad_()
        reduced = _pointwise_conv(r, conv_reduce.weight.detach(), _detached(conv_reduce.bias), tuning)
        reduced.requires_grad_()
        with torch.enable_grad():
            channel = channel_gate.from_pooled(pooled)
            spatial = spatial_gate.from_reduced(reduced, recompute=tuning.recompute_spatial)
        # the ReLU's output is this node's own: the refinement may go over it
        out = _refine(r, channel.detach(), spatial.detach(), fusion, tuning, overwrite=input_relu)
        ctx.save_for_backward(out if input_relu else x, channel.detach(), spatial.detach(), conv_reduce.weight)
        ctx.graphs = (pooled, channel, reduced, spatial)
        ctx.params = (params[:num_channel_params], params[num_channel_params:])
        ctx.conv_reduce = (conv_reduce.weight, conv_reduce.bias)
        ctx.fusion, ctx.input_relu, ctx.tuning = fusion, input_relu, tuning
        return out

    @staticmethod
    def backward(ctx, grad):
        if torch.is_grad_enabled():  # the engine enables grad mode for backward only under create_graph=True
            raise double_backward_error('BAM')
        saved, channel, spatial, weight = ctx.saved_tensors
        pooled, channel_graph, reduced, spatial_graph = ctx.graphs
        channel_params, spatial_params = ctx.params
        fusion, input_relu = ctx.fusion, ctx.input_relu
        batch, channels, height, width = saved.shape
        dtype = torch.promote_types(grad.dtype, torch.promote_types(saved.dtype, channel.dtype))
        slices = _batch_slices(saved, ctx.tuning, channel, spatial)
        # per-slice buffers: the rebuilt gate sigmoid(fuse(Mc, Ms)), and r rebuilt from y, then d out / d logits
        gate_buffer = _gate_like(saved[slices[0]], channel, spatial)
        input_then_grad_logits = torch.empty_like(gate_buffer, dtype=dtype)
        grad_x = torch.empty(saved.shape, dtype=dtype, device=saved.device) if ctx.needs_input_grad[0] else None

        def refined_input(part, n):
            """A batch slice of r (x, or relu(x) rebuilt from the output) and of the gate, in the buffers."""
            gate = _combined_sigmoid(channel[part], spatial[part], fusion, gate_buffer[:n])
            if not input_relu:
                return saved[part], gate
            # r = y / (1 + gate)
            r = torch.add(gate, 1., out=input_then_grad_logits[:n])
            return torch.div(saved[part], r, out=r), gate

        grad_channel = torch.empty_like(channel, dtype=dtype)
        grad_spatial = torch.empty_like(spatial, dtype=dtype)
        for part in slices:
            g = grad[part]
            n = g.shape[0]
            r, gate = refined_input(part, n)
            # d out / d logits = g * r * gate * (1 - gate)
            grad_logits = torch.mul(g, r, out=input_then_grad_logits[:n])
            torch.ops.aten.sigmoid_backward.grad_input(grad_logits, gate, grad_input=grad_logits)
            # d Mc, d Ms: d logits reduced over the dimensions each branch broadcasts over
            _reduce_logit_grads(grad_logits, channel[part], spatial[part], fusion, grad_channel, grad_spatial, part)
            if grad_x is not None:
                # the product's share of d r: g * (1 + gate)
                torch.addcmul(g, g, gate, out=grad_x[part])
        # d pooled, d reduced and the branches' parameter gradients, through their small graphs
        grad_pooled, channel_param_grads = _small_backward(channel_graph, grad_channel, pooled, channel_params)
        grad_reduced, spatial_param_grads = _small_backward(spatial_graph, grad_spatial, reduced, spatial_params)
        grad_conv = _bam_branch_input_grads(
            ctx, saved, weight, grad_pooled, grad_reduced, grad_x, slices, dtype, refined_input)
        for i, p in enumerate(spatial_params):
            if p is ctx.conv_reduce[0] and grad_conv[0] is not None:
                spatial_param_grads[i] = grad_conv[0].view(p.shape).to(p.dtype)
            elif p is ctx.conv_reduce[1] and p.requires_grad:
                spatial_param_grads[i] = grad_conv[1].to(p.dtype)
        return (grad_x, None, None, None, None, None, None, *channel_param_grads, *spatial_param_grads)


def _bam_branch_input_grads(ctx, saved, weight, grad_pooled, grad_reduced, grad_x, slices, dtype, refined_input):
    """Adds the branches' shares to d r in grad_x and applies the ReLU's mask; returns the 1x1 reduction's
    (weight, bias) gradients."""
    batch, channels, height, width = saved.shape
    conv_weight = ctx.conv_reduce[0]
    grad_maps = grad_reduced.to(dtype).reshape(batch, grad_reduced.shape[1], height * width)  # (B, rd, HW)
    # d W = sum over the batch of d reduced r^T; d b = d reduced summed over the batch and H, W
    grad_weight = None
    if conv_weight.requires_grad:
        grad_weight = torch.zeros(grad_maps.shape[1], channels, dtype=dtype, device=saved.device)
    if grad_x is not None:
        # d r += W^T d reduced + d pooled / HW, as one product of [W^T, d pooled / HW] and [d reduced; 1]
        left = torch.cat([
            weight.flatten(1).t().to(dtype).expand(batch, -1, -1),
            (grad_pooled.to(dtype) / (height * width)).unsqueeze(-1),
        ], dim=2)  # (B, C, rd + 1)
        right = torch.cat([grad_maps, grad_maps.new_ones(batch, 1, height * width)], dim=1)  # (B, rd + 1, HW)
    for part in slices:
        n = grad_maps[part].shape[0]
        if grad_weight is not None:
            # x itself, or relu(x) rebuilt with its gate; x needs no gate
            r = (refined_input(part, n)[0] if ctx.input_relu else saved[part]).to(dtype)
            grad_weight += torch.bmm(grad_maps[part], r.flatten(2).transpose(1, 2)).sum(0)
        if grad_x is not None:
            grad_x[part].view(n, channels, height * width).baddbmm_(left[part], right[part])
            if ctx.input_relu:
                # d x = d r where y > 0, else 0 (the ReLU's mask)
                torch.ops.aten.threshold_backward.grad_input(grad_x[part], saved[part], 0, grad_input=grad_x[part])
    grad_bias = grad_maps.sum((0, 2)) if ctx.conv_reduce[1] is not None else None
    return grad_weight, grad_bias


@torch.jit.unused
def bam_refine(
        x: torch.Tensor,
        channel_gate: torch.nn.Module,
        spatial_gate: torch.nn.Module,
        fusion: str = 'product',
        input_relu: bool = False,
        inplace: bool = False,
        tuning: Optional[GatingTuning] = None,
) -> torch.Tensor:
    """BAM's `r * (1 + sigmoid(fuse(Mc(r), Ms(r))))` for r = x, or r = relu(x) with `input_relu` (eager mode).

    Where autograd records it is one autograd node (see `_Bam`); otherwise it writes over x where `inplace`
    allows (and over the ReLU's output, which is its own), else into one new tensor. The gates start from what
    the node computes itself: `channel_gate.from_pooled` from the (B, C) mean of r over H, W and
    `spatial_gate.from_reduced` from the output of `spatial_gate.conv_reduce` on r.
    """
    tuning = tuning or tuning_for(x.device)
    if torch.is_grad_enabled():
        channel_params = list(channel_gate.parameters())
        return _Bam.apply(x, channel_gate, spatial_gate, fusion, input_relu, tuning, len(channel_params),
                          *channel_params, *spatial_gate.parameters())
    if input_relu:
        x = x.relu_() if inplace else torch.relu(x)
        inplace = True
    conv_reduce = spatial_gate.conv_reduce
    channel = channel_gate.from_pooled(x.mean((2, 3)))
    spatial = spatial_gate.from_reduced(_pointwise_conv(x, conv_reduce.weight, conv_reduce.bias, tuning))
    return _refine(x, channel, spatial, fusion, tuning, overwrite=inplace)


@torch.jit.unused
def bam_single_branch(
        x: torch.Tensor,
        channel_gate: Optional[torch.nn.Module],
        spatial_gate: Optional[torch.nn.Module],
        input_relu: bool,
        tuning: GatingTuning,
) -> torch.Tensor:
    """A single-branch BAM, r * (1 + sigmoid(Mc(r))) or r * (1 + sigmoid(Ms(r))): plain autograd on a small gate,
    with the spatial branch's activations recomputed in backward where the tuning table says so."""
    r = F.relu(x) if input_relu else x
    if spatial_gate is None:
        logits = channel_gate(r)
    else:
        logits = spatial_gate.from_reduced(spatial_gate.conv_reduce(r), recompute=tuning.recompute_spatial)
    return r * (1. + torch.sigmoid(logits))


def _detached(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if t is None else t.detach()


def _refine(
        x: torch.Tensor,
        channel: torch.Tensor,
        spatial: torch.Tensor,
        fusion: str,
        tuning: GatingTuning,
        overwrite: bool,
) -> torch.Tensor:
    """x * (1 + sigmoid(fuse(channel, spatial))), one batch slice of gate at a time, written over x where
    `overwrite` allows and the result keeps x's dtype, else into a new tensor of the promoted dtype."""
    dtype = torch.promote_types(x.dtype, torch.promote_types(channel.dtype, spatial.dtype))
    out = x if overwrite and dtype == x.dtype else torch.empty_like(x, dtype=dtype)
    slices = _batch_slices(x, tuning, channel, spatial)
    gate_buffer = _gate_like(x[slices[0]], channel, spatial)
    for part in slices:
        xs = x[part]
        gate = _combined_sigmoid(channel[part], spatial[part], fusion, gate_buffer[:xs.shape[0]])
        torch.addcmul(xs, xs, gate, out=out[part])
    return out


def _batch_slices(x: torch.Tensor, tuning: GatingTuning, *small: torch.Tensor) -> List[slice]:
    """`tuning.batch_slices` slices of the batch (one where the small tensors broadcast over the batch)."""
    batch = x.shape[0]
    if tuning.batch_slices <= 1 or any(t.shape[0] != batch for t in small):
        return [slice(None)]
    step = max(1, -(-batch // tuning.batch_slices))
    return [slice(i, i + step) for i in range(0, batch, step)]


def _reduce_logit_grads(grad_logits, channel, spatial, fusion, grad_channel, grad_spatial, part) -> None:
    """Write the gradients of the (B, C, 1, 1) and (B, 1, H, W) logits of one batch slice."""
    if fusion == 'product':
        g = _as_matrix(grad_logits)  # (b, C, HW)
        if grad_channel is not None:
            sp = spatial.to(g.dtype).reshape(spatial.shape[0], 1, -1)  # (b, 1, HW)
            # as a row times g^T: the column form (g @ sp) runs as a slow matrix-vector kernel (1.45 vs 0.29 ms
            # for a quarter batch of layer1 maps)
            grad_channel[part] = torch.bmm(sp, g.transpose(1, 2)).view(channel.shape)
        if grad_spatial is not None:
            ch = channel.to(g.dtype).reshape(channel.shape[0], 1, channel.shape[1])  # (b, 1, C)
            grad_spatial[part] = torch.bmm(ch, g).view(spatial.shape)
    elif fusion == 'sum':
        if grad_channel is not None:
            grad_channel[part] = grad_logits.sum((2, 3), keepdim=True)
        if grad_spatial is not None:
            grad_spatial[part] = grad_logits.sum(1, keepdim=True)
    else:
        # torch.maximum's rule: the larger input takes the gradient, ties split it evenly
        share = torch.where(channel == spatial, 0.5, (channel > spatial).to(grad_logits.dtype))
        if grad_channel is not None:
            grad_channel[part] = (grad_logits * share).sum((2, 3), keepdim=True)
        if grad_spatial is not None:
            grad_spatial[part] = (grad_logits * (1. - share)).sum(1, keepdim=True)


def _pointwise_conv(
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: Optional[torch.Tensor],
        tuning: GatingTuning,
) -> torch.Tensor:
    """BAM's 1x1 reduction as a convolution or a batched matrix product, whichever `choose_kernel` measured
    fastest for x; where nothing is measured, the product for inputs of at least `tuning.matmul_min_bytes`."""
    if not x.is_contiguous():
        return F.conv2d(x, weight, bias)
    threshold = tuning.matmul_min_bytes
    default = 'matmul' if threshold is not None and x.numel() * x.element_size() >= threshold else 'conv'
    return _REDUCTIONS[choose_kernel('bam_reduce_1x1', (x, weight, bias), _REDUCTIONS, default)](x, weight, bias)


def _matmul_pointwise_conv(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """A 1x1 convolution of a contiguous (B, C, H, W) map as a batched matrix product, reading x in place."""
    batch, _, height, width = x.shape
    weight = weight.flatten(1)
    # bmm on the weight expanded over the batch: matmul may fold the batch into a transposed copy of x
    out = torch.bmm(weight.to(x.dtype).expand(batch, -1, -1), x.flatten(2))
    if bias is not None:
        out.add_(bias.to(out.dtype).view(1, -1, 1))
    return out.view(batch, weight.shape[0], height, width)


_REDUCTIONS = {'conv': F.conv2d, 'matmul': _matmul_pointwise_conv}


class _Cbam(torch.autograd.Function):
    """CBAM's refinement `x * Mc * Ms` as one autograd node that keeps only x of full size for backward and
    writes the gradient of x into a single full-size tensor.

    Written with plain ops, autograd keeps the channel-refined map and gives x three full-size gradients (the
    output product's, the channel-wise pools' and the spatial pools'), each a fresh allocation, then adds them.
    Here the gates' small networks (shared MLP; 7x7 conv, BN) run with their own autograd graph from the pooled
    descriptors, and backward walks the full-size steps itself (`_cbam_backward`).

    Given the training-mode BatchNorm2d before the CBAM (`norm`, the block's last), the node applies it too and
    keeps its input instead of its output: plain BatchNorm keeps its input for its own backward, so the block
    keeps one full-size tensor fewer. Backward rebuilds the normalised map from the batch statistics with the
    forward's own kernel, bit for bit, so that the maxima found in forward are found again.
    """

    @staticmethod
    def forward(ctx, x, norm_weight, norm_bias, channel_gate, spatial_gate, norm, tuning, num_channel_params,
                *params):
        norm_state = ()
        kept = x
        if norm is not None:
            norm_state = _train_batch_norm(x, norm)
            x = _normalize(x, *norm_state[:2])  # the node's own: the refinement may go over it
            ctx.norm_eps = norm.eps
        peak_hw = x.amax((2, 3))
        pooled_hw = torch.cat([x.mean((2, 3)), peak_hw], dim=0).requires_grad_()
        with torch.enable_grad():
            channel = channel_gate.from_pooled(pooled_hw)
        owned = norm is not None and _keeps_dtype(x, channel)
        refined = x.mul_(channel.detach()) if owned else x * channel.detach()
        peak_c = channel_amax(refined, tuning.amax_group)
        pooled_c = torch.cat([peak_c, refined.mean(1, keepdim=True)], dim=1).requires_grad_()
        with torch.enable_grad():
            spatial = spatial_gate.from_pooled(pooled_c)
        ctx.save_for_backward(kept, channel.detach(), spatial.detach(), peak_hw, peak_c, *norm_state)
        ctx.graphs = (pooled_hw, channel, pooled_c, spatial)
        ctx.params = (params[:num_channel_params], params[num_channel_params:])
        ctx.tuning = tuning
        if _keeps_dtype(refined, spatial):
            return refined.mul_(spatial.detach())
        return refined * spatial.detach()

    @staticmethod
    def backward(ctx, grad):
        if torch.is_grad_enabled():  # the engine enables grad mode for backward only under create_graph=True
            raise double_backward_error('CBAM')
        x, channel, spatial, peak_hw, peak_c, *norm_state = ctx.saved_tensors
        needs_x, needs_weight, needs_bias = ctx.needs_input_grad[:3]
        if not norm_state:
            grad_x, channel_grads, spatial_grads = _cbam_backward(
                ctx, grad, x, channel, spatial, peak_hw, peak_c, needs_x)
            return (grad_x, None, None, None, None, None, None, None, *channel_grads, *spatial_grads)
        scale, shift, mean, invstd, weight = norm_state
        grad_normalized, channel_grads, spatial_grads = _cbam_backward(
            ctx, grad, _normalize(x, scale, shift), channel, spatial, peak_hw, peak_c, True)
        grad_x, grad_weight, grad_bias = torch.ops.aten.native_batch_norm_backward(
            grad_normalized, x, weight, None, None, mean, invstd, True, ctx.norm_eps,
            [needs_x, needs_weight, needs_bias])
        return (grad_x, grad_weight, grad_bias, None, None, None, None, None, *channel_grads, *spatial_grads)


def _train_batch_norm(x: torch.Tensor, norm: torch.nn.BatchNorm2d) -> Tuple[torch.Tensor, ...]:
    """A training-mode BatchNorm2d step on x as `norm.forward` takes it (running statistics and batch count
    advanced alike), returned as the per-channel affine map of the batch statistics: (scale, shift, mean,
    1 / std, weight), norm(x) = x * scale + shift."""
    momentum = norm.momentum
    norm.num_batches_tracked.add_(1)
    if momentum is None:  # a cumulative average, as BatchNorm's
        momentum = 1.0 / float(norm.num_batches_tracked)
    # BatchNorm's own statistics kernel: the biased variance, the running statistics advanced with the unbiased
    # one (3x faster than var_mean over (0, 2, 3) on a contiguous map)
    mean, var = torch.batch_norm_update_stats(x, norm.running_mean, norm.running_var, momentum)
    invstd = torch.rsqrt(var + norm.eps)
    scale = invstd * norm.weight
    return scale, norm.bias - mean * scale, mean, invstd, norm.weight


def _normalize(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """x * scale + shift per channel: one kernel, which forward and backward call alike for the same bits."""
    return torch.addcmul(shift.view(1, -1, 1, 1), x, scale.view(1, -1, 1, 1))


def _cbam_backward(ctx, grad, x, channel, spatial, peak_hw, peak_c, needs_grad_x):
    """The gradients of `_Cbam`'s refinement of x (x: the map the gates saw): (d x or None, the channel gate's and
    the spatial gate's parameter gradients). One batch slice at a time in reused buffers: d out / d Ms, then
    through Ms's network to the channel-wise pools, then d refined, d Mc and Mc's share of d x, then through Mc's
    network to the spatial pools, then their share of d x. Tied maxima share the gradient, as with amax."""
    pooled_hw, channel_graph, pooled_c, spatial_graph = ctx.graphs
    channel_params, spatial_params = ctx.params
    batch, channels, height, width = x.shape
    dtype = torch.promote_types(grad.dtype, torch.promote_types(x.dtype, channel.dtype))
    slices = _batch_slices(x, ctx.tuning)
    # reused per-slice buffers and a floating-point mask: fresh pages and bool-to-number conversions cost
    # more than the math. product_buffer holds g * x, then d refined; mask_buffer the maxima's masks and
    # d refined * x in between
    product_buffer = torch.empty_like(x[slices[0]], dtype=dtype)
    mask_buffer = torch.empty_like(product_buffer)
    grad_x = torch.empty_like(x, dtype=dtype) if needs_grad_x else None

    # d Ms = sum over C of g * x * Mc, as the row Mc^T times (g * x)
    grad_spatial = torch.empty_like(spatial, dtype=dtype)
    for part in slices:
        g, xs, ch = grad[part], x[part], channel[part]
        gx = _as_matrix(torch.mul(g, xs, out=product_buffer[:xs.shape[0]]))  # (b, C, HW)
        ch_row = ch.to(dtype).reshape(xs.shape[0], 1, channels)
        grad_spatial[part] = torch.bmm(ch_row, gx).view(grad_spatial[part].shape)
    # d [max_c; mean_c] and the spatial gate's parameter gradients, through its small graph
    grad_pooled_c, spatial_param_grads = _small_backward(spatial_graph, grad_spatial, pooled_c, spatial_params)
    grad_pooled_c = grad_pooled_c.to(dtype)
    grad_peak_c, grad_mean_c = grad_pooled_c[:, :1], grad_pooled_c[:, 1:] / channels

    grad_channel = torch.empty_like(channel, dtype=dtype)
    for part in slices:
        g, xs, ch, sp = grad[part], x[part], channel[part], spatial[part]
        n = xs.shape[0]
        # d refined = g * Ms + d mean_c / C + d max_c shared among the channels that hold the maximum
        is_peak = torch.mul(xs, ch, out=mask_buffer[:n]).eq_(peak_c[part])
        share = grad_peak_c[part] / is_peak.sum(1, keepdim=True)
        grad_refined = torch.addcmul(grad_mean_c[part], g, sp, out=product_buffer[:n]).addcmul_(is_peak, share)
        # d Mc = sum over H, W of d refined * x; the mask's buffer is free again, and a product into it and a
        # sum beat a batch of row dot products (0.5 vs 1.5 ms for a quarter batch of layer1 maps)
        grad_channel[part] = torch.mul(grad_refined, xs, out=mask_buffer[:n]).sum((2, 3), keepdim=True)
        if grad_x is not None:
            # d x = d refined * Mc, so far
            torch.mul(grad_refined, ch, out=grad_x[part])
    # d [mean_hw; max_hw] and the channel gate's parameter gradients, through its small graph
    grad_pooled_hw, channel_param_grads = _small_backward(channel_graph, grad_channel, pooled_hw, channel_params)

    if grad_x is not None:
        # d x += d mean_hw / HW + d max_hw shared among the positions that hold the maximum
        grad_pooled_hw = grad_pooled_hw.to(dtype)
        grad_mean_hw = (grad_pooled_hw[:batch] / (height * width)).view(batch, channels, 1, 1)
        grad_peak_hw = grad_pooled_hw[batch:].reshape(batch, channels, 1, 1)
        for part in slices:
            xs = x[part]
            n = xs.shape[0]
            is_peak = torch.eq(xs, peak_hw[part].view(n, channels, 1, 1), out=mask_buffer[:n])
            share = grad_peak_hw[part] / is_peak.sum((2, 3), keepdim=True)
            grad_x[part].add_(torch.addcmul(grad_mean_hw[part], is_peak, share, out=is_peak))
    return grad_x, channel_param_grads, spatial_param_grads


def _small_backward(output, grad_output, leaf, params):
    """Gradients of a gate's small network from its output gradient: for its input `leaf` and every parameter
    (None where a parameter does not require grad)."""
    trainable = [p for p in params if p.requires_grad]
    # the graph stays until the outer node goes, so a backward with retain_graph=True can be repeated
    grads = torch.autograd.grad(
        output, [leaf] + trainable, grad_output.to(output.dtype), retain_graph=True, allow_unused=True)
    by_param = iter(grads[1:])
    return grads[0], [next(by_param) if p.requires_grad else None for p in params]


@torch.jit.unused
def cbam_refine(
        x: torch.Tensor,
        channel_gate: torch.nn.Module,
        spatial_gate: torch.nn.Module,
        inplace: bool = False,
        tuning: Optional[GatingTuning] = None,
        norm: Optional[torch.nn.BatchNorm2d] = None,
) -> torch.Tensor:
    """CBAM's `Ms(x * Mc(x)) * (x * Mc(x))` (eager mode): one autograd node where autograd records (see `_Cbam`),
    else written over x where `inplace` allows. The gates start from the pooled descriptors the node computes
    itself: `channel_gate.from_pooled` from the (2B, C) [mean; max] over H, W, and `spatial_gate.from_pooled` from
    the (B, 2, H, W) [max, mean] over channels.

    `norm`: a training-mode, affine BatchNorm2d with running statistics, whose output the refinement takes (the
    block's last); the node applies it (where autograd records; callers check `takes_norm`)."""
    tuning = tuning or tuning_for(x.device)
    if torch.is_grad_enabled():
        channel_params = list(channel_gate.parameters())
        norm_params = (None, None) if norm is None else (norm.weight, norm.bias)
        return _Cbam.apply(x, *norm_params, channel_gate, spatial_gate, norm, tuning, len(channel_params),
                           *channel_params, *spatial_gate.parameters())
    if norm is not None:
        x, inplace = norm(x), True
    channel = channel_gate.from_pooled(torch.cat([x.mean((2, 3)), x.amax((2, 3))], dim=0))
    refined = x.mul_(channel) if inplace and _keeps_dtype(x, channel) else x * channel
    pooled_c = torch.cat([channel_amax(refined, tuning.amax_group), refined.mean(1, keepdim=True)], dim=1)
    spatial = spatial_gate.from_pooled(pooled_c)
    # refined is this function's own, or x where `inplace` allows writing over it
    return refined.mul_(spatial) if _keeps_dtype(refined, spatial) else refined * spatial


def takes_norm(x: torch.Tensor, norm: torch.nn.Module) -> bool:
    """Whether `cbam_refine` can apply `norm` to x itself where autograd records: a training-mode, affine
    BatchNorm2d (not a subclass: SyncBatchNorm, frozen norms) with running statistics, of x's dtype, without
    forward hooks (they would not run), on a device with kernels (not meta), over more than one value per channel
    (BatchNorm's own error for one is left to BatchNorm)."""
    return (type(norm) is torch.nn.BatchNorm2d and norm.training and norm.affine and norm.track_running_stats
            and not has_forward_hooks(norm) and norm.weight.dtype == x.dtype and not x.is_meta
            and x.numel() > x.shape[1])


def has_forward_hooks(module: torch.nn.Module) -> bool:
    """Whether calling `module` runs forward hooks or pre-hooks, its own or global ones."""
    from torch.nn.modules import module as nn_module
    return bool(module._forward_hooks or module._forward_pre_hooks or nn_module._global_forward_hooks
                or nn_module._global_forward_pre_hooks)


def _keeps_dtype(x: torch.Tensor, factor: torch.Tensor) -> bool:
    return torch.promote_types(x.dtype, factor.dtype) == x.dtype


# torch.compile: BAM's and CBAM's whole refinement, small networks included, as torch.library custom ops.
#
# A compiler cannot see into the autograd nodes above, and from the plain formulas its graph keeps what they avoid:
# BAM keeps relu(x) besides its output, CBAM the channel-refined map, and x's several full-size gradients are
# summed. So each refinement is one custom op with a fake (meta) kernel and a registered autograd formula. Its
# kernel runs the node's forward steps without autograd, the gates' small networks through
# `torch.func.functional_call` on parameterless copies of the gates (`_bam_templates`, `_cbam_templates`) with the
# module's own parameters and buffers, and also returns the small tensors the node keeps. Its backward rebuilds the
# small networks' graphs from those and runs the node's own backward, so a compiled step keeps what an eager one
# keeps. The BatchNorm buffers after the step come back as outputs, which the caller copies into the module: an op
# with an autograd formula may not mutate its inputs. Gates that differ from the templates (another activation,
# other BatchNorm settings, frozen norms) keep the plain formulas under the compiler (`bam_op_config`).

def _meta_module(module: torch.nn.Module, training: bool) -> torch.nn.Module:
    return module.to('meta').train(training)


@functools.lru_cache(maxsize=None)
def _bam_templates(channels: int, rd_channels: int, dilation: int, num_dilated: int, out_norm: bool, training: bool):
    from .bam import BamChannelGate, BamSpatialGate  # bam.py imports this module
    return (_meta_module(BamChannelGate(channels, rd_channels, out_norm=out_norm), training),
            _meta_module(BamSpatialGate(channels, rd_channels, dilation, num_dilated, out_norm=out_norm), training))


@functools.lru_cache(maxsize=None)
def _cbam_templates(channels: int, rd_channels: int, mlp_bias: bool, kernel_size: int, training: bool):
    from .cbam import CbamChannelGate, CbamSpatialGate  # cbam.py imports this module
    return (_meta_module(CbamChannelGate(channels, rd_channels, mlp_bias=mlp_bias), training),
            _meta_module(CbamSpatialGate(kernel_size), training))


def _fits(gates, templates) -> bool:
    """Whether the gates compute what the templates compute: the same layers with the same settings and mode."""
    return all(repr(g) == repr(t) and all(m.training == t.training for m in g.modules())
               for g, t in zip(gates, templates))


@torch.compiler.assume_constant_result  # evaluated when the compiler traces, not in the compiled graph
def bam_op_config(channel_gate: torch.nn.Module, spatial_gate: torch.nn.Module, fusion: str) -> Optional[List[int]]:
    """The `config` of `bam_refine_op` for a BAM's two gates, or None where they differ from its templates."""
    num_dilated = sum(name.startswith('conv_dil') for name in spatial_gate._modules)
    dilation = spatial_gate.conv_dil0.dilation[0] if num_dilated else 1
    config = [channel_gate.fc1.in_channels, channel_gate.fc1.out_channels, dilation, num_dilated,
              int(fusion != 'product')]
    return config if _fits((channel_gate, spatial_gate), _bam_templates(*config, channel_gate.training)) else None


@torch.compiler.assume_constant_result
def cbam_op_config(channel_gate: torch.nn.Module, spatial_gate: torch.nn.Module) -> Optional[List[int]]:
    """The `config` of `cbam_refine_op` for a CBAM's two gates, or None where they differ from its templates."""
    fc1 = channel_gate.fc1
    config = [fc1.in_channels, fc1.out_channels, int(fc1.bias is not None), spatial_gate.conv.kernel_size[0]]
    return config if _fits((channel_gate, spatial_gate), _cbam_templates(*config, channel_gate.training)) else None


def _state(module: torch.nn.Module) -> List[torch.Tensor]:
    """A gate's parameters, then its buffers: what a template runs on."""
    return [*module.parameters(), *module.buffers()]


def _num_params(template: torch.nn.Module) -> int:
    return sum(1 for _ in template.parameters())


def _call(template: torch.nn.Module, state: List[torch.Tensor], **inputs) -> torch.Tensor:
    """The template run on `state`; BatchNorm updates the state's buffers in place."""
    names = [name for name, _ in template.named_parameters()] + [name for name, _ in template.named_buffers()]
    return torch.func.functional_call(template, dict(zip(names, state)), (), inputs)


def _with_buffer_copies(templates, states) -> Tuple[List[List[torch.Tensor]], List[torch.Tensor]]:
    """The states with copies of their buffers, and all those copies."""
    owned, copies = [], []
    for template, state in zip(templates, states):
        num_params = _num_params(template)
        own = [b.clone() for b in state[num_params:]]
        owned.append([*state[:num_params], *own])
        copies += own
    return owned, copies


def _setup(ctx, config, training, states, kept, buffers) -> None:
    """Saves the kept tensors, the parameters and the buffers after the step; the kept small tensors and the
    buffers are outputs that take no gradient."""
    ctx.num_params = [_num_params(t) for t in ctx.templates(*config, training)]
    ctx.num_state = [len(s) for s in states]
    params = [p for state, n in zip(states, ctx.num_params) for p in state[:n]]
    ctx.params_need_grad = [p.requires_grad for p in params]
    ctx.num_kept = len(kept)
    ctx.config, ctx.training = config, training
    ctx.save_for_backward(*kept, *params, *buffers)
    ctx.mark_non_differentiable(*kept[1:], *buffers)


def _small_graphs(ctx, gate_inputs: List[Tuple[str, int]]) -> Tuple[list, list, list, list]:
    """The kept tensors; the gates' inputs as leaves (for each gate, its keyword argument and the index of the kept
    tensor it takes); the gates' small networks rebuilt with autograd from those on leaf copies of the parameters
    and copies of the buffers after the step; and the parameter leaves, per gate."""
    saved = ctx.saved_tensors
    kept, state = saved[:ctx.num_kept], iter(saved[ctx.num_kept:])
    params = [[next(state).detach().requires_grad_(r) for r in requires]
              for requires in _split(ctx.params_need_grad, ctx.num_params)]
    leaves = [_leaf(kept[index]) for _, index in gate_inputs]
    outputs = []
    with torch.enable_grad():
        for template, own, num_state, (name, _), leaf in zip(
                ctx.templates(*ctx.config, ctx.training), params, ctx.num_state, gate_inputs, leaves):
            buffers = [next(state).clone() for _ in range(num_state - len(own))]
            outputs.append(_call(template, own + buffers, **{name: leaf}))
    return kept, leaves, outputs, params


def _split(items: list, sizes: List[int]) -> List[list]:
    parts, start = [], 0
    for size in sizes:
        parts.append(items[start:start + size])
        start += size
    return parts


def _state_grads(ctx, param_grads) -> List[List[Optional[torch.Tensor]]]:
    """Gradients for the two state inputs: the parameters', none for the buffers."""
    return [[*grads, *[None] * (num_state - len(grads))]
            for grads, num_state in zip(_split(list(param_grads), ctx.num_params), ctx.num_state)]


def _leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().requires_grad_()


def _copy_buffers(gates, buffers: List[torch.Tensor]) -> None:
    with torch.no_grad():
        for buffer, value in zip([b for gate in gates for b in gate.buffers()], buffers):
            buffer.copy_(value)


def _table_kernels(fn):
    """Runs a compiled graph's op kernel with the tuning table's kernels: a compiled step takes one fixed path, as
    `gating_tuning` promises, and measuring inside it would time the op, not the model's use of it."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with gating_autotune(False):
            return fn(*args, **kwargs)
    return wrapper


@torch.library.custom_op('bam_models::bam_refine', mutates_args=())
@_table_kernels
def bam_refine_op(
        x: torch.Tensor,
        channel_state: List[torch.Tensor],
        spatial_state: List[torch.Tensor],
        config: List[int],
        training: bool,
        fusion: str,
        input_relu: bool,
) -> List[torch.Tensor]:
    """`_Bam`'s refinement of x (r = relu(x) with `input_relu`) for the gates of `bam_op_config` `config` with the
    states `_state` gives: [output, mean of r over H, W, 1x1-reduced r, Mc, Ms, the gates' buffers after the step]."""
    templates = _bam_templates(*config, training)
    (channel_state, spatial_state), buffers = _with_buffer_copies(templates, (channel_state, spatial_state))
    tuning = tuning_for(x.device)
    r = torch.relu(x) if input_relu else x
    pooled = r.mean((2, 3))
    reduced = _pointwise_conv(r, spatial_state[0], spatial_state[1], tuning)  # conv_reduce's weight and bias
    channel = _call(templates[0], channel_state, pooled=pooled)
    spatial = _call(templates[1], spatial_state, reduced=reduced)
    # the ReLU's output is the kernel's own: the refinement may go over it
    out = _refine(r, channel, spatial, fusion, tuning, overwrite=input_relu)
    return [out, pooled, reduced.contiguous(), channel.contiguous(), spatial.contiguous(), *buffers]


@bam_refine_op.register_fake
def _bam_refine_fake(x, channel_state, spatial_state, config, training, fusion, input_relu):
    batch, channels, height, width = x.shape
    num_params = [_num_params(t) for t in _bam_templates(*config, training)]
    buffers = [*channel_state[num_params[0]:], *spatial_state[num_params[1]:]]
    return [torch.empty_like(x), x.new_empty(batch, channels), x.new_empty(batch, config[1], height, width),
            x.new_empty(batch, channels, 1, 1), x.new_empty(batch, 1, height, width),
            *[torch.empty_like(b) for b in buffers]]


def _bam_refine_setup(ctx, inputs, output):
    x, channel_state, spatial_state, config, training, fusion, input_relu = inputs
    out, pooled, reduced, channel, spatial, *buffers = output
    ctx.templates, ctx.fusion, ctx.input_relu = _bam_templates, fusion, input_relu
    # with r = relu(x), the output, which the next layer keeps anyway, instead of x: r is rebuilt from it
    _setup(ctx, config, training, (channel_state, spatial_state),
           (out if input_relu else x, pooled, reduced, channel, spatial), buffers)


@_table_kernels
def _bam_refine_backward(ctx, grads):
    (saved, _, _, channel, spatial), leaves, graphs, params = _small_graphs(ctx, [('pooled', 1), ('reduced', 2)])
    conv_reduce = params[1][:2]  # its weight and bias
    node = types.SimpleNamespace(
        saved_tensors=(saved, channel, spatial, conv_reduce[0]), graphs=(leaves[0], graphs[0], leaves[1], graphs[1]),
        params=params, conv_reduce=conv_reduce, fusion=ctx.fusion, input_relu=ctx.input_relu,
        tuning=tuning_for(saved.device), needs_input_grad=ctx.needs_input_grad[:1])
    # only the output takes a gradient
    grad_x, *param_grads = _Bam.backward(node, grads[0])
    return (grad_x, *_state_grads(ctx, param_grads[6:]), None, None, None, None)  # after the node's six other inputs


bam_refine_op.register_autograd(_bam_refine_backward, setup_context=_bam_refine_setup)


@torch.library.custom_op('bam_models::cbam_refine', mutates_args=())
@_table_kernels
def cbam_refine_op(
        x: torch.Tensor,
        channel_state: List[torch.Tensor],
        spatial_state: List[torch.Tensor],
        config: List[int],
        training: bool,
) -> List[torch.Tensor]:
    """`_Cbam`'s refinement of x for the gates of `cbam_op_config` `config` with the states `_state` gives:
    [output, [mean; max] over H, W, [max; mean] over C of x * Mc, Mc, Ms, max over H, W, max over C, the gates'
    buffers after the step]."""
    templates = _cbam_templates(*config, training)
    (channel_state, spatial_state), buffers = _with_buffer_copies(templates, (channel_state, spatial_state))
    peak_hw = x.amax((2, 3))
    pooled_hw = torch.cat([x.mean((2, 3)), peak_hw], dim=0)
    channel = _call(templates[0], channel_state, pooled=pooled_hw)
    refined = x * channel
    peak_c = channel_amax(refined, tuning_for(x.device).amax_group)
    pooled_c = torch.cat([peak_c, refined.mean(1, keepdim=True)], dim=1)
    spatial = _call(templates[1], spatial_state, pooled=pooled_c)
    out = refined.mul_(spatial) if _keeps_dtype(refined, spatial) else refined * spatial
    small = (pooled_hw, pooled_c, channel, spatial, peak_hw, peak_c)
    return [out, *[t.contiguous() for t in small], *buffers]


@cbam_refine_op.register_fake
def _cbam_refine_fake(x, channel_state, spatial_state, config, training):
    batch, channels, height, width = x.shape
    num_params = [_num_params(t) for t in _cbam_templates(*config, training)]
    buffers = [*channel_state[num_params[0]:], *spatial_state[num_params[1]:]]
    return [torch.empty_like(x), x.new_empty(2 * batch, channels), x.new_empty(batch, 2, height, width),
            x.new_empty(batch, channels, 1, 1), x.new_empty(batch, 1, height, width), x.new_empty(batch, channels),
            x.new_empty(batch, 1, height, width), *[torch.empty_like(b) for b in buffers]]


def _cbam_refine_setup(ctx, inputs, output):
    x, channel_state, spatial_state, config, training = inputs
    out, pooled_hw, pooled_c, channel, spatial, peak_hw, peak_c, *buffers = output
    ctx.templates = _cbam_templates
    _setup(ctx, config, training, (channel_state, spatial_state),
           (x, pooled_hw, pooled_c, channel, spatial, peak_hw, peak_c), buffers)


@_table_kernels
def _cbam_refine_backward(ctx, grads):
    (x, _, _, channel, spatial, peak_hw, peak_c), leaves, graphs, params = _small_graphs(
        ctx, [('pooled', 1), ('pooled', 2)])
    node = types.SimpleNamespace(graphs=(leaves[0], graphs[0], leaves[1], graphs[1]), params=params,
                                 tuning=tuning_for(x.device))
    # only the output takes a gradient
    grad_x, channel_grads, spatial_grads = _cbam_backward(
        node, grads[0], x, channel, spatial, peak_hw, peak_c, ctx.needs_input_grad[0])
    return (grad_x, *_state_grads(ctx, [*channel_grads, *spatial_grads]), None, None)


cbam_refine_op.register_autograd(_cbam_refine_backward, setup_context=_cbam_refine_setup)


def bam_refine_compiled(
        x: torch.Tensor,
        channel_gate: torch.nn.Module,
        spatial_gate: torch.nn.Module,
        config: List[int],
        fusion: str,
        input_relu: bool,
) -> torch.Tensor:
    """BAM's refinement as the custom op `bam_models::bam_refine` (under torch.compile; `config` from
    `bam_op_config`), with the gates' BatchNorm buffers updated as the eager node updates them."""
    training = channel_gate.training
    outputs = bam_refine_op(x, _state(channel_gate), _state(spatial_gate), config, training, fusion, input_relu)
    if training:
        _copy_buffers((channel_gate, spatial_gate), outputs[5:])
    return outputs[0]


def cbam_refine_compiled(
        x: torch.Tensor,
        channel_gate: torch.nn.Module,
        spatial_gate: torch.nn.Module,
        config: List[int],
) -> torch.Tensor:
    """CBAM's refinement as the custom op `bam_models::cbam_refine` (under torch.compile; `config` from
    `cbam_op_config`), with the spatial gate's BatchNorm buffers updated as the eager node updates them."""
    training = channel_gate.training
    outputs = cbam_refine_op(x, _state(channel_gate), _state(spatial_gate), config, training)
    if training:
        _copy_buffers((channel_gate, spatial_gate), outputs[7:])
    return outputs[0]

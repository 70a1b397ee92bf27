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

Gradients equal those of the plain formulation up to float rounding. Scripting, tracing, ONNX export,
torch.export and torch.compile see the plain formulation (`fused_gating_supported()` decides), because
custom autograd functions are opaque to them and compilers fuse these elementwise ops on their own. FX
symbolic tracing (timm's feature extractors) treats BAM and CBAM as leaf modules.
"""
from typing import List, Optional

import torch
import torch.nn.functional as F


__all__ = ['bam_refine', 'cbam_refine', 'channel_amax', 'fused_gating_supported']


@torch.jit.unused
def fused_gating_supported() -> bool:
    """True in eager mode; False while scripting, tracing, exporting or compiling, which need plain ops."""
    if torch.jit.is_scripting() or torch.jit.is_tracing():
        return False
    if torch.onnx.is_in_onnx_export():
        return False
    return not torch.compiler.is_compiling()


# channels reduced in the second step of `channel_amax`
_AMAX_GROUP = 16


@torch.jit.unused
def channel_amax(x: torch.Tensor) -> torch.Tensor:
    """`x.amax(1, keepdim=True)` for a (B, C, H, W) map, in two steps where that is faster.

    ATen vectorises a max over channels of a contiguous map along H*W, which is short in late stages (49 at 7x7:
    nine times the time of the mean over channels at batch 16). Reducing first over C / 16 strided groups of 16
    channels runs along 16 * H * W contiguous elements and leaves a 16-channel map for the second step. Where
    autograd records, it is the plain amax, whose gradient splits tied maxima evenly (two steps would split them
    per step).
    """
    batch, channels, height, width = x.shape
    recorded = torch.is_grad_enabled() and x.requires_grad
    if (not recorded and fused_gating_supported() and x.is_contiguous() and channels > _AMAX_GROUP
            and channels % _AMAX_GROUP == 0):
        groups = x.view(batch, channels // _AMAX_GROUP, _AMAX_GROUP * height * width).amax(1)
        return groups.view(batch, _AMAX_GROUP, height * width).amax(1, keepdim=True).view(batch, 1, height, width)
    return x.amax(1, keepdim=True)


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
    walks the full-size steps itself, one batch slice at a time in reused buffers: first d out / d logits (with
    the gate rebuilt from the small saved logits), then through the branches to d pooled and d reduced, then the
    gradient of x as `g * (1 + gate) + W^T d reduced + d pooled / HW` in one batched matrix product per slice.

    With r = x it keeps x. With r = relu(x) it keeps only its output y, which the next layer keeps anyway: r is
    rebuilt as y / (1 + gate), exact up to rounding since 1 + gate lies in (1, 2), and y > 0 exactly where x > 0,
    so the ReLU's mask comes from y as well. The ReLU's own output, which a separate ReLU would keep for its
    backward, is never kept: BAM's memory cost in training is its small branches only.
    """

    @staticmethod
    def forward(ctx, x, channel_gate, spatial_gate, fusion, input_relu, num_channel_params, *params):
        conv_reduce = spatial_gate.conv_reduce
        r = torch.relu(x) if input_relu else x
        pooled = r.mean((2, 3)).requires_grad_()
        reduced = _pointwise_conv(r, conv_reduce.weight.detach(), _detached(conv_reduce.bias)).requires_grad_()
        with torch.enable_grad():
            channel = channel_gate(r, pooled)
            spatial = spatial_gate(r, reduced)
        # the ReLU's output is this node's own: the refinement may go over it
        out = _refine(r, channel.detach(), spatial.detach(), fusion, overwrite=input_relu)
        ctx.save_for_backward(out if input_relu else x, channel.detach(), spatial.detach(), conv_reduce.weight)
        ctx.graphs = (pooled, channel, reduced, spatial)
        ctx.params = (params[:num_channel_params], params[num_channel_params:])
        ctx.conv_reduce = (conv_reduce.weight, conv_reduce.bias)
        ctx.fusion, ctx.input_relu = fusion, input_relu
        return out

    @staticmethod
    def backward(ctx, grad):
        saved, channel, spatial, weight = ctx.saved_tensors
        pooled, channel_graph, reduced, spatial_graph = ctx.graphs
        channel_params, spatial_params = ctx.params
        fusion, input_relu = ctx.fusion, ctx.input_relu
        need_x = ctx.needs_input_grad[0]
        batch, channels, height, width = saved.shape
        dtype = torch.promote_types(grad.dtype, torch.promote_types(saved.dtype, channel.dtype))
        slices = _batch_slices(saved, channel, spatial)
        gate = _gate_like(saved[slices[0]], channel, spatial)
        work = torch.empty_like(gate, dtype=dtype)
        grad_x = torch.empty(saved.shape, dtype=dtype, device=saved.device) if need_x else None

        def refined_input(part, n):
            """A batch slice of r (x, or relu(x) rebuilt from the output) and of the gate, the rebuilt ones in
            the reused buffers."""
            gate_slice = _combined_sigmoid(channel[part], spatial[part], fusion, gate[:n])
            if not input_relu:
                return saved[part], gate_slice
            r = torch.add(gate_slice, 1., out=work[:n])
            return torch.div(saved[part], r, out=r), gate_slice

        # d out / d logits = g * r * gate * (1 - gate), reduced to the small logits' shapes; x's direct share
        grad_channel = torch.empty_like(channel, dtype=dtype)
        grad_spatial = torch.empty_like(spatial, dtype=dtype)
        for part in slices:
            g = grad[part]
            n = g.shape[0]
            r, gate_slice = refined_input(part, n)
            grad_logits = torch.mul(g, r, out=work[:n])
            torch.ops.aten.sigmoid_backward.grad_input(grad_logits, gate_slice, grad_input=grad_logits)
            _reduce_logit_grads(grad_logits, channel[part], spatial[part], fusion, grad_channel, grad_spatial, part)
            if grad_x is not None:
                torch.addcmul(g, g, gate_slice, out=grad_x[part])
        grad_pooled, channel_param_grads = _small_backward(channel_graph, grad_channel, pooled, channel_params)
        grad_reduced, spatial_param_grads = _small_backward(spatial_graph, grad_spatial, reduced, spatial_params)

        # the branches' shares: W^T d reduced + d pooled / HW, as one product of [W^T, d pooled / HW] and
        # [d reduced; 1]; the 1x1 reduction's weight gradient sums d reduced r^T over the batch
        conv_weight, conv_bias = ctx.conv_reduce
        grad_maps = grad_reduced.to(dtype).reshape(batch, -1, height * width)  # (B, rd, HW)
        grad_weight = None
        if conv_weight.requires_grad:
            grad_weight = torch.zeros(grad_maps.shape[1], channels, dtype=dtype, device=saved.device)
        if grad_x is not None:
            left = torch.cat([
                weight.flatten(1).t().to(dtype).expand(batch, -1, -1),
                (grad_pooled.to(dtype) / (height * width)).unsqueeze(-1),
            ], dim=2)  # (B, C, rd + 1)
            right = torch.cat([grad_maps, grad_maps.new_ones(batch, 1, height * width)], dim=1)  # (B, rd + 1, HW)
        for part in slices:
            n = grad_maps[part].shape[0]
            if grad_weight is not None:
                # x itself, or relu(x) rebuilt with its gate; x needs no gate
                r = (refined_input(part, n)[0] if input_relu else saved[part]).to(dtype)
                grad_weight += torch.bmm(grad_maps[part], r.flatten(2).transpose(1, 2)).sum(0)
            if grad_x is not None:
                grad_x[part].view(n, channels, height * width).baddbmm_(left[part], right[part])
                if input_relu:  # the ReLU's mask, y > 0
                    torch.ops.aten.threshold_backward.grad_input(
                        grad_x[part], saved[part], 0, grad_input=grad_x[part])
        for i, p in enumerate(spatial_params):
            if p is conv_weight and grad_weight is not None:
                spatial_param_grads[i] = grad_weight.view(conv_weight.shape).to(conv_weight.dtype)
            elif p is conv_bias and p.requires_grad:
                spatial_param_grads[i] = grad_maps.sum((0, 2)).to(p.dtype)
        return (grad_x, None, None, None, None, None, *channel_param_grads, *spatial_param_grads)


@torch.jit.unused
def bam_refine(
        x: torch.Tensor,
        channel_gate: torch.nn.Module,
        spatial_gate: torch.nn.Module,
        fusion: str = 'product',
        input_relu: bool = False,
        inplace: bool = False,
) -> torch.Tensor:
    """BAM's `r * (1 + sigmoid(fuse(Mc(r), Ms(r))))` for r = x, or r = relu(x) with `input_relu` (eager mode).

    Where autograd records it is one autograd node (see `_Bam`); otherwise it writes over x where `inplace`
    allows (and over the ReLU's output, which is its own), else into one new tensor. The gates are called with
    what they start from: `channel_gate(r, pooled)` with the (B, C) mean of r over H, W and
    `spatial_gate(r, reduced)` with the output of `spatial_gate.conv_reduce` on r.
    """
    if torch.is_grad_enabled():
        channel_params = list(channel_gate.parameters())
        return _Bam.apply(x, channel_gate, spatial_gate, fusion, input_relu, len(channel_params), *channel_params,
                          *spatial_gate.parameters())
    if input_relu:
        x = x.relu_() if inplace else torch.relu(x)
        inplace = True
    conv_reduce = spatial_gate.conv_reduce
    channel = channel_gate(x, x.mean((2, 3)))
    spatial = spatial_gate(x, _pointwise_conv(x, conv_reduce.weight, conv_reduce.bias))
    return _refine(x, channel, spatial, fusion, overwrite=inplace)


def _detached(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if t is None else t.detach()


def _refine(
        x: torch.Tensor,
        channel: torch.Tensor,
        spatial: torch.Tensor,
        fusion: str,
        overwrite: bool,
) -> torch.Tensor:
    """x * (1 + sigmoid(fuse(channel, spatial))), one batch slice of gate at a time, written over x where
    `overwrite` allows and the result keeps x's dtype, else into a new tensor of the promoted dtype."""
    dtype = torch.promote_types(x.dtype, torch.promote_types(channel.dtype, spatial.dtype))
    out = x if overwrite and dtype == x.dtype else torch.empty_like(x, dtype=dtype)
    slices = _batch_slices(x, channel, spatial)
    buffer = _gate_like(x[slices[0]], channel, spatial)
    for part in slices:
        xs = x[part]
        torch.addcmul(xs, xs, _combined_sigmoid(channel[part], spatial[part], fusion, buffer[:xs.shape[0]]),
                      out=out[part])
    return out


def _batch_slices(x: torch.Tensor, *small: torch.Tensor) -> List[slice]:
    """Slices of about a quarter of the batch (all of it where the small tensors broadcast over the batch)."""
    batch = x.shape[0]
    if any(t.shape[0] != batch for t in small):
        return [slice(None)]
    step = max(1, -(-batch // 4))
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


# oneDNN copies a large NCHW input into its blocked layout before a 1x1 convolution; above 32 MiB (glibc's
# largest mmap threshold) that copy lands in fresh pages on every call. A matrix product reads the input where it
# is: 5 ms instead of 22 ms for BAM's 256 -> 16 reduction of a 16 x 256 x 56 x 56 map on 2 cores.
_MATMUL_MIN_BYTES = 32 * 1024 * 1024


def _pointwise_conv(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    if x.device.type == 'cpu' and x.is_contiguous() and x.numel() * x.element_size() >= _MATMUL_MIN_BYTES:
        batch, _, height, width = x.shape
        weight = weight.flatten(1)
        # bmm on the weight expanded over the batch: matmul may fold the batch into a transposed copy of x
        out = torch.bmm(weight.to(x.dtype).expand(batch, -1, -1), x.flatten(2))
        if bias is not None:
            out.add_(bias.to(out.dtype).view(1, -1, 1))
        return out.view(batch, weight.shape[0], height, width)
    return F.conv2d(x, weight, bias)


class _Cbam(torch.autograd.Function):
    """CBAM's refinement `x * Mc * Ms` as one autograd node that keeps only x of full size for backward and
    writes the gradient of x into a single full-size tensor.

    Written with plain ops, autograd keeps the channel-refined map and gives x three full-size gradients (the
    output product's, the channel-wise pools' and the spatial pools'), each a fresh allocation, then adds them.
    Here the gates' small networks (shared MLP; 7x7 conv, BN) run with their own autograd graph from the pooled
    descriptors, and backward walks the full-size steps itself, one batch slice at a time in reused buffers:
    d out / d Ms, then through Ms's network to the channel-wise pools, then d refined, d Mc and Mc's share of
    d x, then through Mc's network to the spatial pools, then their share of d x. Tied maxima share the
    gradient, as with amax.
    """

    @staticmethod
    def forward(ctx, x, channel_gate, spatial_gate, num_channel_params, *params):
        peak_hw = x.amax((2, 3))
        pooled_hw = torch.cat([x.mean((2, 3)), peak_hw], dim=0).requires_grad_()
        with torch.enable_grad():
            channel = channel_gate(x, pooled_hw)
        refined = x * channel.detach()
        peak_c = channel_amax(refined)
        pooled_c = torch.cat([peak_c, refined.mean(1, keepdim=True)], dim=1).requires_grad_()
        with torch.enable_grad():
            spatial = spatial_gate(refined, pooled_c)
        ctx.save_for_backward(x, channel.detach(), spatial.detach(), peak_hw, peak_c)
        ctx.graphs = (pooled_hw, channel, pooled_c, spatial)
        ctx.params = (params[:num_channel_params], params[num_channel_params:])
        if torch.promote_types(refined.dtype, spatial.dtype) == refined.dtype:
            return refined.mul_(spatial.detach())
        return refined * spatial.detach()

    @staticmethod
    def backward(ctx, grad):
        x, channel, spatial, peak_hw, peak_c = ctx.saved_tensors
        pooled_hw, channel_graph, pooled_c, spatial_graph = ctx.graphs
        channel_params, spatial_params = ctx.params
        need_x = ctx.needs_input_grad[0]
        batch, channels, height, width = x.shape
        dtype = torch.promote_types(grad.dtype, torch.promote_types(x.dtype, channel.dtype))
        slices = _batch_slices(x)
        # reused per-slice buffers and a floating-point mask: fresh pages and bool-to-number conversions cost
        # more than the math
        buffer = torch.empty_like(x[slices[0]], dtype=dtype)
        mask = torch.empty_like(buffer)
        grad_x = torch.empty_like(x, dtype=dtype) if need_x else None

        # d out / d Ms = sum over C of grad * x * Mc
        grad_spatial = torch.empty_like(spatial, dtype=dtype)
        for part in slices:
            g, xs, ch = grad[part], x[part], channel[part]
            gx = _as_matrix(torch.mul(g, xs, out=buffer[:xs.shape[0]]))  # (b, C, HW)
            ch_row = ch.to(dtype).reshape(xs.shape[0], 1, channels)
            grad_spatial[part] = torch.bmm(ch_row, gx).view(grad_spatial[part].shape)
        grad_pooled_c, spatial_param_grads = _small_backward(spatial_graph, grad_spatial, pooled_c, spatial_params)
        grad_pooled_c = grad_pooled_c.to(dtype)
        grad_peak_c, grad_mean_c = grad_pooled_c[:, :1], grad_pooled_c[:, 1:] / channels

        # d refined = grad * Ms + the channel-wise pools' share; Mc's gradient and Mc's share of d x follow
        grad_channel = torch.empty_like(channel, dtype=dtype)
        for part in slices:
            g, xs, ch, sp = grad[part], x[part], channel[part], spatial[part]
            n = xs.shape[0]
            is_peak = torch.mul(xs, ch, out=mask[:n]).eq_(peak_c[part])
            share = grad_peak_c[part] / is_peak.sum(1, keepdim=True)
            grad_refined = torch.addcmul(grad_mean_c[part], g, sp, out=buffer[:n]).addcmul_(is_peak, share)
            # the mask's buffer is free again; a product into it and a sum beat a batch of row dot products
            # (0.5 vs 1.5 ms for a quarter batch of layer1 maps)
            grad_channel[part] = torch.mul(grad_refined, xs, out=mask[:n]).sum((2, 3), keepdim=True)
            if grad_x is not None:
                torch.mul(grad_refined, ch, out=grad_x[part])
        grad_pooled_hw, channel_param_grads = _small_backward(
            channel_graph, grad_channel, pooled_hw, channel_params)

        # the spatial pools' share of d x: the mean's, broadcast over H, W, and the maxima's
        if grad_x is not None:
            grad_pooled_hw = grad_pooled_hw.to(dtype)
            grad_mean_hw = (grad_pooled_hw[:batch] / (height * width)).view(batch, channels, 1, 1)
            grad_peak_hw = grad_pooled_hw[batch:].reshape(batch, channels, 1, 1)
            for part in slices:
                xs = x[part]
                n = xs.shape[0]
                is_peak = torch.eq(xs, peak_hw[part].view(n, channels, 1, 1), out=mask[:n])
                share = grad_peak_hw[part] / is_peak.sum((2, 3), keepdim=True)
                grad_x[part].add_(torch.addcmul(grad_mean_hw[part], is_peak, share, out=is_peak))
        return (grad_x, None, None, None, *channel_param_grads, *spatial_param_grads)


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
def cbam_refine(x: torch.Tensor, channel_gate: torch.nn.Module, spatial_gate: torch.nn.Module) -> torch.Tensor:
    """CBAM's `Ms(x * Mc(x)) * (x * Mc(x))` as one autograd node (eager training). The gates are called with the
    pooled descriptors they start from: `channel_gate(x, pooled)` with the (2B, C) [mean; max] over H, W, and
    `spatial_gate(refined, pooled)` with the (B, 2, H, W) [max, mean] over channels."""
    channel_params = list(channel_gate.parameters())
    return _Cbam.apply(x, channel_gate, spatial_gate, len(channel_params), *channel_params,
                       *spatial_gate.parameters())

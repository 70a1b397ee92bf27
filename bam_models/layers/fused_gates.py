""" Memory-lean gating for BAM and CBAM

Written with plain tensor ops, `x * (1 + sigmoid(Mc * Ms))` makes autograd keep two full-size B x C x H x W
tensors per BAM (the sigmoid output and `1 + sigmoid`), and CBAM's `x * cg * sg` keeps the channel-refined
map `x * cg` alive as well. Those are the largest tensors of the network, saved only so that backward can
read them again. The autograd functions here save the input and the small gates instead (B x C x 1 x 1 and
B x 1 x H x W) and recompute the full-size product in backward, which costs one extra elementwise pass and
saves one to two activation-sized tensors per module. Reductions over the broadcast dimensions are batched
matrix products, so backward allocates no extra full-size temporaries for them.

Gradients equal those of the plain formulation up to float rounding. Scripting, tracing, ONNX export,
torch.export and torch.compile see the plain formulation (`fused_gating_supported()` decides), because
custom autograd functions are opaque to them and compilers fuse these elementwise ops on their own. FX
symbolic tracing (timm's feature extractors) treats the entry points as leaf functions.
"""
from typing import List

import torch

from timm.layers._fx import register_notrace_function

__all__ = [
    'bam_gate', 'cbam_channel_pool', 'cbam_refine', 'cbam_spatial_pool', 'cbam_spatial_scale', 'fused_gating_supported',
]


@torch.jit.unused
def fused_gating_supported() -> bool:
    """True in eager mode; False while scripting, tracing, exporting or compiling, which need plain ops."""
    if torch.jit.is_scripting() or torch.jit.is_tracing():
        return False
    if torch.onnx.is_in_onnx_export():
        return False
    return not torch.compiler.is_compiling()


def _as_matrix(t: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, H*W) as a view for both contiguous and channels_last layouts."""
    return t.flatten(2)


def _combined_sigmoid(x: torch.Tensor, channel: torch.Tensor, spatial: torch.Tensor, fusion: str) -> torch.Tensor:
    """sigmoid(fuse(channel, spatial)) as one full-size tensor laid out like x (channels_last stays so)."""
    dtype = torch.promote_types(x.dtype, torch.promote_types(channel.dtype, spatial.dtype))
    gate = torch.empty_like(x, dtype=dtype)
    if fusion == 'product':
        torch.mul(channel, spatial, out=gate)
    elif fusion == 'sum':
        torch.add(channel, spatial, out=gate)
    else:
        torch.maximum(channel, spatial, out=gate)
    return gate.sigmoid_()


def _plain_bam_gate(x: torch.Tensor, channel: torch.Tensor, spatial: torch.Tensor, fusion: str) -> torch.Tensor:
    if fusion == 'product':
        logits = channel * spatial
    elif fusion == 'sum':
        logits = channel + spatial
    else:
        logits = torch.maximum(channel, spatial)
    return x * (1. + torch.sigmoid(logits))


class _BamGate(torch.autograd.Function):
    """out = x * (1 + sigmoid(fuse(channel, spatial))), saving x and the two small branch outputs."""

    @staticmethod
    def forward(ctx, x, channel, spatial, fusion):
        ctx.fusion = fusion
        ctx.save_for_backward(x, channel, spatial)
        gate = _combined_sigmoid(x, channel, spatial, fusion)
        x = x.to(gate.dtype)
        # x + x * gate, written over the gate buffer: one pass, one full-size allocation in all
        return torch.addcmul(x, x, gate, out=gate)

    @staticmethod
    def backward(ctx, grad):
        x, channel, spatial = ctx.saved_tensors
        need_x, need_channel, need_spatial, _ = ctx.needs_input_grad
        grad_x = torch.empty_like(x) if need_x else None
        grad_channel = torch.empty_like(channel) if need_channel else None
        grad_spatial = torch.empty_like(spatial) if need_spatial else None
        # batch slices bound the full-size temporaries (the rebuilt gate, d out / d logits) to one slice each
        for part in _batch_slices(x, channel, spatial):
            g, xs, ch, sp = grad[part], x[part], channel[part], spatial[part]
            gate = _combined_sigmoid(xs, ch, sp, ctx.fusion)
            if need_channel or need_spatial:
                # d out / d logits = x * gate * (1 - gate)
                grad_logits = torch.mul(g, xs).to(gate.dtype)
                torch.ops.aten.sigmoid_backward.grad_input(grad_logits, gate, grad_input=grad_logits)
                _reduce_logit_grads(grad_logits, ch, sp, ctx.fusion, grad_channel, grad_spatial, part)
                del grad_logits
            if grad_x is not None:
                if gate.dtype == x.dtype:
                    torch.addcmul(g, g, gate, out=grad_x[part])
                else:
                    grad_x[part] = torch.addcmul(g, g, gate)
        return grad_x, grad_channel, grad_spatial, None


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
            sp = spatial.to(g.dtype).reshape(spatial.shape[0], -1, 1)  # (b, HW, 1)
            grad_channel[part] = torch.bmm(g, sp).view(channel.shape)
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


@register_notrace_function
def bam_gate(x: torch.Tensor, channel: torch.Tensor, spatial: torch.Tensor, fusion: str = 'product') -> torch.Tensor:
    """BAM's refinement `x * (1 + sigmoid(fuse(channel, spatial)))` for channel logits (B, C, 1, 1) and
    spatial logits (B, 1, H, W), fused as 'product', 'sum' or 'max'."""
    if fusion != 'product' and fusion != 'sum' and fusion != 'max':
        raise ValueError("BAM fusion must be 'product', 'sum' or 'max', got '" + fusion + "'.")
    if not torch.jit.is_scripting() and fused_gating_supported():
        return _fused_bam_gate(x, channel, spatial, fusion)
    return _plain_bam_gate(x, channel, spatial, fusion)


@torch.jit.unused
def _fused_bam_gate(x: torch.Tensor, channel: torch.Tensor, spatial: torch.Tensor, fusion: str) -> torch.Tensor:
    return _BamGate.apply(x, channel, spatial, fusion)


# CBAM, fused: every full-size step reads x and the small gates, and each backward writes its share of the
# gradient of x into one fresh buffer (the autograd engine adds the three shares in place). Full-size
# allocations are the expensive part on CPU, so backward makes three instead of the plain graph's eight or more
# (mean and amax backward, the broadcast products and their reductions each materialise a full-size tensor).


class _CbamSpatialPool(torch.autograd.Function):
    """[mean, max] over H, W of x as one (2B, C) batch for the shared MLP."""

    @staticmethod
    def forward(ctx, x):
        peak = x.amax((2, 3))
        ctx.save_for_backward(x, peak)
        return torch.cat([x.mean((2, 3)), peak], dim=0)

    @staticmethod
    def backward(ctx, grad):
        x, peak = ctx.saved_tensors
        batch, channels = peak.shape
        grad_mean = (grad[:batch] / (x.shape[2] * x.shape[3])).view(batch, channels, 1, 1)
        grad_peak = grad[batch:].reshape(batch, channels, 1, 1)
        grad_x = torch.empty_like(x, dtype=grad.dtype)
        slices = _batch_slices(x)
        # a reused floating-point mask: fresh pages and bool-to-number conversions cost more than the math
        mask = torch.empty_like(x[slices[0]], dtype=grad.dtype)
        for part in slices:
            is_peak = torch.eq(x[part], peak[part].view(-1, channels, 1, 1), out=mask[:grad_x[part].shape[0]])
            # amax's rule: tied maxima share the gradient
            share = grad_peak[part] / is_peak.sum((2, 3), keepdim=True)
            torch.addcmul(grad_mean[part], is_peak, share, out=grad_x[part])
        return grad_x


@register_notrace_function
def cbam_spatial_pool(x: torch.Tensor) -> torch.Tensor:
    """CBAM's channel descriptors [mean over H, W; max over H, W] stacked along the batch, (2B, C)."""
    if not torch.jit.is_scripting() and torch.is_grad_enabled() and fused_gating_supported():
        return _fused_cbam_spatial_pool(x)
    return torch.cat([x.mean((2, 3)), x.amax((2, 3))], dim=0)


@torch.jit.unused
def _fused_cbam_spatial_pool(x: torch.Tensor) -> torch.Tensor:
    return _CbamSpatialPool.apply(x)


@register_notrace_function
def cbam_refine(x: torch.Tensor, channel: torch.Tensor) -> torch.Tensor:
    """x * channel. In fused training it is a plain buffer outside autograd: `cbam_channel_pool` and
    `cbam_spatial_scale` take x and channel as their differentiable inputs and rebuild it in backward."""
    if not torch.jit.is_scripting() and torch.is_grad_enabled() and fused_gating_supported():
        return _detached_product(x, channel)
    return x * channel


@torch.jit.unused
def _detached_product(x: torch.Tensor, channel: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return x * channel


class _CbamChannelPool(torch.autograd.Function):
    """[max, mean] over the channels of refined = x * channel, differentiable in x and channel.

    `refined` is only read in forward; backward rebuilds it a batch slice at a time from x and channel (kept by
    CBAM anyway), so no full-size map is kept. Tied maxima share the gradient, as with amax.
    """

    @staticmethod
    def forward(ctx, refined, x, channel):
        peak = refined.amax(1, keepdim=True)
        ctx.save_for_backward(x, channel, peak)
        return torch.cat([peak, refined.mean(1, keepdim=True)], dim=1)

    @staticmethod
    def backward(ctx, grad):
        x, channel, peak = ctx.saved_tensors
        need_x, need_channel = ctx.needs_input_grad[1:]
        dtype = torch.promote_types(x.dtype, channel.dtype)
        grad_x = torch.empty_like(x) if need_x else None
        grad_channel = torch.empty_like(channel) if need_channel else None
        slices = _batch_slices(x, channel)
        # reused per-slice buffers and a floating-point mask: fresh pages and bool-to-number conversions cost
        # more than the math
        buffer = torch.empty_like(x[slices[0]], dtype=dtype)
        mask = torch.empty_like(buffer)
        for part in slices:
            g, xs, ch = grad[part].to(dtype), x[part], channel[part]
            n = xs.shape[0]
            refined = torch.mul(xs, ch, out=buffer[:n])
            is_peak = torch.eq(refined, peak[part], out=mask[:n])
            grad_mean = g[:, 1:] / x.shape[1]
            share = g[:, :1] / is_peak.sum(1, keepdim=True)
            grad_refined = torch.addcmul(grad_mean, is_peak, share, out=refined)
            if grad_channel is not None:
                grad_channel[part] = _as_matrix(grad_refined).mul(_as_matrix(xs)).sum(2).view(ch.shape)
            if grad_x is not None:
                torch.mul(grad_refined, ch, out=grad_x[part])
        return None, grad_x, grad_channel


@register_notrace_function
def cbam_channel_pool(refined: torch.Tensor, x: torch.Tensor, channel: torch.Tensor) -> torch.Tensor:
    """CBAM's spatial descriptor [max, mean] over channels, (B, 2, H, W), for refined = cbam_refine(x, channel)."""
    if not torch.jit.is_scripting() and torch.is_grad_enabled() and fused_gating_supported():
        return _fused_cbam_channel_pool(refined, x, channel)
    return torch.cat([refined.amax(1, keepdim=True), refined.mean(1, keepdim=True)], dim=1)


@torch.jit.unused
def _fused_cbam_channel_pool(refined: torch.Tensor, x: torch.Tensor, channel: torch.Tensor) -> torch.Tensor:
    return _CbamChannelPool.apply(refined, x, channel)


class _CbamSpatialScale(torch.autograd.Function):
    """out = x * channel * spatial, written over `refined` (= x * channel, which nothing else reads), and
    differentiable in x, channel and spatial; saves those three, nothing full-size but x."""

    @staticmethod
    def forward(ctx, refined, spatial, x, channel):
        ctx.save_for_backward(spatial, x, channel)
        if torch.promote_types(refined.dtype, spatial.dtype) == refined.dtype:
            ctx.mark_dirty(refined)
            return refined.mul_(spatial)
        return refined * spatial

    @staticmethod
    def backward(ctx, grad):
        spatial, x, channel = ctx.saved_tensors
        need_spatial, need_x, need_channel = ctx.needs_input_grad[1:]
        grad_x = torch.empty_like(x, dtype=grad.dtype) if need_x else None
        grad_channel = torch.empty_like(channel) if need_channel else None
        grad_spatial = torch.empty_like(spatial) if need_spatial else None
        slices = _batch_slices(x, channel, spatial)
        buffer = None
        if grad_spatial is not None or grad_channel is not None:  # reused: fresh pages cost more than the math
            buffer = torch.empty_like(x[slices[0]], dtype=torch.promote_types(grad.dtype, x.dtype))
        for part in slices:
            g, xs, ch, sp = grad[part], x[part], channel[part], spatial[part]
            if buffer is not None:
                gx = _as_matrix(torch.mul(g, xs, out=buffer[:xs.shape[0]]))  # (b, C, HW)
                if grad_spatial is not None:  # sum over C of grad * x * channel
                    ch_row = ch.to(gx.dtype).reshape(gx.shape[0], 1, gx.shape[1])
                    grad_spatial[part] = torch.bmm(ch_row, gx).view(sp.shape)
                if grad_channel is not None:  # sum over H, W of grad * x * spatial
                    sp_col = sp.to(gx.dtype).reshape(gx.shape[0], -1, 1)
                    grad_channel[part] = torch.bmm(gx, sp_col).view(ch.shape)
            if grad_x is not None:
                out = grad_x[part]
                torch.mul(g, ch, out=out)
                out.mul_(sp)
        return None, grad_spatial, grad_x, grad_channel


@register_notrace_function
def cbam_spatial_scale(
        refined: torch.Tensor,
        spatial: torch.Tensor,
        x: torch.Tensor,
        channel: torch.Tensor,
) -> torch.Tensor:
    """CBAM's last step `refined * spatial` for refined = cbam_refine(x, channel), written over `refined`
    (callers pass a `refined` that nothing else reads afterwards)."""
    if not torch.jit.is_scripting() and fused_gating_supported():
        if torch.is_grad_enabled():
            return _fused_cbam_spatial_scale(refined, spatial, x, channel)
        if torch.promote_types(refined.dtype, spatial.dtype) == refined.dtype:
            return refined.mul_(spatial)
    return refined * spatial


@torch.jit.unused
def _fused_cbam_spatial_scale(
        refined: torch.Tensor,
        spatial: torch.Tensor,
        x: torch.Tensor,
        channel: torch.Tensor,
) -> torch.Tensor:
    return _CbamSpatialScale.apply(refined, spatial, x, channel)

""" The plain BAM and CBAM formulas: the reference every fused path is tested against

Written with ordinary tensor ops, so autograd differentiates them on its own: double backward, torch.func,
scripting, tracing, export and compilers all work on them. They are what `BAM` and `CBAM` run with the fused
gating switched off (`bam_models.layers.set_fused_gating(False)`), and what the gate modules' `forward` computes.

BAM (Park et al., BMVC 2018), for a feature map F of shape (B, C, H, W):

    Mc(F) = W1 relu(BN(W0 AvgPool(F) + b0)) + b1                      (B, C, 1, 1)
    Ms(F) = f_1x1(relu(BN(f_3x3,d(relu(BN(f_3x3,d(relu(BN(f_1x1(F)))))))))     (B, 1, H, W)
    M(F)  = sigmoid(Mc(F) * Ms(F))         the authors' released weights ('product')
          = sigmoid(BN(Mc(F)) + BN(Ms(F)))  the paper's eq. 2 ('sum')
          = sigmoid(max(BN(Mc(F)), BN(Ms(F))))  the paper's ablation ('max')
          = sigmoid(Mc(F)) or sigmoid(Ms(F))  single-branch ablations (gates='channel' / 'spatial')
    F'    = F + F * M(F)                                            eq. 1

where `input_relu` takes F = relu(input).

CBAM (Woo et al., ECCV 2018), channel gate then spatial gate:

    Mc(F)  = sigmoid(MLP(AvgPool(F)) + MLP(MaxPool(F)))              (B, C, 1, 1)
    F'     = Mc(F) * F
    Ms(F') = sigmoid(BN(f_7x7([MaxPool_c(F'); AvgPool_c(F')])))      (B, 1, H, W), max first as released
    F''    = Ms(F') * F'

with the authors' pooling options for Mc (`pool_types`, each descriptor through the shared MLP, summed):
'avg', 'max', 'lp' = sqrt(sum over H, W of F^2) (their `F.lp_pool2d(x, 2, (H, W))`: the sum, not the mean) and
'lse' = log(sum over H, W of exp(F)) (their max-shifted `logsumexp_2d`).
"""
from typing import List, Optional

import torch
import torch.nn.functional as F

from .config import exporting

__all__ = [
    'CBAM_POOL_TYPES', 'bam_attention_logits', 'bam_refine_reference', 'cbam_channel_descriptors',
    'cbam_channel_weights_for_export',
    'cbam_spatial_descriptors', 'mlp_pool_sum',
]


def bam_attention_logits(channel: Optional[torch.Tensor], spatial: Optional[torch.Tensor], fusion: str) -> torch.Tensor:
    """The logits of M(F) from the branch logits Mc (B, C, 1, 1) and Ms (B, 1, H, W); either may be absent."""
    if channel is None:
        assert spatial is not None
        return spatial
    if spatial is None:
        return channel
    if fusion == 'product':
        return channel * spatial
    if fusion == 'sum':
        return channel + spatial
    return torch.maximum(channel, spatial)


def bam_refine_reference(features: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """F' = F + F * sigmoid(logits), written as F * (1 + sigmoid(logits))."""
    return features * (1. + torch.sigmoid(logits))


CBAM_POOL_TYPES = ('avg', 'max', 'lp', 'lse')


def _pool(x: torch.Tensor, pool_type: str) -> torch.Tensor:
    """One channel descriptor (B, C) of `x` pooled over H, W."""
    if pool_type == 'avg':
        return x.mean((2, 3))
    if pool_type == 'max':
        return x.amax((2, 3))
    if pool_type == 'lp':
        return x.square().sum((2, 3)).sqrt()
    return torch.logsumexp(x.flatten(2), dim=2)  # 'lse'


def cbam_channel_descriptors(x: torch.Tensor, pool_types: List[str]) -> torch.Tensor:
    """The descriptors of `pool_types` over H, W stacked along the batch, (len(pool_types) * B, C): all go
    through the shared MLP as one batch."""
    return torch.cat([_pool(x, pool_type) for pool_type in pool_types], dim=0)


def mlp_pool_sum(mlp_out: torch.Tensor, num_pools: int = 2) -> torch.Tensor:
    """sigmoid(sum over the pool types of MLP(Pool(F))) as (B, C, 1, 1) from the MLP's (num_pools * B, C) output."""
    batch = mlp_out.shape[0] // num_pools
    return torch.sigmoid(mlp_out.view(num_pools, batch, mlp_out.shape[1]).sum(0)).view(batch, mlp_out.shape[1], 1, 1)


def cbam_spatial_descriptors(x: torch.Tensor) -> torch.Tensor:
    """[MaxPool_c(F'); AvgPool_c(F')] over channels, (B, 2, H, W), the max first as the authors' weights expect."""
    return torch.cat([x.amax(1, keepdim=True), _channel_mean(x)], dim=1)


def _channel_mean(x: torch.Tensor) -> torch.Tensor:
    """The mean over channels, (B, 1, H, W); torch.export-based exporters get a 1x1 convolution with weights 1 / C,
    the same numbers, which onnxruntime runs with its convolution kernels instead of a strided ReduceMean
    (resnet50_cbam at batch 1: 1.17-1.22x of resnet50 instead of 1.26-1.28x). Tracing exporters keep the mean:
    they would trace C from x's shape into a weight of unknown shape."""
    if not torch.jit.is_scripting():
        if exporting() and not torch.jit.is_tracing():
            channels = x.shape[1]
            return F.conv2d(x, torch.full((1, channels, 1, 1), 1. / channels, dtype=x.dtype, device=x.device))
    return x.mean(1, keepdim=True)


def cbam_channel_weights_for_export(x: torch.Tensor, fc1: torch.nn.Module, act: torch.nn.Module,
                                    fc2: torch.nn.Module) -> torch.Tensor:
    """sigmoid(MLP(AvgPool(F)) + MLP(MaxPool(F))), (B, C, 1, 1), as few ONNX nodes: the (B, C, 1, 1) pools
    (GlobalAveragePool / GlobalMaxPool) side by side along W, the MLP's 1x1 convolutions once on both, and the sum
    over the two. No stacking and slicing along the batch, no second copy of the MLP; the same numbers as the
    (2B, C) form."""
    pooled = torch.cat([x.mean((2, 3), keepdim=True), x.amax((2, 3), keepdim=True)], dim=3)  # (B, C, 1, 2)
    return torch.sigmoid(fc2(act(fc1(pooled))).sum(3, keepdim=True))

""" Kernel choices of the fused BAM/CBAM gating, per device kind, each with the measurement it rests on

Every heuristic of `fused_gates.py` reads its constant from the table below and applies only on the device
kind it was measured on. A device kind without a row (CUDA, MPS, XPU...) runs the fused nodes with whole-batch
ops and ATen's own kernel choices until a measurement on it says otherwise (`scripts/gpu_check.py` measures
the fused path against the reference on a GPU).
"""
from dataclasses import dataclass
from typing import Dict, Optional

import torch

__all__ = ['GatingTuning', 'TUNING', 'WHOLE_BATCH', 'tuning_for']


@dataclass(frozen=True)
class GatingTuning:
    # inputs of at least this many bytes take BAM's 1x1 reduction as a batched matrix product (None: never)
    matmul_min_bytes: Optional[int] = None
    # full-size steps of backward (and of the inference refinement) run over this many batch slices, reusing
    # buffers of one slice's size
    batch_slices: int = 1
    # CBAM's max over channels in two steps over strided groups of this many channels (None: one amax)
    amax_group: Optional[int] = None
    # batch-1 dilated 3x3 convolutions of at most this many input elements run as space-to-batch (0: never)
    space_to_batch_max_numel: int = 0
    # BAM's spatial branch after its 1x1 reduction is recomputed in backward instead of kept
    recompute_spatial: bool = False
    # the machine the choices were measured on, which every benchmark table names next to its own CPU: a
    # choice holds for that CPU; on another one it is a default until measured there
    measured_on: str = 'nothing (ATen defaults)'


WHOLE_BATCH = GatingTuning()

# Measured on the project's 2-core AMD EPYC virtual machine (no GPU), torch 2.14.1, 2 threads, batch 16 at 224 px
# unless stated, median of repeated calls:
TUNING: Dict[str, GatingTuning] = {
    'cpu': GatingTuning(
        # oneDNN copies a large NCHW input into its blocked layout before a 1x1 convolution, and above 32 MiB
        # (glibc's largest mmap threshold) that copy lands in fresh pages on every call; a matrix product reads
        # the input in place: 5 ms instead of 22 ms for the 256 -> 16 reduction of a 16 x 256 x 56 x 56 map
        matmul_min_bytes=32 * 1024 * 1024,
        # a quarter-batch buffer is a quarter of a full-size map: the rebuilt gate and its products stay
        # in cache-sized pieces and add a quarter of a map to the peak instead of a whole one (resnet50_bam's
        # tensor peak 1.004x of resnet50's)
        batch_slices=4,
        # ATen vectorises a max over channels along H*W, short in late stages: a 2048 x 7 x 7 map takes
        # 0.89 ms in one reduction and 0.11 ms in two steps over groups of 16 channels
        amax_group=16,
        # ATen's CPU dispatch sends batch-1 convolutions of at most 20480 input elements to its native kernels,
        # for a dilated kernel the slow `slow_conv_dilated2d`; an undilated convolution over the d x d
        # sub-images is several times faster there (resnet50_bam batch-1 latency)
        space_to_batch_max_numel=20480,
        # keeps one reduced-width map per BAM instead of six for backward (test_fused_attention counts them);
        # the recomputation costs a few narrow convolutions
        recompute_spatial=True,
        measured_on='AMD EPYC, 2-core virtual machine, torch 2.14.1',
    ),
}


def tuning_for(device: torch.device) -> GatingTuning:
    """The kernel choices measured for `device`'s kind, else whole-batch ops."""
    return TUNING.get(device.type, WHOLE_BATCH)

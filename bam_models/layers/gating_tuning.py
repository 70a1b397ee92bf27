""" Kernel choices of the fused BAM/CBAM gating: measured at first use on CPU, with a table of defaults

Some full-size steps of `fused_gates.py` (and BAM's dilated convolutions) have two or a few numerically
equivalent kernels whose speed depends on the CPU model, the thread count and the allocator: BAM's 1x1 reduction
as a convolution or a batched matrix product, CBAM's max over channels in one step or two, a dilated 3x3
convolution as itself or over space-to-batch sub-images. Like `cudnn.benchmark`, `choose_kernel` times each
candidate a few times on the real inputs the first time an (op, shapes, strides, dtypes, thread count, autocast)
key comes up, and keeps the fastest for the rest of the process; `kernel_choices()` lists what was chosen.

It measures only on CPU, in plain eager mode: scripting, tracing, ONNX export, torch.export, torch.compile,
torch.func transforms, FX tracing and any dispatch mode (fake tensors, FLOP counters) take the table's default,
as do every other device kind and `torch.use_deterministic_algorithms(True)`. The switch, like `config`'s:
`set_gating_autotune(enabled)`, the `gating_autotune(enabled)` context manager or the environment variable
`BAM_MODELS_GATING_AUTOTUNE=0|1` (default 1, read on first use); off, every choice is the table's.

The table `TUNING` holds, per device kind, those defaults and the two memory choices, which stay constants:
`batch_slices` and `recompute_spatial` trade speed for bytes held, and bytes do not depend on the CPU model.
A device kind without a row (CUDA, MPS, XPU...) runs the fused nodes with whole-batch ops and ATen's own kernel
choices until a measurement on it says otherwise (`scripts/gpu_check.py` measures the fused path against the
reference on a GPU).
"""
import contextlib
import math
import time
from dataclasses import dataclass
from typing import Callable, ContextManager, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch.fx._symbolic_trace import is_fx_symbolic_tracing
from torch.utils._python_dispatch import _get_current_dispatch_mode

from .config import ProcessSwitch, fused_gating_supported

__all__ = [
    'AUTOTUNE', 'AUTOTUNE_ENV', 'GatingTuning', 'KernelChoice', 'TUNING', 'WHOLE_BATCH', 'choose_kernel',
    'forced_kernel', 'gating_autotune', 'gating_autotune_from_env', 'kernel_choices', 'set_gating_autotune',
    'tuning_for', 'use_gating_autotune',
]


@dataclass(frozen=True)
class GatingTuning:
    # default where nothing is measured: inputs of at least this many bytes take BAM's 1x1 reduction as a
    # batched matrix product (None: never)
    matmul_min_bytes: Optional[int] = None
    # memory: full-size steps of backward (and of the inference refinement) run over this many batch slices,
    # reusing buffers of one slice's size
    batch_slices: int = 1
    # default where nothing is measured: CBAM's max over channels in two steps over strided groups of this many
    # channels (None: one amax)
    amax_group: Optional[int] = None
    # default where nothing is measured: batch-1 dilated 3x3 convolutions of at most this many input elements
    # run as space-to-batch (0: never)
    space_to_batch_max_numel: int = 0
    # memory: BAM's spatial branch after its 1x1 reduction is recomputed in backward instead of kept
    recompute_spatial: bool = False
    # the machine the defaults were measured on, which every benchmark table names next to its own CPU and the
    # choices measured there
    measured_on: str = 'nothing (ATen defaults)'


WHOLE_BATCH = GatingTuning()

# Measured on the project's 2-core AMD EPYC virtual machine (no GPU), torch 2.14.1, 2 threads, batch 16 at 224 px
# unless stated, median of repeated calls. On other CPUs the speed defaults are only where measuring is off:
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
    """The defaults and memory choices measured for `device`'s kind, else whole-batch ops."""
    return TUNING.get(device.type, WHOLE_BATCH)


AUTOTUNE_ENV = 'BAM_MODELS_GATING_AUTOTUNE'


AUTOTUNE = ProcessSwitch(AUTOTUNE_ENV, 'kernel choices of the fused gating measured at first use',
                         "the tuning table's defaults")


def gating_autotune_from_env() -> bool:
    """`BAM_MODELS_GATING_AUTOTUNE` as a bool (1 when unset); a `UsageError` for any value but 0 or 1."""
    return AUTOTUNE.from_env()


def use_gating_autotune() -> bool:
    """Whether kernel choices are measured now (the process-wide setting)."""
    return AUTOTUNE.get()


def set_gating_autotune(enabled: bool) -> None:
    """Measure kernel choices at first use (default), or take the tuning table's defaults."""
    AUTOTUNE.set(enabled)


def gating_autotune(enabled: bool) -> ContextManager[None]:
    """`with gating_autotune(False): ...` runs the block with the switch set, then restores the previous setting."""
    return AUTOTUNE.scoped(enabled)


@dataclass(frozen=True)
class KernelChoice:
    """One measured choice: the op, its first input's shape and dtype, the thread count, whether backward was
    measured too, the kernel kept, the table's default and the best time of each candidate in seconds."""
    op: str
    shape: Tuple[int, ...]
    dtype: str
    threads: int
    backward: bool
    kernel: str
    default: str
    seconds: Tuple[Tuple[str, float], ...]

    def __str__(self) -> str:
        shape = 'x'.join(map(str, self.shape))
        return (f"{self.op} {shape} {self.dtype}{' fwd+bwd' if self.backward else ''}, {self.threads} threads: "
                f"{self.kernel}")


# a candidate runs a few times: once to warm up (first-call allocation, oneDNN primitive creation), then in timed
# rounds interleaving the candidates until the budget is spent, at least one and at most five: a decision costs
# about twice the candidates' run time where they are slow (a batch of 16 at 224 px), little where they are fast
_MIN_ROUNDS, _MAX_ROUNDS, _BUDGET_S = 1, 5, 0.005
# the table's default keeps its place unless another candidate is faster by more than this: noise of a few
# percent should not make two processes on one machine choose differently
_DEFAULT_MARGIN = 1.05

_CHOICES: Dict[tuple, KernelChoice] = {}
_FORCED: Dict[str, str] = {}

Candidate = Callable[..., torch.Tensor]


def choose_kernel(op: str, inputs: Sequence[Optional[torch.Tensor]], candidates: Dict[str, Candidate],
                  default: str, detail: tuple = ()) -> str:
    """The name of the candidate to run `op` with on `inputs` (each candidate takes them as its arguments): forced
    by `forced_kernel`, else measured once per key and kept for the process, else `default` where measuring is
    off or not possible. `detail` adds what the key needs beyond the inputs' shapes, strides and dtypes."""
    if _FORCED.get(op) in candidates:
        return _FORCED[op]
    if len(candidates) < 2 or not _may_measure(inputs[0]):
        return default
    backward = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs)
    key = (op, detail, backward, torch.get_num_threads(), _autocast_state(), *map(_tensor_key, inputs))
    choice = _CHOICES.get(key)
    if choice is None:
        seconds = _measure(op, candidates, inputs, backward)
        fastest = min(seconds, key=seconds.get)
        kernel = default if seconds[default] <= _DEFAULT_MARGIN * seconds[fastest] else fastest
        first = inputs[0]
        choice = _CHOICES.setdefault(key, KernelChoice(
            op, tuple(first.shape), str(first.dtype).replace('torch.', ''), torch.get_num_threads(), backward,
            kernel, default, tuple(seconds.items())))
    return choice.kernel


def kernel_choices() -> List[KernelChoice]:
    """The choices measured so far in this process, in the order they were made."""
    return list(_CHOICES.values())


@contextlib.contextmanager
def forced_kernel(op: str, kernel: str) -> Iterator[None]:
    """`with forced_kernel('bam_reduce_1x1', 'matmul'): ...` runs `op` with `kernel` in the block wherever that is
    one of its candidates, measured or not (to compare candidates, and for tests)."""
    previous = _FORCED.get(op)
    _FORCED[op] = kernel
    try:
        yield
    finally:
        if previous is None:
            del _FORCED[op]
        else:
            _FORCED[op] = previous


def _may_measure(first: torch.Tensor) -> bool:
    """Plain eager mode on a plain CPU tensor with the switch on: compilers, exporters, transforms and dispatch
    modes must see one fixed path, and timing them would measure nothing real. `torch.use_deterministic_algorithms`
    asks for the same rounding in every run, which choices by timing cannot promise (as with cudnn.benchmark)."""
    return (use_gating_autotune() and type(first) is torch.Tensor and first.device.type == 'cpu'
            and not torch.are_deterministic_algorithms_enabled() and fused_gating_supported()
            and not is_fx_symbolic_tracing() and _get_current_dispatch_mode() is None)


def _tensor_key(t: Optional[torch.Tensor]) -> Optional[tuple]:
    return None if t is None else (tuple(t.shape), t.stride(), t.dtype, t.device.type)


def _autocast_state() -> Optional[torch.dtype]:
    return torch.get_autocast_dtype('cpu') if torch.is_autocast_enabled('cpu') else None


def _measure(op: str, candidates: Dict[str, Candidate], inputs: Sequence[Optional[torch.Tensor]],
              backward: bool) -> Dict[str, float]:
    """The best time in seconds of each candidate for `op` on `inputs` (the one place that measures: tests count
    its calls)."""
    return _time_candidates({name: _run(fn, inputs, backward) for name, fn in candidates.items()})


def _run(fn: Candidate, inputs: Sequence[Optional[torch.Tensor]], backward: bool) -> Callable[[], None]:
    """One call of a candidate as it will run: forward only, or forward and backward where autograd records, on
    detached copies so that nothing reaches the caller's graph."""
    if not backward:
        return lambda: fn(*inputs)
    leaves = [None if t is None else t.detach().requires_grad_(t.requires_grad) for t in inputs]
    wanted = [t for t in leaves if t is not None and t.requires_grad]

    def forward_backward():
        with torch.enable_grad():
            out = fn(*leaves)
            torch.autograd.grad(out, wanted, torch.ones_like(out))
    return forward_backward


def _time_candidates(runs: Dict[str, Callable[[], None]]) -> Dict[str, float]:
    """The best time of each run over interleaved rounds after one warm-up call each. Saved-tensor hooks of the
    caller (activation checkpointing) are replaced by plain saving while measuring."""
    seconds = {name: math.inf for name in runs}
    with torch.no_grad(), torch.autograd.graph.saved_tensors_hooks(_same, _same):
        for run in runs.values():
            run()
        deadline = time.perf_counter() + _BUDGET_S
        for round_ in range(_MAX_ROUNDS):
            for name, run in runs.items():
                start = time.perf_counter()
                run()
                seconds[name] = min(seconds[name], time.perf_counter() - start)
            if round_ + 1 >= _MIN_ROUNDS and time.perf_counter() > deadline:
                break
    return seconds


def _same(t: torch.Tensor) -> torch.Tensor:
    return t

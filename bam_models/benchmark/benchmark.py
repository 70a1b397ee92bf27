""" What attention costs: parameters, FLOPs, latency, throughput, training-step time and peak memory.

Every model is measured next to its plain trunk in the same process: each round runs every measurement for
every model of a family, in an order rotated from round to round, and a figure is the median over rounds; a
time ratio is the median over rounds of the model's time over the trunk's in the same round.
All models see the same seeded inputs; one warm-up pass per measurement precedes the rounds; inference runs
under torch.inference_mode for every model; denormal floats are flushed to zero for the whole run (so no model
pays for slow denormal arithmetic the others happen not to hit), and the thread count is reported.
Ratios are costs relative to the trunk (model time / trunk time, model memory / trunk memory), so a value
of 1.05 means 5 % more time or memory than the plain network on the same machine in the same run.

Peak memory is measured twice over one training step (forward, loss, backward, optimizer step) that starts
with gradients set to None, so both count activations, gradients and temporaries but not parameters or
optimizer state. The tensor peak is the largest total of bytes that the step's tensors hold at once, summed
from the profiler's allocation records: deterministic, the CPU counterpart of torch.cuda.max_memory_allocated.
The RSS peak is the growth of the process's peak resident set size, median over `memory_steps` steps (Linux
only: the peak is reset through /proc/self/clear_refs and read from VmHWM, and glibc is told to serve every
allocation above 128 KiB with its own mmap so that freed tensors leave the resident set at once); it adds the
allocator's and the kernel's page granularity and varies by a few percent from run to run. That allocator
setting slows allocation, so memory is measured after all timings. Where a measure is unavailable its column
stays empty.

The paper columns are the BAM / CBAM papers' own figures (`bam_models.models.paper`) at their 224 x 224, with
our count relative to theirs.

Timings run under two allocator settings side by side (`allocator='both'`, the default): first glibc's defaults,
as a plain `pip install` on Linux meets them, then glibc set to keep freed memory for reuse, a mmap threshold of
1 GiB and no heap trimming, as a caching allocator (jemalloc, TCMalloc, PyTorch's CUDA allocator) behaves. Under
glibc's defaults every freed block above its dynamic mmap threshold goes back to the kernel and the next one
arrives as fresh zeroed pages; those page faults cost a training step of resnet50 at batch 16 on 2 cores about a
quarter of its time and vary from step to step, so that a model that allocates differently from its trunk pays
differently there. glibc's settings cannot be reset once changed, so the defaults are measured first; the main
columns are the caching allocator's, the `system_*` columns glibc's defaults. `allocator='caching'` or
`'system'` measures under one of them only. The settings last for the rest of the process.
"""
import ctypes
import gc
import os
import re
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import timm
import torch

from bam_models.benchmark.profiling import count_flops, count_params, peak_cpu_tensor_bytes
from bam_models.benchmark.report import describe_machine
from bam_models.benchmark.subject import Inputs, OnnxRuntimeSubject, Subject, create_benchmarked_model
from bam_models.errors import UsageError, did_you_mean
from bam_models.models.paper import paper_figure

__all__ = [
    'ALLOCATORS', 'DEFAULT_FAMILIES', 'MEASURES', 'PEERS', 'BenchmarkSettings', 'paired_ratio', 'run_benchmark',
    'trunk_of',
]

# what a run can measure, in the order it is measured
MEASURES = ('latency', 'throughput', 'train', 'memory')

# family name -> models measured together; the first is the plain trunk every ratio refers to
DEFAULT_FAMILIES: Dict[str, List[str]] = {
    'resnet50': ['resnet50', 'resnet50_bam', 'resnet50_cbam', 'seresnet50'],
    'resnet18': ['resnet18', 'resnet18_bam', 'resnet18_cbam', 'seresnet18'],
    'mobilenetv1_100': ['mobilenetv1_100', 'mobilenetv1_100_bam'],
}

# independent implementations of the same architectures (pytorchcv), added by `peers=True`, with their own
# plain trunk of the same architecture: pytorchcv's ResNets differ from timm's in speed, so each attention network
# is measured against the trunk of its own implementation. pytorchcv's bottleneck `resnet50` puts the stride in
# the first 1x1 convolution (3.858 GMACs), while its bam_/cbam_resnet50, like the authors' code and timm, put it
# in the 3x3 (4.171 / 4.096 GMACs); its `resnet50b` (4.089 GMACs, as timm's resnet50) is their trunk
PEERS: Dict[str, List[str]] = {
    'resnet50': ['pytorchcv:resnet50b', 'pytorchcv:bam_resnet50', 'pytorchcv:cbam_resnet50'],
    'resnet18': ['pytorchcv:resnet18', 'pytorchcv:bam_resnet18', 'pytorchcv:cbam_resnet18'],
}
_PYTORCHCV_ATTENTION = re.compile(r'^pytorchcv:c?bam_resnet(\d+)$')


@dataclass
class BenchmarkSettings:
    img_size: int = 224
    batch_size: int = 16
    rounds: int = 5
    threads: Optional[int] = None
    latency_iters: int = 10
    families: Sequence[str] = tuple(DEFAULT_FAMILIES)
    models: Sequence[str] = ()
    peers: bool = False
    channels_last: bool = False
    measure: Sequence[str] = MEASURES
    memory_steps: int = 3
    seed: int = 0
    allocator: str = 'both'
    # also time every model torch.compile'd (training and inference) against the compiled trunk
    compile: bool = False
    # also time every model exported to ONNX in onnxruntime (inference) against the exported trunk: a function
    # (model, path, input size) that writes the graph; `bam-models benchmark --onnxruntime` passes
    # bam_models.export's, which sits above this package
    onnx_export: Optional[Callable[[torch.nn.Module, str, int], None]] = field(default=None, repr=False)
    log: Callable[[str], None] = field(default=lambda msg: None, repr=False)


def _measure(subject: Subject, what: str, latency_iters: int) -> float:
    """Seconds of one measurement: a batch-1 forward (mean of `latency_iters`), a batch forward or a training step."""
    start = time.perf_counter()
    if what == 'latency':
        subject.infer(subject.inputs.single, latency_iters)
        return (time.perf_counter() - start) / latency_iters
    if what == 'throughput':
        subject.infer(subject.inputs.batch)
    else:
        subject.train_step()
    return time.perf_counter() - start


def _peak_rss_growth(subject: Subject) -> Optional[int]:
    """Peak RSS growth over one training step, in bytes (see module docstring); None off Linux."""
    subject.optimizer.zero_grad(set_to_none=True)
    gc.collect()
    _LIBC.malloc_trim(0)  # free heap pages leave the resident set, so reusing them counts again
    try:
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')  # resets VmHWM to the current RSS
    except OSError:
        return None
    start = _status_bytes('VmRSS')
    subject.train_step()
    return _status_bytes('VmHWM') - start


def _status_bytes(field: str) -> int:
    with open('/proc/self/status') as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ':'))


ALLOCATORS = ('both', 'caching', 'system')

# glibc's mallopt parameters
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def _caching_allocation() -> bool:
    """Make glibc keep freed blocks for reuse: serve every block below 1 GiB from the heap, never trim it."""
    if _LIBC is None or not hasattr(_LIBC, 'mallopt'):
        return False
    return bool(_LIBC.mallopt(_M_MMAP_THRESHOLD, 2 ** 30) and _LIBC.mallopt(_M_TRIM_THRESHOLD, 2 ** 31 - 1))


def _exact_allocation_accounting() -> bool:
    """Make glibc return every freed block above 128 KiB to the OS at once, so RSS follows live tensors."""
    if _LIBC is None or not hasattr(_LIBC, 'mallopt') or not hasattr(_LIBC, 'malloc_trim'):
        return False
    return bool(_LIBC.mallopt(_M_MMAP_THRESHOLD, 128 * 1024) and _LIBC.mallopt(_M_TRIM_THRESHOLD, 128 * 1024))


try:
    _LIBC = ctypes.CDLL(None)
except OSError:
    _LIBC = None


# ratio column -> measured column; every one is a cost (time per image or bytes), lower is better
_RATIOS = {
    'params_ratio': 'params',
    'gflops_ratio': 'gflops',
    'latency_ratio': 'latency_s',
    'throughput_ratio': 'throughput_s',
    'train_ratio': 'train_s',
    'train_tensor_peak_ratio': 'train_tensor_peak_bytes',
    'train_peak_ratio': 'train_peak_bytes',
}
# the timed measures, and the prefix of their columns under glibc's default allocator when both are measured
TIMED = ('latency', 'throughput', 'train')
SYSTEM_PREFIX = 'system_'


def _paper_columns(name: str, params: int, gmacs: float, img_size: int) -> Dict[str, Optional[float]]:
    """The papers' parameters and GFLOPs (multiply-adds) for `name` and our counts relative to them (ours / theirs
    - 1); None where the papers give none, and at any size but their 224 x 224."""
    columns = {}
    for metric, ours in (('params', params), ('gmacs', gmacs)):
        figure = paper_figure(name, metric) if img_size == 224 else None
        columns[f'paper_{metric}'] = None if figure is None else figure.value
        columns[f'paper_{metric}_diff'] = None if figure is None else ours / figure.value - 1.
    return columns


def trunk_of(name: str, names: Sequence[str]) -> str:
    """The plain trunk `name` is measured against among `names`: pytorchcv's own ResNet of the same architecture
    (stride in the 3x3 convolution: `resnet50b` for bottleneck depths) for its bam_/cbam_ ResNets where it is
    measured too, else the first model."""
    peer = _PYTORCHCV_ATTENTION.match(name)
    if peer:
        depth = int(peer.group(1))
        trunk = f"pytorchcv:resnet{depth}{'b' if depth >= 50 else ''}"
        if trunk in names:
            return trunk
    return names[0]


# a model measured another way is named `MODEL@WAY`, with the trunk measured the same way as its trunk
COMPILED, ONNXRUNTIME = '@compile', '@onnxruntime'


def _base_name(name: str) -> str:
    return name.split('@', 1)[0]


def _way(name: str) -> str:
    return name[len(_base_name(name)):]


def _new_subject(name: str, settings: BenchmarkSettings, inputs: Inputs, work_dir: Optional[str] = None):
    model = create_benchmarked_model(_base_name(name))
    model.to(memory_format=torch.channels_last if settings.channels_last else torch.contiguous_format)
    if _way(name) == ONNXRUNTIME:
        path = os.path.join(work_dir, _base_name(name).replace(':', '_') + '.onnx')
        settings.onnx_export(model.eval(), path, settings.img_size)
        return OnnxRuntimeSubject(path, inputs, torch.get_num_threads())
    compiled = torch.compile(model) if _way(name) == COMPILED else None
    return Subject(model, inputs, lr=1e-4, forward=compiled)


def _measures_of(name: str, measures: Sequence[str]) -> List[str]:
    """What a subject can be measured for: an onnxruntime graph only infers."""
    return [m for m in measures if not (_way(name) == ONNXRUNTIME and m in ('train', 'memory'))]


def _time_rounds(family: str, subjects: Dict[str, Subject], settings: BenchmarkSettings,
                 measures: List[str]) -> Dict[str, Dict[str, List[float]]]:
    """Seconds of every measurement of every model per round, after one untimed warm-up of each."""
    settings.log(f'[{family}] warm-up')
    for name, subject in subjects.items():
        for what in _measures_of(name, measures):
            _measure(subject, what, settings.latency_iters)
    times = {name: {what: [] for what in _measures_of(name, measures)} for name in subjects}
    names = list(subjects)
    for round_idx in range(settings.rounds):
        settings.log(f'[{family}] round {round_idx + 1}/{settings.rounds}')
        # rotating the order keeps any drift of the machine from favouring one model
        shift = round_idx % len(names)
        for what in measures:
            for name in names[shift:] + names[:shift]:
                if what in times[name]:
                    times[name][what].append(_measure(subjects[name], what, settings.latency_iters))
    return times


def _counts_row(family: str, name: str, names: List[str], settings: BenchmarkSettings) -> Dict:
    """Parameters and FLOPs counted on the meta device, next to the papers' figures."""
    stats_model = create_benchmarked_model(_base_name(name), device='meta')
    flops = count_flops(stats_model, (3, settings.img_size, settings.img_size))
    row = {
        'family': family,
        'model': name,
        'trunk': trunk_of(_base_name(name), [_base_name(n) for n in names if _way(n) == _way(name)]) + _way(name),
        'params': count_params(stats_model),
        'gflops': flops / 1e9,
        'gmacs': flops / 2e9,
    }
    row.update(_paper_columns(name, row['params'], row['gmacs'], settings.img_size))
    return row


def _add_timings(family: str, rows: List[Dict], settings: BenchmarkSettings, inputs: Inputs, work_dir: str,
                 prefix: str = '') -> None:
    """Time every model of `family` (fresh subjects) and add the `prefix`ed time and ratio columns to its rows."""
    measures = [m for m in TIMED if m in settings.measure]
    if not measures:
        return
    rows = [row for row in rows if row['family'] == family]
    times = _time_rounds(family, {row['model']: _new_subject(row['model'], settings, inputs, work_dir) for row in rows},
                         settings, measures)
    for row in rows:
        for what in _measures_of(row['model'], measures):
            row[f'{prefix}{what}_s'] = statistics.median(times[row['model']][what])
            row[f'{prefix}{what}_rounds_s'] = list(times[row['model']][what])
            row[f'{prefix}{what}_ratio'] = paired_ratio(times[row['model']][what], times[row['trunk']][what])
        if 'throughput' in _measures_of(row['model'], measures):
            row[f'{prefix}throughput_img_s'] = settings.batch_size / row[f'{prefix}throughput_s']


def paired_ratio(times: Sequence[float], trunk_times: Sequence[float]) -> float:
    """Median over rounds of model time / trunk time in the same round.

    Both ran back to back, so a slow spell of the machine (another tenant, the allocator's state) that lasts a
    round scales both and cancels, where a ratio of the two medians could pair a slow round with a fast one.
    """
    return statistics.median(t / base for t, base in zip(times, trunk_times))


def _add_memory(rows: List[Dict], settings: BenchmarkSettings, inputs: Inputs) -> None:
    rss_follows_tensors = _exact_allocation_accounting()
    for row in rows:
        if 'memory' not in _measures_of(row['model'], MEASURES):
            continue
        settings.log(f"[{row['family']}] peak memory of {row['model']}")
        subject = _new_subject(row['model'], settings, inputs)
        subject.train_step()  # optimizer state and one-off initialisation are not part of the step
        subject.optimizer.zero_grad(set_to_none=True)
        tensor_peak = peak_cpu_tensor_bytes(subject.train_step)
        if tensor_peak is not None:
            row['train_tensor_peak_bytes'] = tensor_peak
        if rss_follows_tensors:
            peaks = [_peak_rss_growth(subject) for _ in range(max(settings.memory_steps, 1))]
            if None not in peaks:
                row['train_peak_bytes'] = statistics.median(peaks)
        del subject


def _add_ratios(rows: List[Dict]) -> None:
    bases = {(row['family'], row['model']): row for row in rows}
    for row in rows:
        base = bases[row['family'], row['trunk']]
        for ratio_key, key in _RATIOS.items():
            if ratio_key not in row and key in row and base.get(key):
                row[ratio_key] = row[key] / base[key]


def run_benchmark(settings: BenchmarkSettings) -> Dict:
    """Measure every family (or `settings.models`, trunk first) and return machine, settings and rows."""
    if settings.threads:
        torch.set_num_threads(settings.threads)
    flush_denormal = torch.set_flush_denormal(True)  # False where the CPU cannot
    try:
        return _run(settings, flush_denormal)
    finally:
        if flush_denormal:
            torch.set_flush_denormal(False)


def _load_average() -> Optional[float]:
    """The 1-minute load average: other work sharing the cores shows up here and in every timing."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def _check_model_names(names: Sequence[str]) -> None:
    """Refuse a name timm does not know before any model is built, with the closest registered names."""
    for name in names:
        if name.startswith('pytorchcv:') or timm.is_model(name):
            continue
        hint = did_you_mean(name, timm.list_models())
        hint = f"{hint} " if hint else ''
        raise UsageError(f"unknown model {name!r}; {hint}run `bam-models list` for the zoo, "
                         f"timm.list_models() for every name")


def _run(settings: BenchmarkSettings, flush_denormal: bool) -> Dict:
    if settings.allocator not in ALLOCATORS:
        raise UsageError(f"unknown allocator setting {settings.allocator!r}; choose from {list(ALLOCATORS)}")
    load_before = _load_average()
    if settings.models:
        _check_model_names(settings.models)
        families = {settings.models[0]: list(settings.models)}
    else:
        unknown = [f for f in settings.families if f not in DEFAULT_FAMILIES]
        if unknown:
            raise UsageError(
                f"unknown benchmark families {unknown}; choose from {list(DEFAULT_FAMILIES)} "
                f"or name models explicitly (plain trunk first)")
        families = {f: list(DEFAULT_FAMILIES[f]) for f in settings.families}
    if settings.peers:
        for family, names in families.items():
            names.extend(p for p in PEERS.get(family, []) if p not in names)
    ways = ([COMPILED] if settings.compile else []) + ([ONNXRUNTIME] if settings.onnx_export else [])
    for names in families.values():
        # exported and compiled: the zoo's and timm's models, not pytorchcv's (no export support asked of it)
        names.extend([n + way for way in ways for n in list(names) if not n.startswith('pytorchcv:')])
    inputs = Inputs.draw(settings.img_size, settings.batch_size, settings.seed, settings.channels_last)
    rows = [_counts_row(family, name, names, settings) for family, names in families.items() for name in names]
    with tempfile.TemporaryDirectory() as work_dir:  # the exported graphs
        if settings.allocator == 'both':
            # glibc's defaults first: once changed they cannot be restored
            for family in families:
                _add_timings(family, rows, settings, inputs, work_dir, prefix=SYSTEM_PREFIX)
        caching = settings.allocator != 'system' and _caching_allocation()
        for family in families:
            _add_timings(family, rows, settings, inputs, work_dir)
    if 'memory' in settings.measure:
        _add_memory(rows, settings, inputs)
    _add_ratios(rows)
    machine = describe_machine()
    machine['load_average'] = {'start': load_before, 'end': _load_average()}
    return {
        'machine': machine,
        'settings': {
            'img_size': settings.img_size,
            'batch_size': settings.batch_size,
            'rounds': settings.rounds,
            'latency_iters': settings.latency_iters,
            'channels_last': settings.channels_last,
            'compile': settings.compile,
            'onnxruntime': settings.onnx_export is not None,
            'seed': settings.seed,
            'flush_denormal': flush_denormal,
            'allocator': 'caching (glibc: mmap threshold 1 GiB, no trimming)' if caching else 'system (glibc defaults)',
            'system_allocator': 'system (glibc defaults), measured first' if settings.allocator == 'both' else None,
            'inference': 'torch.inference_mode, eval mode, every model alike',
            'statistic': 'median over rounds, models interleaved, same inputs for every model',
            'ratios': 'cost relative to the family trunk: for times the median over rounds of model / trunk '
                      'time in the same round, for bytes model / trunk',
            'peak_memory': f'over one training step from gradients set to None: tensors (the most bytes held at '
                           f'once, from the profiler\'s allocation records) and RSS (growth of VmHWM, median of '
                           f'{max(settings.memory_steps, 1)} steps)',
        },
        'rows': rows,
    }

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

Timings run with glibc set to keep freed memory for reuse (`allocator='caching'`, the default): a mmap
threshold of 1 GiB and no heap trimming, as a caching allocator (jemalloc, TCMalloc, PyTorch's CUDA allocator)
behaves. Under glibc's defaults every freed block above its dynamic mmap threshold goes back to the kernel and
the next one arrives as fresh zeroed pages; those page faults cost a training step of resnet50 at batch 16 on 2
cores about a quarter of its time and vary from step to step by as much, which buries differences of a few
percent. `allocator='system'` keeps glibc's defaults. Both settings last for the rest of the process.
"""
import ctypes
import gc
import os
import platform
import re
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn as nn

import timm

from bam_models.profiling import count_flops, count_params, peak_cpu_tensor_bytes

__all__ = [
    'ALLOCATORS', 'DEFAULT_FAMILIES', 'PAPER_REFERENCE', 'PEERS', 'BenchmarkSettings', 'markdown_table', 'paired_ratio',
    'run_benchmark', 'trunk_of',
]

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
# the zoo model each pytorchcv attention network implements too, for the side-by-side table
_PYTORCHCV_TWIN = re.compile(r'^pytorchcv:(c?bam)_(resnet\d+)$')

# published figures: parameters and the papers' "GFLOPs", which are multiply-adds (GMACs here)
PAPER_REFERENCE: Dict[str, Dict[str, float]] = {
    'resnet50': {'params': 25_557_032, 'gmacs': 3.86},
    'resnet50_bam': {'params': 25_915_099, 'gmacs': 3.94},
    'resnet50_cbam': {'params': 28_089_624, 'gmacs': 3.864},
    'resnet18_bam': {'params': 11_712_503},
    'mobilenetv1_100_bam': {'params': 4_320_000},
}


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
    measure: Sequence[str] = ('latency', 'throughput', 'train', 'memory')
    memory_steps: int = 3
    seed: int = 0
    allocator: str = 'caching'
    log: Callable[[str], None] = field(default=lambda msg: None, repr=False)


def _create(name: str, device=None) -> nn.Module:
    if name.startswith('pytorchcv:'):
        from pytorchcv.model_provider import get_model
        with torch.device(device or 'cpu'):
            model = get_model(name.split(':', 1)[1], pretrained=False)
        # pytorchcv's ResNets end in a fixed 7x7 average pool (224 input only); adaptive is equal at 224
        if isinstance(getattr(model.features, 'final_pool', None), nn.AvgPool2d):
            model.features.final_pool = nn.AdaptiveAvgPool2d(1)
        return model
    return timm.create_model(name, device=device)


def _machine(threads: int) -> Dict[str, str]:
    cpu = platform.processor() or platform.machine()
    try:
        with open('/proc/cpuinfo') as f:
            cpu = next(line.split(':', 1)[1].strip() for line in f if line.startswith('model name'))
    except (OSError, StopIteration):
        pass
    return {
        'cpu': cpu,
        'threads': str(threads),
        'torch': torch.__version__,
        'timm': timm.__version__,
        'python': platform.python_version(),
    }


class _Inputs:
    """The batch-1 image, the batch and its targets that every model of a run sees, drawn from a seed."""

    def __init__(self, settings: BenchmarkSettings):
        generator = torch.Generator().manual_seed(settings.seed)
        fmt = torch.channels_last if settings.channels_last else torch.contiguous_format
        size, batch = settings.img_size, settings.batch_size
        self.x1 = torch.randn(1, 3, size, size, generator=generator).to(memory_format=fmt)
        self.xb = torch.randn(batch, 3, size, size, generator=generator).to(memory_format=fmt)
        self.target = torch.randint(0, 1000, (batch,), generator=generator)


class _Subject:
    """One model with the shared inputs, its optimizer and collected timings."""

    def __init__(self, name: str, settings: BenchmarkSettings, inputs: _Inputs):
        self.name = name
        self.model = _create(name)
        fmt = torch.channels_last if settings.channels_last else torch.contiguous_format
        self.model.to(memory_format=fmt)
        self.x1, self.xb, self.target = inputs.x1, inputs.xb, inputs.target
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=1e-4, momentum=0.9)
        self.latency_iters = settings.latency_iters
        self.times: Dict[str, List[float]] = {'latency': [], 'throughput': [], 'train': []}

    def train_step(self) -> None:
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(self.model(self.xb), self.target)
        loss.backward()
        self.optimizer.step()

    @torch.inference_mode()
    def _infer(self, x: torch.Tensor, iters: int) -> float:
        self.model.eval()
        start = time.perf_counter()
        for _ in range(iters):
            self.model(x)
        return (time.perf_counter() - start) / iters

    def measure(self, what: str) -> None:
        if what == 'latency':
            self.times['latency'].append(self._infer(self.x1, self.latency_iters))
        elif what == 'throughput':
            self.times['throughput'].append(self._infer(self.xb, 1))
        elif what == 'train':
            start = time.perf_counter()
            self.train_step()
            self.times['train'].append(time.perf_counter() - start)

    def peak_train_tensors(self) -> Optional[int]:
        """Peak bytes of the tensors one training step allocates and holds at once (see module docstring)."""
        self.optimizer.zero_grad(set_to_none=True)
        return peak_cpu_tensor_bytes(self.train_step)

    def peak_train_memory(self) -> Optional[int]:
        """Peak RSS growth over one training step, in bytes (see module docstring); None off Linux."""
        self.optimizer.zero_grad(set_to_none=True)
        gc.collect()
        _LIBC.malloc_trim(0)  # free heap pages leave the resident set, so reusing them counts again
        try:
            with open('/proc/self/clear_refs', 'w') as f:
                f.write('5')  # resets VmHWM to the current RSS
        except OSError:
            return None
        start = _status_bytes('VmRSS')
        self.train_step()
        return _status_bytes('VmHWM') - start


def _status_bytes(field: str) -> int:
    with open('/proc/self/status') as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ':'))


ALLOCATORS = ('caching', 'system')

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


def _reference_diff(value: float, reference: Optional[float]) -> Optional[float]:
    return None if reference is None else value / reference - 1.


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


def _family_rows(family: str, names: List[str], settings: BenchmarkSettings, inputs: _Inputs) -> List[Dict]:
    subjects = [_Subject(name, settings, inputs) for name in names]
    by_name = {subject.name: subject for subject in subjects}
    settings.log(f'[{family}] warm-up')
    measures = [m for m in ('latency', 'throughput', 'train') if m in settings.measure]
    for subject in subjects:
        for what in measures:
            subject.measure(what)
        subject.times = {k: [] for k in subject.times}
    for round_idx in range(settings.rounds):
        settings.log(f'[{family}] round {round_idx + 1}/{settings.rounds}')
        # rotating the order keeps any drift of the machine from favouring one model
        shift = round_idx % len(subjects)
        for what in measures:
            for subject in subjects[shift:] + subjects[:shift]:
                subject.measure(what)
    rows = []
    for subject in subjects:
        stats_model = _create(subject.name, device='meta')
        size = (3, settings.img_size, settings.img_size)
        flops = count_flops(stats_model, size)
        row = {
            'family': family,
            'model': subject.name,
            'trunk': trunk_of(subject.name, names),
            'params': count_params(stats_model),
            'gflops': flops / 1e9,
            'gmacs': flops / 2e9,
        }
        paper = PAPER_REFERENCE.get(subject.name, {}) if settings.img_size == 224 else {}
        row['paper_params'] = paper.get('params')
        row['paper_params_diff'] = _reference_diff(row['params'], row['paper_params'])
        row['paper_gmacs'] = paper.get('gmacs')
        row['paper_gmacs_diff'] = _reference_diff(row['gmacs'], row['paper_gmacs'])
        for what in measures:
            row[f'{what}_s'] = statistics.median(subject.times[what])
            row[f'{what}_rounds_s'] = list(subject.times[what])
            row[f'{what}_ratio'] = paired_ratio(subject.times[what], by_name[row['trunk']].times[what])
        if 'throughput' in measures:
            row['throughput_img_s'] = settings.batch_size / row['throughput_s']
        rows.append(row)
    return rows


def paired_ratio(times: Sequence[float], trunk_times: Sequence[float]) -> float:
    """Median over rounds of model time / trunk time in the same round.

    Both ran back to back, so a slow spell of the machine (another tenant, the allocator's state) that lasts a
    round scales both and cancels, where a ratio of the two medians could pair a slow round with a fast one.
    """
    return statistics.median(t / base for t, base in zip(times, trunk_times))


def _add_memory(rows: List[Dict], settings: BenchmarkSettings, inputs: _Inputs) -> None:
    rss_follows_tensors = _exact_allocation_accounting()
    for row in rows:
        settings.log(f"[{row['family']}] peak memory of {row['model']}")
        subject = _Subject(row['model'], settings, inputs)
        subject.train_step()  # optimizer state and one-off initialisation are not part of the step
        tensor_peak = subject.peak_train_tensors()
        if tensor_peak is not None:
            row['train_tensor_peak_bytes'] = tensor_peak
        if rss_follows_tensors:
            peaks = [subject.peak_train_memory() for _ in range(max(settings.memory_steps, 1))]
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
    import bam_models  # noqa: F401  registers the zoo models with timm
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


def _run(settings: BenchmarkSettings, flush_denormal: bool) -> Dict:
    if settings.allocator not in ALLOCATORS:
        raise ValueError(f"unknown allocator setting {settings.allocator!r}; choose from {list(ALLOCATORS)}.")
    caching = settings.allocator == 'caching' and _caching_allocation()
    load_before = _load_average()
    if settings.models:
        families = {settings.models[0]: list(settings.models)}
    else:
        unknown = [f for f in settings.families if f not in DEFAULT_FAMILIES]
        if unknown:
            raise ValueError(
                f"unknown benchmark families {unknown}; choose from {list(DEFAULT_FAMILIES)} "
                f"or name models explicitly (plain trunk first).")
        families = {f: list(DEFAULT_FAMILIES[f]) for f in settings.families}
    if settings.peers:
        for family, names in families.items():
            names.extend(p for p in PEERS.get(family, []) if p not in names)
    inputs = _Inputs(settings)
    rows = []
    for family, names in families.items():
        rows.extend(_family_rows(family, names, settings, inputs))
    if 'memory' in settings.measure:
        _add_memory(rows, settings, inputs)
    _add_ratios(rows)
    machine = _machine(torch.get_num_threads())
    machine['load_average'] = {'start': load_before, 'end': _load_average()}
    return {
        'machine': machine,
        'settings': {
            'img_size': settings.img_size,
            'batch_size': settings.batch_size,
            'rounds': settings.rounds,
            'latency_iters': settings.latency_iters,
            'channels_last': settings.channels_last,
            'seed': settings.seed,
            'flush_denormal': flush_denormal,
            'allocator': 'caching (glibc: mmap threshold 1 GiB, no trimming)' if caching else 'system (glibc defaults)',
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


def _fmt_ratio(row: Dict, key: str) -> str:
    ratio = row.get(f'{key}_ratio')
    return '' if ratio is None else f' ({ratio:.3f}×)'


def _fmt_paper(value: Optional[float], diff: Optional[float], fmt: str) -> str:
    if value is None:
        return '–'
    return f'{value:{fmt}} ({diff:+.1%})'


def markdown_table(result: Dict) -> str:
    """The rows of `run_benchmark` as a Markdown table, with the machine and settings underneath."""
    s = result['settings']
    lines = [
        f"| model | params | paper params (ours vs) | GMACs | paper GMACs (ours vs) "
        f"| latency b1 ms | throughput b{s['batch_size']} img/s | train step b{s['batch_size']} ms "
        f"| train peak tensors MiB | train peak RSS MiB |",
        '|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|',
    ]
    for row in result['rows']:
        cells = [
            f"`{row['model']}`",
            f"{row['params']:,}",
            _fmt_paper(row['paper_params'], row['paper_params_diff'], ',d'),
            f"{row['gmacs']:.3f}",
            _fmt_paper(row['paper_gmacs'], row['paper_gmacs_diff'], '.3f'),
            f"{row['latency_s'] * 1e3:.1f}{_fmt_ratio(row, 'latency')}" if 'latency_s' in row else '–',
            f"{row['throughput_img_s']:.1f}{_fmt_ratio(row, 'throughput')}" if 'throughput_s' in row else '–',
            f"{row['train_s'] * 1e3:.0f}{_fmt_ratio(row, 'train')}" if 'train_s' in row else '–',
            f"{row['train_tensor_peak_bytes'] / 2 ** 20:.0f}{_fmt_ratio(row, 'train_tensor_peak')}"
            if 'train_tensor_peak_bytes' in row else '–',
            f"{row['train_peak_bytes'] / 2 ** 20:.0f}{_fmt_ratio(row, 'train_peak')}"
            if 'train_peak_bytes' in row else '–',
        ]
        lines.append('| ' + ' | '.join(cells) + ' |')
    m = result['machine']
    load = m.get('load_average') or {}
    load_note = ''
    if load.get('start') is not None and load.get('end') is not None:
        load_note = f", load average {load['start']:.2f} at start, {load['end']:.2f} at end"
    lines += [
        '',
        f"{m['cpu']}, {m['threads']} threads{load_note}, torch {m['torch']}, timm {m['timm']}; "
        f"{s['img_size']}×{s['img_size']} input, {s['rounds']} rounds (median, models interleaved), "
        f"{s['allocator'].split(' (')[0]} allocator for timings. "
        f"(×) = cost relative to the plain trunk measured in the same run (the family's first model; for "
        f"pytorchcv's attention ResNets pytorchcv's own ResNet of the same architecture where it was measured): "
        f"time per image "
        f"(also for throughput; median over rounds of the per-round ratio) or peak memory over one training "
        f"step (tensors: most bytes held at once; RSS: growth of the resident set).",
    ]
    return '\n'.join(lines + _side_by_side(result['rows']))


_SIDE_BY_SIDE = (('latency_s', 'latency b1 ms', 1e3), ('throughput_img_s', 'throughput img/s', 1),
                 ('train_s', 'train step ms', 1e3), ('train_tensor_peak_bytes', 'train peak tensors MiB', 2 ** -20))


def _side_by_side(rows: List[Dict]) -> List[str]:
    """Absolute figures of each zoo model next to pytorchcv's network of the same architecture, measured in the
    same run: ours / theirs (below 1 is faster or leaner for time and memory, above 1 more images per second)."""
    by_name = {row['model']: row for row in rows}
    pairs = []
    for name in by_name:
        twin = _PYTORCHCV_TWIN.match(name)
        ours = twin and f'{twin.group(2)}_{twin.group(1)}'
        if ours in by_name:
            pairs.append((by_name[ours], by_name[name]))
    if not pairs:
        return []
    columns = [c for c in _SIDE_BY_SIDE if any(c[0] in r for pair in pairs for r in pair)]
    header = '| same architecture, same run: ours vs pytorchcv (ratio) | ' + ' | '.join(c[1] for c in columns) + ' |'
    lines = ['', header,
             '|---|' + '---:|' * len(columns)]
    for ours, theirs in pairs:
        cells = []
        for key, _, scale in columns:
            if key in ours and key in theirs:
                cells.append(f'{ours[key] * scale:.1f} vs {theirs[key] * scale:.1f} ({ours[key] / theirs[key]:.3f})')
            else:
                cells.append('–')
        lines.append(f"| ours `{ours['model']}` vs `{theirs['model']}` | " + ' | '.join(cells) + ' |')
    return lines

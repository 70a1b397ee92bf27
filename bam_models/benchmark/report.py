""" How measurements are reported: the machine they ran on, the benchmark's and the model list's Markdown
tables, and the JSON / Markdown files written next to the printed table. """
import datetime
import json
import platform
import re
from typing import Dict, List, Optional

import timm
import torch

from bam_models.layers.gating_tuning import AUTOTUNE_ENV, kernel_choices, tuning_for, use_gating_autotune
from bam_models.models.paper import paper_figure

__all__ = ['describe_machine', 'markdown_table', 'model_table', 'write_report']

# the zoo model each pytorchcv attention network implements too, for the side-by-side table
_PYTORCHCV_TWIN = re.compile(r'^pytorchcv:(c?bam)_(resnet\d+)$')


def _cpu_name() -> str:
    try:
        with open('/proc/cpuinfo') as f:
            return next(line.split(':', 1)[1].strip() for line in f if line.startswith('model name'))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def _kernel_choices() -> str:
    """What the fused gating's kernel choices in this process rest on: measurements on this CPU, else the table."""
    defaults = f"the table's defaults, measured on {tuning_for(torch.device('cpu')).measured_on}"
    if not use_gating_autotune():
        return f'{defaults} (measuring off: {AUTOTUNE_ENV}=0)'
    measured = '; '.join(map(str, kernel_choices())) or 'none'
    return f'measured at first use: {measured}; elsewhere {defaults}'


def describe_machine(device: Optional[torch.device] = None) -> Dict[str, str]:
    """CPU, measured device (the GPU's name on CUDA, else the CPU's), thread count, versions, date and the fused
    gating's kernel choices made so far."""
    cpu = _cpu_name()
    device = torch.device(device or 'cpu')
    return {
        'cpu': cpu,
        'kernel_choices': _kernel_choices(),
        'device': torch.cuda.get_device_name(device) if device.type == 'cuda' else cpu,
        'threads': str(torch.get_num_threads()),
        'torch': torch.__version__,
        'timm': timm.__version__,
        'cuda': str(torch.version.cuda),
        'python': platform.python_version(),
        'date': datetime.date.today().isoformat(),
    }


def write_report(result: Dict, table: str, json_path: Optional[str] = None,
                 markdown_path: Optional[str] = None) -> None:
    """Print `table` and write the full result as JSON and the table as Markdown where paths are given."""
    if json_path:
        with open(json_path, 'w') as f:
            json.dump(result, f, indent=2)
    if markdown_path:
        with open(markdown_path, 'w') as f:
            f.write(table + '\n')
    print(table)


def _millions(params: float) -> str:
    """A parameter count as the papers print it."""
    return f'{params / 1e6:.2f}M'


def _paper_params(model: str) -> str:
    figure = paper_figure(model, 'params')
    return '' if figure is None else _millions(figure.value)


def model_table(stats: List[Dict[str, float]]) -> str:
    """Markdown table of `model_stats` rows with the papers' parameter count where they give one (the generated
    model tables of the docs are this output)."""
    lines = [
        '| model | params | GFLOPs | GMACs | input | params, paper |',
        '|---|---:|---:|---:|---:|---:|',
    ]
    for row in stats:
        lines.append(
            f"| `{row['model']}` | {row['params']:,} | {row['gflops']:.3f} | {row['gmacs']:.3f} | {row['input_size']} "
            f"| {_paper_params(row['model'])} |")
    return '\n'.join(lines)


def _fmt_ratio(row: Dict, key: str) -> str:
    ratio = row.get(f'{key}_ratio')
    return '' if ratio is None else f' ({ratio:.3f}×)'


def _fmt_paper(value: Optional[float], diff: Optional[float], fmt: str) -> str:
    """The papers' figure as they print it and ours relative to it; parameters (`fmt='millions'`) are printed to
    0.01M, about 0.02 % of a ResNet's, so their difference gets two decimals."""
    if value is None:
        return '–'
    if fmt == 'millions':
        return f'{_millions(value)} ({diff:+.2%})'
    return f'{value:{fmt}} ({diff:+.1%})'


def _fmt_measured(row: Dict, key: str, text: str) -> str:
    return f'{text}{_fmt_ratio(row, key)}'


def _benchmark_cells(row: Dict) -> List[str]:
    mib = 2 ** -20
    return [
        f"`{row['model']}`",
        f"{row['params']:,}",
        _fmt_paper(row['paper_params'], row['paper_params_diff'], 'millions'),
        f"{row['gmacs']:.3f}",
        _fmt_paper(row['paper_gmacs'], row['paper_gmacs_diff'], '.3f'),
        _fmt_measured(row, 'latency', f"{row['latency_s'] * 1e3:.1f}") if 'latency_s' in row else '–',
        _fmt_measured(row, 'throughput', f"{row['throughput_img_s']:.1f}") if 'throughput_s' in row else '–',
        _fmt_measured(row, 'train', f"{row['train_s'] * 1e3:.0f}") if 'train_s' in row else '–',
        _fmt_measured(row, 'train_tensor_peak', f"{row['train_tensor_peak_bytes'] * mib:.0f}")
        if 'train_tensor_peak_bytes' in row else '–',
        _fmt_measured(row, 'train_peak', f"{row['train_peak_bytes'] * mib:.0f}")
        if 'train_peak_bytes' in row else '–',
    ]


def _benchmark_footer(result: Dict) -> str:
    m, s = result['machine'], result['settings']
    load = m.get('load_average') or {}
    load_note = ''
    if load.get('start') is not None and load.get('end') is not None:
        load_note = f", load average {load['start']:.2f} at start, {load['end']:.2f} at end"
    return (
        f"{m['cpu']}, {m['threads']} threads{load_note}, torch {m['torch']}, timm {m['timm']}; "
        f"{s['img_size']}×{s['img_size']} input, {s['rounds']} rounds (median, models interleaved), "
        f"{s['allocator'].split(' (')[0]} allocator for timings"
        f"{' (glibc defaults in the allocator table below)' if s.get('system_allocator') else ''}. "
        f"(×) = cost relative to the plain trunk measured in the same run (the family's first model; for "
        f"pytorchcv's attention ResNets pytorchcv's own ResNet of the same architecture where it was measured): "
        f"time per image "
        f"(also for throughput; median over rounds of the per-round ratio) or peak memory over one training "
        f"step (tensors: most bytes held at once; RSS: growth of the resident set). "
        f"Fused gating kernel choices (`gating_tuning`) on {m['cpu']}: {m['kernel_choices']}.")


def markdown_table(result: Dict) -> str:
    """The rows of `run_benchmark` as a Markdown table, with the machine and settings underneath."""
    batch = result['settings']['batch_size']
    lines = [
        f"| model | params | paper params (ours vs) | GMACs | paper GMACs (ours vs) "
        f"| latency b1 ms | throughput b{batch} img/s | train step b{batch} ms "
        f"| train peak tensors MiB | train peak RSS MiB |",
        '|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|',
    ]
    lines += ['| ' + ' | '.join(_benchmark_cells(row)) + ' |' for row in result['rows']]
    lines += ['', _benchmark_footer(result)]
    cpu = result['machine']['cpu']
    return '\n'.join(lines + _allocator_table(result['rows'], batch, cpu) + _side_by_side(result['rows'], batch, cpu))


def _allocator_table(rows: List[Dict], batch: int, cpu: str) -> List[str]:
    """Every time ratio under glibc's default allocator next to the caching one's, where both were measured."""
    if not any('system_train_ratio' in r or 'system_latency_ratio' in r for r in rows):
        return []
    columns = [(what, label) for what, label in (('latency', 'latency b1'), ('throughput', f'time per image b{batch}'),
                                                 ('train', f'train step b{batch}'))
               if any(f'{what}_ratio' in r for r in rows)]
    lines = ['', f'| cost vs trunk, same run, {cpu}: glibc default / caching allocator | '
             + ' | '.join(label for _, label in columns) + ' |', '|---|' + '---:|' * len(columns)]
    for row in rows:
        cells = [f"{row[f'system_{what}_ratio']:.3f} / {row[f'{what}_ratio']:.3f}"
                 if f'system_{what}_ratio' in row and f'{what}_ratio' in row else '–' for what, _ in columns]
        lines.append(f"| `{row['model']}` | " + ' | '.join(cells) + ' |')
    return lines


_SIDE_BY_SIDE = (('latency_s', 'latency b1 ms', 1e3), ('throughput_s', 'time per batch ms', 1e3),
                 ('train_s', 'train step ms', 1e3), ('train_tensor_peak_bytes', 'train peak tensors MiB', 2 ** -20))


def _side_by_side(rows: List[Dict], batch: int, cpu: str) -> List[str]:
    """Absolute figures of each zoo model next to pytorchcv's network of the same architecture, measured in the
    same run: ours / theirs, every one a cost (below 1 is faster or leaner)."""
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
    header = (f'| same architecture, same run, {cpu}: ours vs pytorchcv (cost ratio) | '
              + ' | '.join(c[1].replace('batch', f'b{batch}') for c in columns) + ' |')
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

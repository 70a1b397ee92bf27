""" Where the attention's time goes, against what memory bandwidth allows.

BAM and CBAM add few FLOPs but read and write whole feature maps: every module must at least read its input and
write its output in a forward pass (two passes over the map), and in backward read the output's gradient and its
saved map and write the input's gradient (three more). On a CPU those passes cost bytes / memory bandwidth
whatever their FLOPs, so `passes x map bytes / bandwidth` is a floor under any implementation's time, eager or
compiled. This module measures the bandwidth (a large copy), each attention module's own forward and backward time
inside a real training step and inference pass, and sets the sum against that floor. Forward time is taken by
module hooks; backward time by hooks on the module's autograd node, which on the fused path (the default) holds
the module's whole backward, small networks included (the CPU runs autograd in one thread, one node at a time).
"""
import collections
import contextlib
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
import torch.nn as nn

from bam_models.benchmark.subject import Inputs, OnnxRuntimeSubject, Subject, create_benchmarked_model
from bam_models.layers import BAM, CBAM

__all__ = ['MIN_PASSES', 'AttentionTimer', 'attention_ops', 'copy_bandwidth', 'format_attention_ops',
           'format_attention_profile', 'format_onnxruntime_ops', 'onnxruntime_ops', 'profile_attention']

# whole-map passes any implementation needs: forward reads x and writes y; backward reads dy and x (or y) and
# writes dx
MIN_PASSES = {'inference': 2, 'train': 5}


def copy_bandwidth(mib: int = 512, repeats: int = 5) -> float:
    """Bytes per second a large tensor copy moves (each byte read once and written once), best of `repeats`."""
    src = torch.ones(mib * 2**20 // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)  # touch the pages before timing
    best = float('inf')
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - start)
    return 2 * src.numel() * src.element_size() / best


class AttentionTimer:
    """Seconds spent inside every BAM / CBAM module of a model, forward and backward, and the bytes of the maps
    they refine, gathered by module hooks until `remove()`."""

    def __init__(self, model: nn.Module):
        self.forward_s = self.backward_s = 0.0
        self.map_bytes = 0
        self._start: Dict[object, float] = {}
        self._handles = []
        for module in model.modules():
            if isinstance(module, (BAM, CBAM)):
                self._handles += [module.register_forward_pre_hook(self._forward_start),
                                  module.register_forward_hook(self._forward_end)]

    def reset(self) -> None:
        self.forward_s = self.backward_s = 0.0
        self.map_bytes = 0

    def _forward_start(self, module, args):
        self._start[id(module)] = time.perf_counter()

    def _forward_end(self, module, args, output):
        self.forward_s += time.perf_counter() - self._start.pop(id(module))
        self.map_bytes += args[0].numel() * args[0].element_size()
        node = output.grad_fn
        if node is not None:  # hooks on the node, not the module: timm adds the shortcut into the output in place
            node.register_prehook(lambda grad_outputs: self._start.__setitem__(node, time.perf_counter()))
            node.register_hook(lambda grad_inputs, grad_outputs: self._backward_end(node))

    def _backward_end(self, node) -> None:
        self.backward_s += time.perf_counter() - self._start.pop(node)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


@dataclass
class _Timed:
    total_s: float
    attention_s: float
    map_bytes: int


def _time_pass(run, timer: AttentionTimer, repeats: int) -> _Timed:
    """Median over `repeats` of one pass's total time, its attention time and the bytes of the maps refined."""
    run()  # warm-up
    samples = []
    for _ in range(repeats):
        timer.reset()
        start = time.perf_counter()
        run()
        samples.append(_Timed(time.perf_counter() - start, timer.forward_s + timer.backward_s, timer.map_bytes))
    return sorted(samples, key=lambda s: s.total_s)[len(samples) // 2]


def profile_attention(name: str, trunk: str, img_size: int = 224, batch_size: int = 16, repeats: int = 5,
                      threads: Optional[int] = None, bandwidth: Optional[float] = None) -> List[Dict]:
    """For a training step and a batch inference pass of `name` and its `trunk`: total time, the attention
    modules' own time, the bytes of the maps they refine and the floor `MIN_PASSES x bytes / bandwidth`."""
    if threads:
        torch.set_num_threads(threads)
    bandwidth = bandwidth or copy_bandwidth()
    inputs = Inputs.draw(img_size, batch_size)
    rows = []
    for model_name in (trunk, name):
        subject = Subject(create_benchmarked_model(model_name), inputs)
        timer = AttentionTimer(subject.model)
        passes = {'train': subject.train_step, 'inference': subject.no_grad_forward}
        for kind, run in passes.items():
            timed = _time_pass(run, timer, repeats)
            rows.append(dict(model=model_name, pass_=kind, total_ms=1e3 * timed.total_s,
                             attention_ms=1e3 * timed.attention_s, map_mib=timed.map_bytes / 2**20,
                             floor_ms=1e3 * MIN_PASSES[kind] * timed.map_bytes / bandwidth,
                             bandwidth_gbs=bandwidth / 1e9))
        timer.remove()
    return rows


def format_attention_profile(rows: List[Dict]) -> str:
    """A Markdown table; 'over trunk' is the model's total over its trunk's total for the same pass."""
    trunk_total = {row['pass_']: row['total_ms'] for row in rows[:2]}
    lines = ['| model | pass | total ms | over trunk | attention ms | maps refined MiB | floor ms '
             '(passes x bytes / bandwidth) | attention / floor |',
             '|---|---|---:|---:|---:|---:|---:|---:|']
    for row in rows:
        floor = row['floor_ms']
        lines.append(
            f"| `{row['model']}` | {row['pass_']} | {row['total_ms']:.1f} | "
            f"{row['total_ms'] / trunk_total[row['pass_']]:.3f}× | {row['attention_ms']:.1f} | "
            f"{row['map_mib']:.0f} | {floor:.1f} | " + (f"{row['attention_ms'] / floor:.1f}×" if floor else '–') + ' |')
    lines.append(f"\nmemory bandwidth (best large copy): {rows[0]['bandwidth_gbs']:.1f} GB/s")
    return '\n'.join(lines)


def attention_ops(name: str, img_size: int = 224, batch_size: int = 16, top: int = 8,
                  train: bool = True) -> List[Dict]:
    """The `top` ATen ops by own time inside `name`'s attention modules, each run alone on the inputs it meets in
    the model (forward and, with `train`, backward), with the bytes of the tensors each call reads."""
    model = create_benchmarked_model(name).train(train)
    captured = []
    handles = [m.register_forward_pre_hook(lambda m, args: captured.append((m, args[0].detach().clone())))
               for m in model.modules() if isinstance(m, (BAM, CBAM))]
    with torch.no_grad():
        model(Inputs.draw(img_size, batch_size).batch)
    for handle in handles:
        handle.remove()

    grads = {}  # made in the warm-up, so that filling them is not counted as the modules' work

    def run_modules():
        for index, (module, x) in enumerate(captured):
            x = x.requires_grad_(train)
            with torch.set_grad_enabled(train):
                out = module(x)
            if train:
                out.backward(grads.setdefault(index, torch.ones_like(out)))

    run_modules()  # warm-up: kernel choices, oneDNN primitives
    activities = [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=activities, record_shapes=True) as prof:
        run_modules()
    rows = {}
    for event in prof.key_averages(group_by_input_shape=True):
        read = sum(math.prod(shape) for shape in event.input_shapes if shape) * 4 * event.count
        row = rows.setdefault(event.key, dict(op=event.key, ms=0.0, calls=0, read_mib=0.0))
        row['ms'] += event.self_cpu_time_total / 1e3
        row['calls'] += event.count
        row['read_mib'] += read / 2**20
    return sorted(rows.values(), key=lambda r: -r['ms'])[:top]


def format_attention_ops(name: str, rows: List[Dict], train: bool) -> str:
    lines = [f"`{name}`'s attention modules alone, {'forward and backward' if train else 'inference'}: "
             "the ops with the most own time",
             '', '| op | calls | ms | MiB its calls take as inputs |', '|---|---:|---:|---:|']
    lines += [f"| `{r['op']}` | {r['calls']} | {r['ms']:.1f} | {r['read_mib']:.0f} |" for r in rows]
    return '\n'.join(lines)


def onnxruntime_ops(name: str, img_size: int = 224, batch_size: int = 1, repeats: int = 20) -> List[Dict]:
    """onnxruntime's own profile of `name` exported to ONNX (`bam_models.export.export_onnx`) and run `repeats`
    times on the CPU with torch's thread count: per op type as onnxruntime runs it (after its graph optimisations,
    so its layout reorders count), the kernel time and calls per run, most time first. A first, untimed run warms
    up the session (its memory arena, prepacked weights); the profile counts the `repeats` after it."""
    from bam_models.export import export_onnx

    model = create_benchmarked_model(name).eval()
    inputs = Inputs.draw(img_size, batch_size)
    with tempfile.TemporaryDirectory() as work_dir:
        path = os.path.join(work_dir, 'model.onnx')
        with contextlib.redirect_stdout(sys.stderr):  # the exporter's progress lines, not part of the tables
            export_onnx(model, path, inputs.batch)
        subject = OnnxRuntimeSubject(path, inputs, torch.get_num_threads(), os.path.join(work_dir, 'profile'))
        subject.infer(inputs.batch, 1 + repeats)
        with open(subject.session.end_profiling()) as trace:
            events = json.load(trace)
    warm_up_end = min(e['ts'] + e['dur'] for e in events if e.get('cat') == 'Session' and e['name'] == 'model_run')
    ms, calls = collections.Counter(), collections.Counter()
    for event in events:
        if event.get('cat') == 'Node' and event['name'].endswith('_kernel_time') and event['ts'] > warm_up_end:
            ms[event['args']['op_name']] += event['dur'] / 1e3 / repeats
            calls[event['args']['op_name']] += 1
    return [dict(op=op, ms=total, calls=calls[op] // repeats) for op, total in ms.most_common()]


def format_onnxruntime_ops(name: str, rows: List[Dict], batch_size: int = 1) -> str:
    total = sum(r['ms'] for r in rows)
    lines = [f"`{name}` exported, in onnxruntime at batch {batch_size}: kernel time per op type, {total:.1f} ms per "
             "run in all", '',
             '| op type | calls per run | ms per run |', '|---|---:|---:|']
    lines += [f"| {r['op']} | {r['calls']} | {r['ms']:.2f} |" for r in rows]
    return '\n'.join(lines)

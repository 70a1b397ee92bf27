#!/usr/bin/env python3
""" Fused BAM/CBAM gating against the reference formulas on one device, in one process.

1. Checks: resnet50_bam and resnet50_cbam with the fused gating on and off, same weights and inputs, one training
   forward and backward in fp32, under bf16 autocast, under fp16 autocast with a GradScaler, and channels_last.
   A precision the device does not train in (fp16 autocast on CPU) is reported as not applicable: it neither
   passes nor fails, so `--device cpu --quick` exits 0 when every check that applies to CPU passes.
   Both paths are scored against the same step in float64 on the reference formulas (the ground truth): relative
   error of the output and of all parameter gradients together (norm of the difference over the norm of the
   truth), and the worst single parameter's. A check passes when the fused path is at most twice as far from
   the truth as the reference path at the same precision (plus 1e-6): a deep network amplifies rounding (here
   the reference path alone moves by about 1e-2 between contiguous and channels_last in fp32), so fused and
   reference need not agree with each other, but a wrong fused gradient is off by O(1) from the truth while the
   reference is not. BatchNorm weights are drawn from U(0.5, 1.5) first (timm's zero-initialised last BN of every
   block would feed CBAM zeros and make the check vacuous) and their running statistics set from one batch; the
   BatchNorms use those running statistics (eval mode, autograd recording, so the fused nodes run).
2. Measurements for resnet50_bam, resnet50_cbam and resnet50: training-step time (forward, loss, backward, SGD
   step), inference throughput and the peak memory of one training step (`torch.cuda.max_memory_allocated` on
   CUDA, the profiler's tensor peak on CPU), for the fused path, the reference path and torch.compile (with the
   switch on: a training step runs BAM and CBAM as the custom ops `bam_models::bam_refine` / `cbam_refine`), as
   ratios to the plain resnet50 in eager mode measured in the same run.

Prints a Markdown table and writes JSON. `--device cpu --quick` runs the same code at a tiny size, so that the
script is tested without a GPU:

    python scripts/gpu_check.py --device cuda --json gpu_check.json --markdown gpu_check.md
    python scripts/gpu_check.py --device cpu --quick
"""
import argparse
import contextlib
import copy
import functools
import os
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional, Tuple

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import timm  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import bam_models  # noqa: E402,F401  registers the zoo models
from bam_models.benchmark import (  # noqa: E402
    Inputs, Subject, describe_machine, peak_cpu_tensor_bytes, write_report,
)
from bam_models.layers import fused_gating  # noqa: E402
from bam_models.runs import autocast_for  # noqa: E402

MODELS = ('resnet50', 'resnet50_bam', 'resnet50_cbam')  # the first is the trunk every ratio refers to
CHECKED = ('resnet50_bam', 'resnet50_cbam')
VARIANTS = ('fused', 'reference', 'compiled')
MODES = ('fp32', 'channels_last', 'bf16', 'fp16')
# a check passes when the fused path's error against the float64 truth is at most SLACK x the reference path's
# (plus ABSOLUTE_SLACK, for modes where both are at float rounding)
SLACK, ABSOLUTE_SLACK = 2.0, 1e-6
_DTYPES = {'fp32': None, 'bf16': torch.bfloat16, 'fp16': torch.float16}
# training precisions a device kind does not support: fp16 autocast on CPU runs, but its GradScaler-scaled
# fp16 gradients overflow to NaN on both paths (no fp16 training kernels), so there is nothing to compare
_NOT_APPLICABLE = {'cpu': {'fp16': 'fp16 autocast training is not supported on CPU (NaN on both paths)'}}


def _autocast(device: torch.device, precision: str):
    return autocast_for(device, 'none' if precision == 'fp32' else precision)


def _rel_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    got, expected = got.double(), expected.double()
    return float((got - expected).norm() / expected.norm().clamp_min(1e-30))


def _worst_param_error(grads: Dict[str, torch.Tensor], grads_ref: Dict[str, torch.Tensor]) -> Tuple[float, str]:
    """The largest per-parameter relative gradient error, with the norm floored at 1e-3 of the largest one:
    the biases before a BatchNorm have a gradient of exactly zero in exact arithmetic, and only rounding noise
    in either path."""
    floor = 1e-3 * max(float(g.double().norm()) for g in grads_ref.values())
    errors = {k: float((grads[k].double() - g.double()).norm()) / max(float(g.double().norm()), floor)
              for k, g in grads_ref.items()}
    worst = max(errors, key=errors.get)
    return errors[worst], worst


def _calibrated(model: torch.nn.Module, x: torch.Tensor) -> None:
    """Random BatchNorm weights, and running statistics set to those of a batch, so that activations keep their
    scale through the network as in a trained one (with running variance 1 they grow block after block and
    saturate the gates' sigmoids, where half precision keeps few digits)."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for bn in norms:
        torch.nn.init.uniform_(bn.weight, 0.5, 1.5)
        bn.momentum = 1.0
    model.train()
    with torch.no_grad(), fused_gating(False):
        model(x)
    for bn in norms:
        bn.momentum = 0.1
    model.eval()


def _check_step(model, x, target, device, mode: str, fused: bool):
    """Output and parameter gradients of one training forward/backward in `mode`."""
    precision = 'fp32' if mode == 'channels_last' else mode
    # a modest loss scale: the check compares gradients, it does not search for the largest scale
    scaler = torch.amp.GradScaler(device.type, init_scale=2. ** 8, enabled=mode == 'fp16')
    model.zero_grad(set_to_none=True)
    with fused_gating(fused), _autocast(device, precision):
        out = model(x)
        loss = F.cross_entropy(out.float(), target)
    scaler.scale(loss).backward()
    scale = scaler.get_scale() if scaler.is_enabled() else 1.0
    grads = {n: p.grad.detach().float() / scale for n, p in model.named_parameters() if p.grad is not None}
    return out.detach().float(), grads


def _errors(out, grads, truth) -> Dict:
    """Output, all-gradient and worst-parameter relative errors of one path against the float64 truth."""
    out_truth, grads_truth = truth
    keys = sorted(grads_truth)
    if grads.keys() != grads_truth.keys():
        return {'output': float('inf'), 'grads': float('inf'), 'worst': (float('inf'), ''), 'same_grads': False}
    flat = torch.cat([grads[k].flatten() for k in keys])
    flat_truth = torch.cat([grads_truth[k].flatten() for k in keys])
    return {'output': _rel_error(out, out_truth), 'grads': _rel_error(flat, flat_truth),
            'worst': _worst_param_error(grads, grads_truth), 'same_grads': True}


def _check_mode(base, x, target, device, mode: str, truth) -> Dict:
    fused_model, reference_model = copy.deepcopy(base), copy.deepcopy(base)
    inputs = x
    if mode == 'channels_last':
        fused_model, reference_model = (m.to(memory_format=torch.channels_last) for m in (fused_model, reference_model))
        inputs = x.to(memory_format=torch.channels_last)
    fused = _errors(*_check_step(fused_model, inputs, target, device, mode, fused=True), truth)
    reference = _errors(*_check_step(reference_model, inputs, target, device, mode, fused=False), truth)
    bound_out = SLACK * reference['output'] + ABSOLUTE_SLACK
    bound_grads = SLACK * reference['grads'] + ABSOLUTE_SLACK
    return {
        'mode': mode, 'output_rel_error': fused['output'], 'grad_rel_error': fused['grads'],
        'reference_output_rel_error': reference['output'], 'reference_grad_rel_error': reference['grads'],
        'worst_param_rel_error': fused['worst'][0], 'worst_param': fused['worst'][1],
        'tolerance': bound_grads, 'same_grads': fused['same_grads'] and reference['same_grads'],
        # written so that a NaN fails
        'ok': fused['same_grads'] and fused['output'] <= bound_out and fused['grads'] <= bound_grads,
    }


def not_applicable(device: torch.device, mode: str) -> Optional[str]:
    """Why `mode` does not apply to training on `device`'s kind, or None where it does."""
    return _NOT_APPLICABLE.get(device.type, {}).get(mode)


def _skipped_row(name: str, mode: str, reason: str) -> Dict:
    nan = float('nan')
    return {'model': name, 'mode': mode, 'output_rel_error': nan, 'grad_rel_error': nan,
            'reference_output_rel_error': nan, 'reference_grad_rel_error': nan, 'worst_param_rel_error': nan,
            'worst_param': '', 'tolerance': nan, 'same_grads': None, 'ok': None, 'not_applicable': reason}


def run_checks(args, device: torch.device) -> List[Dict]:
    rows = []
    batch, size = args.check_batch_size, args.img_size
    for name in CHECKED:
        torch.manual_seed(args.seed)
        # eval mode: BatchNorm on running statistics; autograd still records, so the fused nodes run
        base = timm.create_model(name, num_classes=args.num_classes).to(device).eval()
        _calibrated(base, torch.randn(batch, 3, size, size, device=device))
        x = torch.randn(batch, 3, size, size, device=device)
        target = torch.randint(0, args.num_classes, (batch,), device=device)
        truth = _check_step(copy.deepcopy(base).double(), x.double(), target, device, 'fp32', fused=False)
        for mode in MODES:
            reason = not_applicable(device, mode)
            if reason:
                rows.append(_skipped_row(name, mode, reason))
                args.log(f"check {name} {mode}: not applicable ({reason})")
                continue
            row = dict(model=name, not_applicable=None, **_check_mode(base, x, target, device, mode, truth))
            rows.append(row)
            args.log(f"check {name} {mode}: fused output {row['output_rel_error']:.2e}, grads "
                     f"{row['grad_rel_error']:.2e}; reference output {row['reference_output_rel_error']:.2e}, "
                     f"grads {row['reference_grad_rel_error']:.2e}; worst {row['worst_param']} "
                     f"{row['worst_param_rel_error']:.2e}")
    return rows


def _synchronize(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], object], device: torch.device, warmup: int, steps: int) -> float:
    """Median seconds of `fn()` over `steps` calls after `warmup` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        _synchronize(device)
        start = time.perf_counter()
        fn()
        _synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _peak_bytes(fn: Callable[[], object], device: torch.device) -> Optional[int]:
    if device.type != 'cuda':
        return peak_cpu_tensor_bytes(fn)
    _synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    start = torch.cuda.memory_allocated(device)
    fn()
    _synchronize(device)
    return torch.cuda.max_memory_allocated(device) - start


def _new_subject(name: str, variant: str, args, device: torch.device, inputs: Inputs) -> Subject:
    """`name` in one variant: the fused gating, the reference formulas, or torch.compile of the latter."""
    torch.manual_seed(args.seed)
    model = timm.create_model(name, num_classes=args.num_classes).to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    # compiled: the switch on, so a training step sees BAM and CBAM as the custom ops bam_models::bam_refine /
    # cbam_refine
    fused = variant in ('fused', 'compiled')

    @contextlib.contextmanager
    def context():
        with fused_gating(fused), _autocast(device, args.precision):
            yield

    compiled = torch.compile(model, backend=args.compile_backend) if variant == 'compiled' else None
    scaler = torch.amp.GradScaler(device.type, enabled=args.precision == 'fp16')
    return Subject(model, inputs, lr=1e-3, forward=compiled, context=context, scaler=scaler)


def _measure(name: str, variant: str, args, device: torch.device, inputs) -> Dict:
    subject = _new_subject(name, variant, args, device, inputs)
    train_s = _timed(subject.train_step, device, args.warmup, args.steps)
    infer_s = _timed(functools.partial(subject.infer, inputs.infer_batch), device, args.warmup, args.steps)
    subject.optimizer.zero_grad(set_to_none=True)
    peak = _peak_bytes(subject.train_step, device)
    row = {'model': name, 'variant': variant, 'train_step_ms': 1e3 * train_s,
           'throughput_img_s': args.infer_batch_size / infer_s, 'peak_train_bytes': peak}
    args.log(f"{name} {variant}: train {row['train_step_ms']:.1f} ms, {row['throughput_img_s']:.1f} img/s, "
             f"peak {peak}")
    del subject
    if device.type == 'cuda':
        torch.cuda.empty_cache()
    return row


def run_measurements(args, device: torch.device) -> List[Dict]:
    inputs = Inputs.draw(args.img_size, args.batch_size, args.seed, args.channels_last, args.num_classes,
                         infer_batch_size=args.infer_batch_size, device=device)
    rows = [_measure(name, variant, args, device, inputs) for name in MODELS for variant in args.variants]
    trunk = next(r for r in rows if r['model'] == MODELS[0] and r['variant'] == args.variants[0])
    for row in rows:
        row['train_step_ratio'] = row['train_step_ms'] / trunk['train_step_ms']
        # a cost: time per image relative to the trunk's
        row['throughput_ratio'] = trunk['throughput_img_s'] / row['throughput_img_s']
        have_peaks = row['peak_train_bytes'] and trunk['peak_train_bytes']
        row['peak_train_ratio'] = row['peak_train_bytes'] / trunk['peak_train_bytes'] if have_peaks else None
    return rows


def markdown(result: Dict) -> str:
    s = result['settings']
    lines = [f"Fused vs reference gating on {result['machine']['device']}, torch {result['machine']['torch']}, "
             f"{result['machine']['date']}", '',
             'Relative errors against the same step in float64 on the reference formulas; a check passes when the '
             f'fused path is at most {SLACK:g}x as far from it as the reference path (+{ABSOLUTE_SLACK:g}).', '',
             '| model | check | output, fused / reference | gradients, fused / reference '
             '| worst parameter, fused (rel. error) | bound | ok |',
             '|---|---|---:|---:|---|---:|---|']
    for r in result['checks']:
        if r['not_applicable']:
            lines.append(f"| `{r['model']}` | {r['mode']} | – | – | – | – | n/a: {r['not_applicable']} |")
            continue
        lines.append(f"| `{r['model']}` | {r['mode']} | {r['output_rel_error']:.1e} / "
                     f"{r['reference_output_rel_error']:.1e} | {r['grad_rel_error']:.1e} / "
                     f"{r['reference_grad_rel_error']:.1e} "
                     f"| `{r['worst_param']}` ({r['worst_param_rel_error']:.1e}) | {r['tolerance']:.1e} "
                     f"| {'yes' if r['ok'] else 'NO'} |")
    lines += ['', f"{s['img_size']} px, training batch {s['batch_size']}, inference batch {s['infer_batch_size']}, "
                  f"{s['precision']}{', channels_last' if s['channels_last'] else ''}, median of {s['steps']} steps; "
                  f"(x) = cost relative to eager `{MODELS[0]}` ({s['variants'][0]})", '',
              '| model | variant | train step ms | throughput img/s | train peak MiB |', '|---|---|---:|---:|---:|']
    for r in result['measurements']:
        peak = '–' if r['peak_train_bytes'] is None else (
            f"{r['peak_train_bytes'] / 2 ** 20:.0f} ({r['peak_train_ratio']:.3f}×)")
        lines.append(f"| `{r['model']}` | {r['variant']} | {r['train_step_ms']:.1f} ({r['train_step_ratio']:.3f}×) | "
                     f"{r['throughput_img_s']:.1f} ({r['throughput_ratio']:.3f}×) | {peak} |")
    return '\n'.join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--device', default='cuda', help='torch device (default cuda)')
    parser.add_argument('--quick', action='store_true',
                        help='tiny run of the same code: 64 px, batch 2, 1 step without warm-up, '
                             'compile backend "eager"')
    parser.add_argument('--batch-size', type=int, help='training batch (default 256; quick 2)')
    parser.add_argument('--infer-batch-size', type=int, help='inference batch (default 512; quick 2)')
    parser.add_argument('--check-batch-size', type=int,
                        help='batch of the fused-vs-reference checks (default 8; quick 2)')
    parser.add_argument('--img-size', type=int, help='square input size (default 224; quick 64)')
    parser.add_argument('--steps', type=int, help='timed steps per measurement, median (default 10; quick 1)')
    parser.add_argument('--warmup', type=int, help='untimed steps first (default 3; quick 0)')
    parser.add_argument('--precision', choices=tuple(_DTYPES), help='autocast of the measurements (default bf16 on '
                                                                    'CUDA, fp32 elsewhere)')
    parser.add_argument('--channels-last', action='store_true', help='measure channels_last models and inputs')
    parser.add_argument('--variants', nargs='+', choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument('--compile-backend', help='torch.compile backend (default inductor; quick eager)')
    parser.add_argument('--skip-checks', action='store_true', help='measurements only')
    parser.add_argument('--num-classes', type=int, default=1000)
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--json', metavar='PATH', help='write the full result as JSON')
    parser.add_argument('--markdown', metavar='PATH', help='also write the tables to a file')
    parser.add_argument('-q', '--quiet', action='store_true', help='no progress on stderr')
    args = parser.parse_args(argv)
    quick = args.quick
    defaults = dict(batch_size=(2, 256), infer_batch_size=(2, 512), check_batch_size=(2, 8), img_size=(64, 224),
                    steps=(1, 10), warmup=(0, 3), compile_backend=('eager', 'inductor'))
    for key, (small, full) in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, small if quick else full)
    if args.precision is None:
        args.precision = 'bf16' if args.device.startswith('cuda') else 'fp32'
    args.log = (lambda msg: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == 'cuda' and not torch.cuda.is_available():
        print('error: no CUDA device is available; run on a GPU machine or pass --device cpu --quick',
              file=sys.stderr)
        return 2
    reason = not_applicable(device, args.precision)
    if reason:
        print(f'error: --precision {args.precision} cannot be measured on {device.type}: {reason}; '
              f'pass --precision fp32 or bf16', file=sys.stderr)
        return 2
    checks = [] if args.skip_checks else run_checks(args, device)
    result = {
        'machine': describe_machine(device),
        'settings': {k: v for k, v in vars(args).items() if k != 'log'},
        'checks': checks,
        'measurements': run_measurements(args, device),
    }
    write_report(result, markdown(result), args.json, args.markdown)
    # a check that does not apply to the device (ok None) neither passes nor fails
    return 0 if all(r['ok'] for r in checks if r['ok'] is not None) else 1


if __name__ == '__main__':
    sys.exit(main())

""" `bam-models benchmark`: what BAM and CBAM cost next to their plain trunks, measured in one run. """
import argparse
import sys

from bam_models.benchmark import (
    ALLOCATORS, DEFAULT_FAMILIES, MEASURES, BenchmarkSettings, markdown_table, run_benchmark, write_report,
)


def _onnx_export(model, path: str, img_size: int) -> None:
    from bam_models.export import export_model  # onnx and onnxscript only when asked for

    export_model(model, path, 'onnx', input_size=(img_size, img_size))


def run(args: argparse.Namespace) -> int:
    settings = BenchmarkSettings(
        img_size=args.img_size,
        batch_size=args.batch_size,
        rounds=args.rounds,
        threads=args.threads,
        latency_iters=args.latency_iters,
        families=args.family or tuple(DEFAULT_FAMILIES),
        models=args.models or (),
        peers=args.peers,
        channels_last=args.channels_last,
        measure=args.measure,
        memory_steps=args.memory_steps,
        seed=args.seed,
        allocator=args.allocator,
        compile=args.compile,
        onnx_export=_onnx_export if args.onnxruntime else None,
        log=(lambda msg: print(msg, file=sys.stderr, flush=True)) if args.verbose else (lambda msg: None),
    )
    result = run_benchmark(settings)
    write_report(result, markdown_table(result), args.json, args.markdown)
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        'benchmark', help='measure params, FLOPs, latency, throughput, training time and memory vs the trunk',
        description='Measures every model next to its plain trunk in the same run (interleaved rounds, medians) '
                    'and prints a Markdown table; ratios are costs relative to the trunk. Families: '
                    + ', '.join(f'{k} ({", ".join(v)})' for k, v in DEFAULT_FAMILIES.items()) + '.')
    parser.add_argument('--family', nargs='+', choices=list(DEFAULT_FAMILIES),
                        help='model families to measure (default: all)')
    parser.add_argument('--models', nargs='+', metavar='NAME',
                        help='measure these timm models instead of the families; the first is the trunk, except for '
                             "pytorchcv's bam_/cbam_ models when their plain pytorchcv ResNet is listed too "
                             '(pytorchcv models as pytorchcv:NAME)')
    parser.add_argument('--peers', action='store_true',
                        help="add pytorchcv's bam_resnet*/cbam_resnet* (same math, other implementation), measured "
                             "against pytorchcv's own resnet*")
    parser.add_argument('--img-size', type=int, default=224, help='square input size (default 224)')
    parser.add_argument('--batch-size', type=int, default=16,
                        help='batch of the throughput and training measurements (default 16)')
    parser.add_argument('--rounds', type=int, default=5, help='interleaved rounds; figures are medians (default 5)')
    parser.add_argument('--latency-iters', type=int, default=10,
                        help='batch-1 forwards averaged per round (default 10)')
    parser.add_argument('--threads', type=int, help='torch.set_num_threads (default: torch default)')
    parser.add_argument('--channels-last', action='store_true', help='run models and inputs channels_last')
    parser.add_argument('--measure', nargs='+', choices=MEASURES, default=list(MEASURES),
                        help='what to measure (default: all)')
    parser.add_argument('--memory-steps', type=int, default=3,
                        help='training steps whose peak memory is measured; the median is reported (default 3)')
    parser.add_argument('--allocator', choices=ALLOCATORS, default='both',
                        help="memory allocation during timings: 'both' times every model under glibc's defaults "
                             "(what a plain install meets) and then with freed memory kept for reuse, as jemalloc "
                             "or TCMalloc would, side by side; 'caching' or 'system' only one of them "
                             "(default both)")
    parser.add_argument('--compile', action='store_true',
                        help='also time every model torch.compile\'d, as MODEL@compile against the compiled trunk '
                             '(on CPU informative only; compiling takes minutes per model)')
    parser.add_argument('--onnxruntime', action='store_true',
                        help='also time every model exported to ONNX in onnxruntime (latency and throughput), as '
                             'MODEL@onnxruntime against the exported trunk (needs the export extra)')
    parser.add_argument('--seed', type=int, default=0, help='seed of the inputs every model sees (default 0)')
    parser.add_argument('--json', metavar='PATH', help='also write the full result as JSON')
    parser.add_argument('--markdown', metavar='PATH', help='also write the table to a file')
    parser.add_argument('-v', '--verbose', action='store_true', help='progress on stderr')
    parser.set_defaults(func=run)

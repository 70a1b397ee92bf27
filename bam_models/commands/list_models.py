""" `bam-models list`: every zoo model with parameters and FLOPs measured on the meta device. """
import argparse
import json
from typing import Dict, List

from bam_models.errors import UsageError
from bam_models.models import list_zoo_models
from bam_models.profiling import model_stats

# parameters as the BAM / CBAM papers report them (the CIFAR baselines are also pytorchcv's exact counts)
PAPER_PARAMS = {
    'resnet50_bam': '25.92M', 'resnet50_cbam': '28.09M',
    'mobilenetv1_100_bam': '4.32M', 'mobilenetv1_100_cbam': '5.07M',
    'wide_resnet18_150': '25.88M', 'wide_resnet18_200': '45.62M',
    'preresnet110_cifar': '1.73M', 'wrn28_10_cifar': '36.54M', 'resnext29_16x64d_cifar': '68.25M',
}


def model_table(stats: List[Dict[str, float]]) -> str:
    """Markdown table of `model_stats` rows with the papers' figure where they give one (the generated model
    tables of the docs are this output)."""
    lines = [
        '| model | params | GFLOPs | GMACs | input | params, paper |',
        '|---|---:|---:|---:|---:|---:|',
    ]
    for row in stats:
        lines.append(
            f"| `{row['model']}` | {row['params']:,} | {row['gflops']:.3f} | {row['gmacs']:.3f} | {row['input_size']} "
            f"| {PAPER_PARAMS.get(row['model'], '')} |")
    return '\n'.join(lines)


def run(args: argparse.Namespace) -> int:
    stats = [model_stats(name) for name in list_zoo_models(args.pattern)]
    if not stats:
        raise UsageError(f"no zoo model matches {args.pattern!r}; run `bam-models list` to see them all")
    print(json.dumps(stats, indent=2) if args.json else model_table(stats))
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        'list', help='list zoo models with parameters and FLOPs',
        description='Every registered zoo model with its parameter count and the FLOPs of one forward pass at '
                    'its native input size (224x224, CIFAR networks 32x32), counted by torch.utils.flop_counter '
                    'on the meta device (GMACs = GFLOPs / 2, the unit the BAM/CBAM papers call GFLOPs), and the '
                    "papers' parameter count where they give one.")
    parser.add_argument('pattern', nargs='?', default='', help="wildcard filter, e.g. '*_cbam'")
    parser.add_argument('--json', action='store_true', help='print JSON instead of a Markdown table')
    parser.set_defaults(func=run)

""" `bam-models list`: every zoo model with parameters and FLOPs measured on the meta device. """
import argparse
import json

from bam_models.benchmark import model_stats, model_table
from bam_models.errors import UsageError
from bam_models.models import list_zoo_models


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

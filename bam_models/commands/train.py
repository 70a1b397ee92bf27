""" `bam-models train --config configs/NAME.yaml [--set section.key=value ...] [--resume PATH|auto]`.

Runs on one process, or on several under `torchrun --nproc_per_node N -m bam_models.cli train ...` (DDP).
"""
import argparse
import json
import sys

from bam_models.train.config import ConfigError, load_config


def run(args: argparse.Namespace) -> int:
    from bam_models.train import NonFiniteLossError, train
    try:
        cfg = load_config(args.config, args.set)
        summary = train(cfg, resume=args.resume)
    except ConfigError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    except NonFiniteLossError as e:
        print(f'error: {e}', file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        return 130
    if summary.get('best') is not None and summary.get('output'):
        best = summary['best']
        print(f"done in {summary['train_time_s']:.1f}s: best val top-1 {best['top1']:.2f} (epoch {best['epoch'] + 1}), "
              f"files in {summary['output']}" + (f", Hub format in {summary['hub_dir']}" if 'hub_dir' in summary else ''))
    if args.print_summary:
        print(json.dumps(summary, indent=2))
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        'train', help='train or fine-tune a model from a YAML config',
        description='Train or fine-tune any timm model (zoo models included) from a YAML config; see configs/.')
    parser.add_argument('--config', '-c', help='YAML config file (sections model, data, optim, schedule, train)')
    parser.add_argument('--set', action='append', default=[], metavar='SECTION.KEY=VALUE',
                        help='override one config value, e.g. --set optim.lr=0.05 (repeatable)')
    parser.add_argument('--resume', metavar='PATH|auto',
                        help="continue from a last.pth checkpoint ('auto': OUTPUT/last.pth of this config)")
    parser.add_argument('--print-summary', action='store_true', help='print the summary as JSON at the end')
    parser.set_defaults(func=run)

""" `bam-models train --config configs/NAME.yaml [--set section.key=value ...] [--resume PATH|auto] [--overwrite]`.

Runs on one process, or on several under `torchrun --nproc_per_node N -m bam_models.cli train ...` (DDP).
"""
import argparse
import json
from typing import List, Optional

from bam_models.errors import UsageError


def require_job(config: Optional[str], overrides: List[str]) -> None:
    """A run needs a config file, or at least the model and the data named with --set: the defaults alone
    would start a 90-epoch 224 px ImageNet-style run on the digits data."""
    named = {item.partition('=')[0].strip() for item in overrides}
    if config is None and not {'model.name', 'data.dataset'} <= named:
        raise UsageError("train needs a config; pass --config FILE (see configs/), or name at least the model and "
                         "the data with --set model.name=ARCH --set data.dataset=DIR|digits")


def run(args: argparse.Namespace) -> int:
    from bam_models.runs import is_main_process
    from bam_models.train import load_config, train
    require_job(args.config, args.set)
    summary = train(load_config(args.config, args.set), resume=args.resume, overwrite=args.overwrite)
    if not is_main_process():  # one report per run, not one per process
        return 0
    if summary.get('best') is not None and summary.get('output'):
        best = summary['best']
        hub = f", Hub format in {summary['hub_dir']}" if 'hub_dir' in summary else ''
        print(f"done in {summary['train_time_s']:.1f}s: best val top-1 {best['top1']:.2f} (epoch {best['epoch']}), "
              f"files in {summary['output']}{hub}")
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
                        help="continue from a last.pth checkpoint ('auto': OUTPUT/last.pth of this config when it "
                             "exists, else start the run; what torchrun's elastic restarts need)")
    parser.add_argument('--overwrite', action='store_true',
                        help='start afresh in an output folder that holds an earlier run, deleting its files')
    parser.add_argument('--print-summary', action='store_true', help='print the summary as JSON at the end')
    parser.set_defaults(func=run)

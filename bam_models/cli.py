""" The `bam-models` command line. Each sub-command lives in `bam_models.commands.<name>` and provides
`register(subparsers)`, which adds its parser and sets `func` to the function that runs it. """
import argparse
import importlib
import sys
from typing import List, Optional

# sub-command modules, in the order `bam-models --help` lists them
COMMANDS = (
    'list_models',
    'demo',
    'visualize',
    'convert',
    'publish',
    'insert',
    'train',
    'validate',
    'export',
    'detect_train',
    'benchmark',
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog='bam-models', description='BAM and CBAM attention-augmented CNN backbones for timm.')
    subparsers = parser.add_subparsers(dest='command', required=True, metavar='COMMAND')
    for name in COMMANDS:
        importlib.import_module(f'bam_models.commands.{name}').register(subparsers)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args) or 0


if __name__ == '__main__':
    sys.exit(main())

""" The `bam-models` command line. Each sub-command lives in `bam_models.commands.<name>` and provides
`register(subparsers)`, which adds its parser and sets `func` to the function that runs it. """
import argparse
import importlib
import sys
from typing import List, Optional

from bam_models.errors import BamModelsError

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
    parser.add_argument('--debug', action='store_true', help='show the full traceback of an error')
    subparsers = parser.add_subparsers(dest='command', required=True, metavar='COMMAND')
    for name in COMMANDS:
        importlib.import_module(f'bam_models.commands.{name}').register(subparsers)
    for command in subparsers.choices.values():  # `--debug` also after the command name
        command.add_argument('--debug', action='store_true', default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Runs one sub-command; an expected failure prints one `error:` line and returns its exit code."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except BamModelsError as error:
        if args.debug:
            raise
        print(f'error: {error}', file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == '__main__':
    sys.exit(main())

""" The `bam-models` command line. Each sub-command lives in `bam_models.commands.<name>` and provides
`register(subparsers)`, which adds its parser and sets `func` to the function that runs it.

Every expected failure ends as one `error: ...` line and the error's exit code, including those raised while
the command modules are imported and the settings read from the environment (`BAM_MODELS_FUSED_GATING`,
`BAM_MODELS_GATING_AUTOTUNE`, `BAM_MODELS_MANIFEST`), which are checked before any command runs. """
import argparse
import importlib
import sys
from typing import List, Optional

from PIL import Image

from bam_models.commands.options import settle_options
from bam_models.errors import BamModelsError
from bam_models.layers.config import fused_gating_from_env
from bam_models.layers.gating_tuning import gating_autotune_from_env
from bam_models.weights.manifest import load_manifest

# sub-command modules, in the order `bam-models --help` lists them
COMMANDS = (
    'list_models',
    'demo',
    'visualize',
    'convert',
    'publish',
    'insert',
    'shards',
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


def check_settings() -> None:
    """Settings from the environment that would otherwise fail only once used, somewhere in a command."""
    fused_gating_from_env()
    gating_autotune_from_env()
    load_manifest()


def _run(argv: Optional[List[str]]) -> int:
    check_settings()
    args = settle_options(*build_parser().parse_known_args(argv))
    return args.func(args) or 0


def main(argv: Optional[List[str]] = None) -> int:
    """Runs one sub-command; an expected failure prints one `error:` line and returns its exit code."""
    # read before parsing: an error can come while the parser is being built
    debug = '--debug' in (sys.argv[1:] if argv is None else [str(a) for a in argv])
    try:
        return _run(argv)
    except BamModelsError as error:
        if debug:
            raise
        print(f'error: {error}', file=sys.stderr)
        return error.exit_code
    except Image.DecompressionBombError:
        # raised by Pillow while a data loader opens an image, inside timm's dataset (a worker's copy too)
        print(f"error: an image of the data has more pixels than Pillow's decompression-bomb limit "
              f"({Image.MAX_IMAGE_PIXELS:,}); remove or shrink it, or raise PIL.Image.MAX_IMAGE_PIXELS for data "
              f"you trust", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == '__main__':
    sys.exit(main())

""" The options every command spells the same way: `--model`, `--out`, `--img-size`, `--device`, `--batch-size`.

The spellings of earlier releases (a positional MODEL / OUT, `--arch`, `--backbone`, `--output`,
`--input-size`) still work for one release as deprecated aliases (CHANGELOG). """
import argparse
from typing import Optional, Sequence, Tuple

from bam_models.errors import UsageError

_SETTLE = '_options_to_settle'


def add_model_option(parser: argparse.ArgumentParser, help: str, *, old_flags: Sequence[str] = (),
                     old_positional: bool = False, required: bool = True, default: Optional[str] = None) -> None:
    """`--model` (+ deprecated `old_flags`, and the deprecated positional MODEL where there was one)."""
    _add(parser, 'model', help, old_flags, old_positional, required, default)


def add_out_option(parser: argparse.ArgumentParser, help: str, *, old_flags: Sequence[str] = (),
                   old_positional: bool = False, required: bool = True, default: Optional[str] = None) -> None:
    """`--out` (+ deprecated `old_flags`, and the deprecated positional OUT where there was one)."""
    _add(parser, 'out', help, old_flags, old_positional, required, default)


def add_img_size_option(parser: argparse.ArgumentParser, help: str, *, old_pair_flag: Optional[str] = None) -> None:
    """`--img-size N` (square) or `--img-size H W`; `old_pair_flag` is a deprecated flag of exactly H W (its own
    option, so that the positionals after it are not taken for sizes). Read it with `img_size(args)`."""
    parser.add_argument('--img-size', dest='img_size', type=int, nargs='+', metavar='N', help=help)
    if old_pair_flag:
        parser.add_argument(old_pair_flag, dest='img_size_pair', type=int, nargs=2, metavar=('H', 'W'),
                            help='deprecated spelling of --img-size H W')


def img_size(args: argparse.Namespace) -> Optional[Tuple[int, int]]:
    """--img-size (or its deprecated pair flag) as (H, W), None when not given."""
    values, pair = args.img_size, getattr(args, 'img_size_pair', None)
    if values and pair:
        raise UsageError("the input size is given twice; pass it once, as --img-size H W")
    values = values or pair
    if not values:
        return None
    if len(values) > 2:
        raise UsageError(f"--img-size takes one size N or two, H W; got {len(values)} numbers")
    return values[0], values[-1]


def _add(parser, dest, help, old_flags, old_positional, required, default):
    parser.add_argument(f'--{dest}', *old_flags, dest=dest, metavar=dest.upper(), default=default, help=help)
    if old_positional:
        parser.add_argument(f'_{dest}_positional', nargs='?', metavar=dest.upper(), help=argparse.SUPPRESS)
    settle = dict(parser.get_default(_SETTLE) or {})
    settle[dest] = (old_positional, required)
    parser.set_defaults(**{_SETTLE: settle})


def settle_options(args: argparse.Namespace, extras: Sequence[str] = ()) -> argparse.Namespace:
    """Folds the deprecated positionals into their options and checks the required ones, after parsing.

    argparse gives optional positionals only the values before the first option (`export MODEL --format onnx
    OUT` leaves OUT over): `extras`, the arguments `parse_known_args` did not place, fill the positionals still
    empty, in order; anything left after that is an unknown argument."""
    extras = list(extras)
    for dest, (old_positional, required) in (getattr(args, _SETTLE, None) or {}).items():
        positional = getattr(args, f'_{dest}_positional', None) if old_positional else None
        if old_positional and positional is None and extras and not extras[0].startswith('-'):
            positional = extras.pop(0)
        given = getattr(args, dest)
        if positional is not None and given is not None and str(positional) != str(given):
            raise UsageError(f"{dest.upper()} given twice ({positional} and --{dest} {given}); pass it once, "
                             f"as --{dest}")
        if given is None:
            setattr(args, dest, positional)
        if required and getattr(args, dest) is None:
            raise UsageError(f"{args.command} needs --{dest}; see `bam-models {args.command} --help`")
    if extras:
        raise UsageError(f"{args.command}: unrecognized arguments {' '.join(extras)}; see "
                         f"`bam-models {args.command} --help`")
    return args

""" `bam-models shards DIR --out OUT --shard-size N [--seed S] [--overwrite]`: an image folder (train/ and val/ of
class folders) as webdataset tar shards with the `_info.json` timm's `wds/` reader reads (bam_models.shards). """
import argparse

from bam_models.commands.options import add_out_option
from bam_models.errors import UsageError
from bam_models.shards import write_shards


def _whole_number(flag: str, text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise UsageError(f"{flag} must be a whole number, got {text!r}; pass e.g. {flag} 1000") from None


def run(args: argparse.Namespace) -> int:
    info = write_shards(args.dir, args.out, _whole_number('--shard-size', args.shard_size),
                        seed=_whole_number('--seed', args.seed), overwrite=args.overwrite)
    for name, split in info['splits'].items():
        print(f"{name}: {split['num_samples']} samples in {len(split['filenames'])} shards {split['pattern']}")
    print(f"wrote {args.out} ({info['num_classes']} classes); train on it with data.dataset=wds/{info['name']} "
          f"data.root={args.out}")
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        'shards', help='write an image folder as webdataset shards for timm\'s wds/ reader',
        description='Write an image folder (train/ and val/ sub-folders of class folders) as webdataset tar '
                    'shards of --shard-size samples, shuffled with --seed, with the _info.json timm\'s webdataset '
                    'reader reads (split sizes, shard lengths, class names). Images keep their own bytes.')
    parser.add_argument('dir', metavar='DIR', help='the image folder')
    add_out_option(parser, 'folder to write (new or empty; --overwrite replaces an earlier one)', old_positional=True)
    parser.add_argument('--shard-size', required=True, metavar='N', help='samples per shard')
    parser.add_argument('--seed', default='0', help='seed of the shuffle of the samples (default: 0)')
    parser.add_argument('--overwrite', action='store_true', help='replace the shards in an OUT that holds some')
    parser.set_defaults(func=run)

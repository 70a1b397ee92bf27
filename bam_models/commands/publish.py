""" `bam-models publish`: write (and optionally push) the Hub folder of one manifest entry, and record it. """
import argparse

from bam_models.weights.manifest import manifest_path
from bam_models.hub import publish


def run(args: argparse.Namespace) -> int:
    info = publish(args.arch_tag, args.checkpoint, args.out, args.push, args.manifest)
    for name in info['files'] if args.out else ():
        print(f"wrote {args.out}/{name}")
    print(f"sha256 {info['sha256']}")
    print(f"size {info['size']} bytes")
    if 'revision' in info:
        print(f"pushed {', '.join(info['files'])}, revision {info['revision']}")
    print(f"manifest entry {args.arch_tag} updated in {args.manifest or manifest_path()}")
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        'publish', help='write/push the Hub folder of a manifest entry',
        description='Write model.safetensors, config.json (timm format) and a model card README.md for ARCH.TAG '
                    'from a bam_models checkpoint, print sha256 and size and record them in the weights manifest. '
                    '--push uploads the folder (token from HF_TOKEN) and pins the resulting commit.')
    parser.add_argument('arch_tag', metavar='ARCH.TAG', help='manifest entry, e.g. resnet50_bam.official_in1k')
    parser.add_argument('--checkpoint', required=True, help='bam_models state dict (.safetensors or .pth)')
    parser.add_argument('--out', default=None,
                        help='new or empty folder to write (default: a temporary one, with --push)')
    parser.add_argument('--push', action='store_true', help='upload to the Hub repo of the entry')
    parser.add_argument('--manifest', default=None, help='manifest to update (default: the active one)')
    parser.set_defaults(func=run)

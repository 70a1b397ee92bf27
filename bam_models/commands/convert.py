""" `bam-models convert`: turn an official / pytorchcv / torchvision checkpoint into a bam_models Hub folder. """
import argparse

from bam_models.commands.options import add_model_option, add_out_option
from bam_models.convert import SOURCES, convert_checkpoint


def run(args: argparse.Namespace) -> int:
    # a ConversionError is a BamModelsError: the CLI prints it as one line and exits with status 2
    info = convert_checkpoint(args.source, args.model, args.input, args.out, tag=args.tag)
    print(f"wrote {info['weights']} ({info['size']:,} bytes, sha256 {info['sha256']}), {info['config']}, "
          f"{info['readme']}")
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        'convert', help='convert an official / pytorchcv / torchvision checkpoint',
        description='Convert a checkpoint into model.safetensors + config.json (timm format) + README.md. Input is '
                    'read with weights_only=True; unknown, missing or mis-shaped keys abort with their counts and '
                    'examples. torchvision checkpoints give the trunk only (the attention stays freshly '
                    "initialised). The classifier keeps the checkpoint's number of classes.")
    parser.add_argument('--from', dest='source', choices=SOURCES, required=True, help='layout of the input')
    add_model_option(parser, 'target zoo model, e.g. resnet50_bam', old_flags=('--arch',))
    parser.add_argument('--tag', default=None, help='pretrained tag whose data config goes into config.json')
    parser.add_argument('input', help='checkpoint file (.pth, .pth.tar, .bin, .safetensors)')
    add_out_option(parser, 'output folder (new or empty)', old_positional=True)
    parser.set_defaults(func=run)

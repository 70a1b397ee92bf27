""" `bam-models export ARCH[.TAG] --format {onnx,torchscript,exported} [--checkpoint F] OUT` """
import argparse
from pathlib import Path

from bam_models.export import FORMATS, compare_with_pytorch, create_model_for_export, export_model

# the outputs must agree with PyTorch to this max abs difference, or the command fails
TOLERANCE = 1e-4


def run(args: argparse.Namespace) -> int:
    try:
        model = create_model_for_export(args.model, checkpoint=args.checkpoint, random_init=args.random_init)
    except ValueError as error:
        raise SystemExit(f"error: {error}")
    size = tuple(args.input_size) if args.input_size else None
    exporter = export_model(model, args.out, args.format, input_size=size, opset=args.opset)
    print(f"wrote {args.out}: {args.model} as {exporter}, dynamic batch, height and width")
    if args.no_check:
        return 0
    height, width = size or model.pretrained_cfg['input_size'][-2:]
    # two batch sizes and two non-square sizes, neither of them the traced one
    shapes = [(1, 3, height + 32, width), (3, 3, height, width + 64)]
    diffs = compare_with_pytorch(model, args.out, args.format, shapes)
    for shape, diff in zip(shapes, diffs):
        print(f"  max abs diff vs PyTorch at {'x'.join(map(str, shape))}: {diff:.2e}")
    if max(diffs) > TOLERANCE:
        print(f"error: the exported model differs from PyTorch by more than {TOLERANCE}")
        return 1
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        'export', help='export a model to ONNX, TorchScript or a torch.export program',
        description='Export a zoo (or timm) model with dynamic batch, height and width, then run the file in its '
                    f'own runtime at two other input sizes and fail if it differs from PyTorch by more than '
                    f'{TOLERANCE}.')
    parser.add_argument('model', metavar='ARCH[.TAG]', help='model name, optionally with a pretrained tag')
    parser.add_argument('out', type=Path, metavar='OUT', help='output file (.onnx, .pt, .pt2)')
    parser.add_argument('--format', choices=FORMATS, default='onnx',
                        help='onnx; torchscript (torch.jit.script); exported (torch.export, .pt2)')
    parser.add_argument('--checkpoint', help='state dict to export instead of the pretrained weights')
    parser.add_argument('--random-init', action='store_true',
                        help='export random weights when neither pretrained weights nor --checkpoint exist')
    parser.add_argument('--input-size', type=int, nargs=2, metavar=('H', 'W'),
                        help="size of the example input used for tracing (default: the model's input size)")
    parser.add_argument('--opset', type=int, help='ONNX opset version (default: the exporter\'s)')
    parser.add_argument('--no-check', action='store_true', help='skip the comparison with PyTorch')
    parser.set_defaults(func=run)

""" `bam-models export --model MODEL --out OUT [--format {onnx,torchscript,exported}] [--checkpoint F]` """
import argparse
from pathlib import Path

from bam_models.commands.options import add_img_size_option, add_model_option, add_out_option, img_size
from bam_models.errors import ExportError, PretrainedWeightsError
from bam_models.export import FORMATS, check_shapes, compare_with_pytorch, create_model_for_export, export_model

# the outputs must agree with PyTorch to this max abs difference, or the command fails
TOLERANCE = 1e-4


def run(args: argparse.Namespace) -> int:
    size = img_size(args)
    try:
        model = create_model_for_export(args.model, checkpoint=args.checkpoint, random_init=args.random_init)
    except PretrainedWeightsError as error:
        if '--random-init' in str(error):  # the message suggests it already
            raise
        raise PretrainedWeightsError(
            f"{error}, or --random-init to export random weights (e.g. to test a deployment pipeline)") from error
    shapes = check_shapes(model, size)  # checks --img-size before any work
    result = export_model(model, Path(args.out), args.format, input_size=size, opset=args.opset)
    print(f"{args.model} as {result.exporter}, dynamic batch, height and width")
    for path in result.files:
        print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")
    if args.no_check:
        return 0
    diffs = compare_with_pytorch(model, Path(args.out), args.format, shapes)
    for shape, diff in zip(shapes, diffs):
        print(f"  max abs diff vs PyTorch at {'x'.join(map(str, shape))}: {diff:.2e}")
    if max(diffs) > TOLERANCE:
        raise ExportError(f"the exported model differs from PyTorch by {max(diffs):.2e}, more than {TOLERANCE}; "
                          f"try the other --format or another --opset, and report the model name")
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        'export', help='export a model to ONNX, TorchScript or a torch.export program',
        description='Export a zoo (or timm) model with dynamic batch, height and width, print every file written, '
                    f'then run the file in its own runtime at two other input sizes and fail if it differs from '
                    f'PyTorch by more than {TOLERANCE}.')
    add_model_option(parser, 'ARCH[.TAG], local-dir:PATH or hf-hub:ORG/NAME, as for validate and visualize',
                     old_positional=True)
    add_out_option(parser, 'output file (.onnx, .pt, .pt2)', old_positional=True)
    parser.add_argument('--format', choices=FORMATS, default='onnx',
                        help='onnx; torchscript (torch.jit.script); exported (torch.export, .pt2)')
    parser.add_argument('--checkpoint', help='weights file (best.pth/last.pth from training, or a state dict)')
    parser.add_argument('--random-init', action='store_true',
                        help='export random weights when neither pretrained weights nor --checkpoint exist')
    add_img_size_option(parser, "size N or H W of the example input used for tracing (default: the model's "
                                "input size)", old_pair_flag='--input-size')
    parser.add_argument('--opset', type=int, help='ONNX opset version (default: the exporter\'s)')
    parser.add_argument('--no-check', action='store_true', help='skip the comparison with PyTorch')
    parser.set_defaults(func=run)

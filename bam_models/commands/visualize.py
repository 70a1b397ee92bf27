""" `bam-models visualize`: a figure of every stage's BAM/CBAM spatial attention and a Grad-CAM of the top class. """
import argparse
import sys
from pathlib import Path

from bam_models.errors import PretrainedWeightsError
from bam_models.hub.load import create_model_from_name
from bam_models.visualize import class_names, load_images, save_attention_figure


def run(args: argparse.Namespace) -> int:
    try:
        model = create_model_from_name(args.model, args.checkpoint, pretrained=not args.random_init).eval()
    except PretrainedWeightsError as error:
        raise PretrainedWeightsError(f"{error}, or --random-init to look at an untrained model") from error
    images = load_images(model, args.image, args.img_size)
    capture = save_attention_figure(
        model, images, args.out, class_names=class_names(model), target_layer=args.target_layer,
        titles=[Path(path).name for path in args.image])
    for stage in capture.stages.values():
        size = 'no spatial map' if stage.size is None else f'{stage.size[0]}x{stage.size[1]}'
        spatial = '' if stage.spatial is None else (
            f', spatial attention mean {stage.spatial.mean():.3f} range [{stage.spatial.min():.3f}, '
            f'{stage.spatial.max():.3f}]')
        print(f'{stage.name}: {len(stage.modules)} {stage.kind}, {size}{spatial}')
    cam = capture.cam
    print(f'Grad-CAM: {cam.name}, {cam.size[0]}x{cam.size[1]}')
    if cam.note:
        print(f'warning: {cam.note}', file=sys.stderr)
    print(f'wrote {args.out}')
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        'visualize', help='draw BAM/CBAM attention maps and Grad-CAM for images',
        description='One row per image: the input, the spatial attention of every stage upsampled onto it '
                    '(mean over the stage\'s modules and channels, min-max scaled per panel; the title gives '
                    'the actual range) and a Grad-CAM of the top class at the deepest stage whose map is at least '
                    '4x4 at the input size (layer4 at 224 px, layer2 at 32 px). Images are '
                    'preprocessed as the model was trained (its pretrained cfg, a local-dir: config.json, or '
                    'the data config stored in a best.pth/last.pth of `bam-models train`).')
    parser.add_argument('--model', required=True,
                        help='ARCH, ARCH.TAG, local-dir:PATH or hf-hub:ID (weights from the pretrained cfg)')
    parser.add_argument('--checkpoint', help='weights file for ARCH: .safetensors or a torch checkpoint')
    parser.add_argument('--random-init', action='store_true', help='use random weights (no checkpoint needed)')
    parser.add_argument('--image', nargs='+', required=True, metavar='PATH', help='image files')
    parser.add_argument('--out', required=True, help='figure path, e.g. maps.png')
    parser.add_argument('--img-size', type=int, help='input size (default: the one the model was trained at)')
    parser.add_argument('--target-layer', help='module for Grad-CAM (default: the deepest stage whose map is at '
                                               'least 4x4; a coarser one is drawn with a warning)')
    parser.set_defaults(func=run)

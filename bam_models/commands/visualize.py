""" `bam-models visualize`: a figure of every stage's BAM/CBAM spatial attention and a Grad-CAM of the top class. """
import argparse
from typing import List, Optional, Sequence

import timm
import torch

import bam_models  # noqa: F401  (registers the zoo with timm)
from bam_models.hub import PretrainedWeightsError, model_from_checkpoint
from bam_models.visualize import save_attention_figure


def load_model(name: str, checkpoint: Optional[str] = None, random_init: bool = False) -> torch.nn.Module:
    """A timm model by name (`ARCH`, `ARCH.TAG`, `local-dir:PATH`, `hf-hub:ID`), with weights from its
    pretrained cfg, from `checkpoint` (safetensors, or a torch file read with weights_only=True; the number
    of classes is taken from the classifier's weight), or random with `random_init`."""
    if checkpoint is None:
        hint = ("pass --checkpoint FILE (or a local-dir:PATH model saved with timm's save_for_hf), or "
                "--random-init to look at an untrained model.")
        try:
            return timm.create_model(name, pretrained=not random_init)
        except PretrainedWeightsError as error:  # a zoo model: the error already names the tags there are
            raise SystemExit(f"{error} To visualize it anyway, {hint}") from error
        except RuntimeError as error:  # timm's own models
            if 'No pretrained weights' not in str(error):
                raise
            raise SystemExit(f"{name} has no pretrained weights; {hint}") from error
    try:
        return model_from_checkpoint(name, checkpoint)
    except ValueError as error:
        raise SystemExit(f"{error} (set it with --model)") from None


def load_images(model: torch.nn.Module, paths: Sequence[str], img_size: Optional[int] = None) -> torch.Tensor:
    """Images preprocessed as the model's pretrained_cfg says (resize, center crop, normalise)."""
    from PIL import Image
    from timm.data import create_transform, resolve_data_config

    config = resolve_data_config({'input_size': (3, img_size, img_size)} if img_size else {}, model=model)
    transform = create_transform(**config)
    return torch.stack([transform(Image.open(path).convert('RGB')) for path in paths])


def class_names(model: torch.nn.Module) -> Optional[List[str]]:
    """Label names from the pretrained cfg, else ImageNet's for 1000-class models, else None."""
    names = model.pretrained_cfg.get('label_names')
    if names:
        return list(names)
    subset = timm.data.infer_imagenet_subset(model)
    if subset:
        info = timm.data.ImageNetInfo(subset)
        return [info.index_to_description(i) for i in range(model.num_classes)]
    return None


def run(args: argparse.Namespace) -> int:
    model = load_model(args.model, args.checkpoint, args.random_init).eval()
    images = load_images(model, args.image, args.img_size)
    capture = save_attention_figure(
        model, images, args.out, class_names=class_names(model), target_layer=args.target_layer,
        titles=[path.rsplit('/', 1)[-1] for path in args.image])
    for stage in capture.stages.values():
        size = 'no spatial map' if stage.size is None else f'{stage.size[0]}x{stage.size[1]}'
        spatial = '' if stage.spatial is None else (
            f', spatial attention mean {stage.spatial.mean():.3f} range [{stage.spatial.min():.3f}, '
            f'{stage.spatial.max():.3f}]')
        print(f'{stage.name}: {len(stage.modules)} {stage.kind}, {size}{spatial}')
    print(f'wrote {args.out}')
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        'visualize', help='draw BAM/CBAM attention maps and Grad-CAM for images',
        description='One row per image: the input, the spatial attention of every stage upsampled onto it '
                    '(mean over the stage\'s modules and channels, min-max scaled per panel; the title gives '
                    'the actual range) and a Grad-CAM of the top class at the last stage.')
    parser.add_argument('--model', required=True,
                        help='ARCH, ARCH.TAG, local-dir:PATH or hf-hub:ID (weights from the pretrained cfg)')
    parser.add_argument('--checkpoint', help='weights file for ARCH: .safetensors or a torch checkpoint')
    parser.add_argument('--random-init', action='store_true', help='use random weights (no checkpoint needed)')
    parser.add_argument('--image', nargs='+', required=True, metavar='PATH', help='image files')
    parser.add_argument('--out', required=True, help='figure path, e.g. maps.png')
    parser.add_argument('--img-size', type=int, help='input size (default: the pretrained cfg\'s)')
    parser.add_argument('--target-layer', help='module for Grad-CAM (default: the last stage, e.g. layer4)')
    parser.set_defaults(func=run)

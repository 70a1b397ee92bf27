""" `bam-models detect-train`: fine-tune a Faster R-CNN / Mask R-CNN / RetinaNet with a zoo backbone on COCO data. """
import argparse
import dataclasses
import os

from bam_models.errors import UsageError
from bam_models.detection.train import BUILDERS, DetectionTrainConfig, train_detector


def _check_paths(args: argparse.Namespace) -> None:
    """Refuse missing inputs before the model is built (the COCO reader would fail with a traceback)."""
    folder, file = ('folder', os.path.isdir), ('file', os.path.isfile)
    for option, path, (kind, exists), what in (
            ('--images', args.images, folder, 'the training image folder'),
            ('--annotations', args.annotations, file, 'the COCO instances JSON of the training images'),
            ('--val-images', args.val_images, folder, 'the validation image folder'),
            ('--val-annotations', args.val_annotations, file, 'the COCO instances JSON of the validation images'),
            ('--resume', None if args.resume == 'auto' else args.resume, file,
             "a last.pth written by an earlier run, or 'auto'")):
        if path is not None and not exists(path):
            raise UsageError(f"{option} {path} is not an existing {kind}; pass {what}")
    if (args.val_images is None) != (args.val_annotations is None):
        raise UsageError("--val-images and --val-annotations go together; pass both or neither")


def run(args: argparse.Namespace) -> int:
    _check_paths(args)
    fields = {field.name for field in dataclasses.fields(DetectionTrainConfig)}
    train_detector(DetectionTrainConfig(**{k: v for k, v in vars(args).items() if k in fields}))
    return 0


def register(subparsers) -> None:
    defaults = DetectionTrainConfig(images='', annotations='', out='')
    parser = subparsers.add_parser(
        'detect-train', help='fine-tune a detector with a zoo backbone on a COCO-format dataset',
        description='Fine-tune torchvision Faster R-CNN, Mask R-CNN or RetinaNet with an FPN on a zoo (or timm) '
                    'backbone. Data: an image folder and a COCO instances JSON; category ids are the labels. '
                    'A checkpoint OUT/last.pth is written after every epoch (--resume continues from it).')
    parser.add_argument('--images', required=True, help='folder of training images')
    parser.add_argument('--annotations', required=True, help='COCO instances JSON of the training images')
    parser.add_argument('--out', required=True, help='folder for checkpoints')
    parser.add_argument('--model', '--backbone', dest='backbone', metavar='MODEL', default=defaults.backbone,
                        help='timm model name of the backbone (default: %(default)s; --backbone is deprecated)')
    parser.add_argument('--detector', choices=tuple(BUILDERS), default=defaults.detector)
    parser.add_argument('--pretrained-backbone', action='store_true', help="load the backbone's pretrained weights")
    parser.add_argument('--trainable-stages', type=int, default=defaults.trainable_stages,
                        help='backbone stages trained, counted from the last (5 also trains the stem)')
    parser.add_argument('--fpn-channels', type=int, default=defaults.fpn_channels)
    parser.add_argument('--min-size', type=int, default=defaults.min_size, help='shorter image side after resizing')
    parser.add_argument('--max-size', type=int, default=defaults.max_size, help='longer image side at most')
    parser.add_argument('--epochs', type=int, default=defaults.epochs)
    parser.add_argument('--batch-size', type=int, default=defaults.batch_size)
    parser.add_argument('--lr', type=float, default=defaults.lr)
    parser.add_argument('--momentum', type=float, default=defaults.momentum)
    parser.add_argument('--weight-decay', type=float, default=defaults.weight_decay)
    parser.add_argument('--workers', type=int, default=defaults.workers, help='data loader processes')
    parser.add_argument('--amp', action='store_true', help='autocast: float16 on CUDA, bfloat16 on CPU')
    parser.add_argument('--device', default=defaults.device)
    parser.add_argument('--val-images', help='folder of validation images (scored with COCO box AP)')
    parser.add_argument('--val-annotations', help='COCO instances JSON of the validation images')
    parser.add_argument('--resume', metavar='PATH|auto',
                        help="checkpoint (OUT/last.pth) to continue from ('auto': OUT/last.pth when it exists, else "
                             "start the run)")
    parser.add_argument('--overwrite', action='store_true', help='start afresh in an OUT that holds an earlier run')
    parser.add_argument('--seed', type=int, default=defaults.seed)
    parser.set_defaults(func=run)

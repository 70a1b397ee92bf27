""" `bam-models validate --model ARCH[.TAG] [--checkpoint F] --data DIR|digits`: top-1, top-5 and loss with the
preprocessing the model was trained with (bam_models.train.validate). """
import argparse
import json

from bam_models.train.validate import validate


def run(args: argparse.Namespace) -> int:
    result = validate(args.model, args.data, args.checkpoint, args.split, args.batch_size, args.img_size,
                      args.workers, args.device)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{args.model} on {args.data} ({result['count']} images at {result['input_size'][1]}px): "
              f"top-1 {result['top1']:.2f}  top-5 {result['top5']:.2f}  loss {result['loss']:.4f}")
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        'validate', help='top-1/top-5/loss of a model on a folder dataset or the digits test split')
    parser.add_argument('--model', required=True,
                        help='ARCH[.TAG], or local-dir:PATH / hf-hub:ORG/NAME of a Hub-format folder')
    parser.add_argument('--checkpoint', help='weights file (best.pth/last.pth from training, or a state dict)')
    parser.add_argument('--data', required=True, help="a folder with a validation split, or 'digits' (its test split)")
    parser.add_argument('--split', default='validation', help='folder split name (timm also finds val/, eval/)')
    parser.add_argument('--batch-size', type=int, default=64)
    parser.add_argument('--img-size', type=int, help="override the model's input size")
    parser.add_argument('--workers', type=int, default=0)
    parser.add_argument('--device', default='cpu', help='cpu, cuda, cuda:N or auto (default: cpu)')
    parser.add_argument('--json', action='store_true')
    parser.set_defaults(func=run)

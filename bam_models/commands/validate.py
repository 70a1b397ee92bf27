""" `bam-models validate --model ARCH[.TAG] [--checkpoint F] --data DIR|digits`: top-1, top-5 and loss with the
model's own preprocessing (timm's resolve_data_config on its pretrained_cfg). """
import argparse
import json
import os
import sys
from typing import Any, Dict, Optional

import timm
import torch
from timm.data import create_transform, resolve_data_config

import bam_models  # noqa: F401  registers the zoo with timm
from bam_models.train.data import DIGITS, build_dataset
from bam_models.hub import model_from_checkpoint


def validate(model_name: str, data: str, checkpoint: Optional[str] = None, split: str = 'validation',
             batch_size: int = 64, img_size: Optional[int] = None, workers: int = 0) -> Dict[str, Any]:
    from bam_models.train import evaluate
    data_config_args = {}
    if checkpoint:
        model = model_from_checkpoint(model_name, checkpoint)
        raw = torch.load(checkpoint, map_location='cpu', weights_only=True)
        if isinstance(raw, dict) and 'data_config' in raw:  # a best.pth from `bam-models train`
            data_config_args = dict(raw['data_config'])
    else:
        model = timm.create_model(model_name, pretrained=True)
    if img_size:
        data_config_args['input_size'] = (3, img_size, img_size)
    data_config = resolve_data_config(data_config_args, model=model)
    dataset = build_dataset(data, 'val', val_split=split)
    if data != DIGITS and not os.path.isdir(data):
        raise SystemExit(f"error: --data {data} is neither 'digits' nor a folder")
    dataset.transform = create_transform(**data_config, is_training=False)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers)
    metrics = evaluate(model, loader, torch.device('cpu'), torch.no_grad)
    return dict(model=model_name, checkpoint=checkpoint, data=data, input_size=list(data_config['input_size']),
                **metrics)


def run(args: argparse.Namespace) -> int:
    if args.data != DIGITS and not os.path.isdir(args.data):
        print(f"error: --data {args.data} is neither 'digits' nor a folder", file=sys.stderr)
        return 2
    if args.checkpoint and not os.path.isfile(args.checkpoint):
        print(f"error: --checkpoint {args.checkpoint} does not exist", file=sys.stderr)
        return 2
    arch = timm.models.split_model_name_tag(args.model)[0]
    if not args.model.startswith(('local-dir:', 'hf-hub:')) and not timm.is_model(arch):
        print(f"error: unknown model '{arch}'; see `bam-models list` or timm.list_models()", file=sys.stderr)
        return 2
    result = validate(args.model, args.data, args.checkpoint, args.split, args.batch_size, args.img_size,
                      args.workers)
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
    parser.add_argument('--json', action='store_true')
    parser.set_defaults(func=run)

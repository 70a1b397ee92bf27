""" `bam-models demo` (what `make demo` runs): train resnet18_bam on scikit-learn's bundled handwritten digits on
the CPU, select the best epoch on a validation split carved from the training images, export it in Hub format,
score the 360 test images once with the reloaded `local-dir:` model, and draw its attention maps. """
import argparse
import os
import time
from dataclasses import dataclass
from typing import Any, Dict

# test digits drawn in the attention figure: the first test image of each of these classes
FIGURE_CLASSES = (0, 3, 5, 8)

# the same job as configs/digits.yaml (a test keeps the two equal); here so an installed package needs no file
DIGITS_DEMO = {
    'model': {'name': 'resnet18_bam', 'pretrained': False},
    'data': {'dataset': 'digits', 'input_size': 32, 'batch_size': 64, 'scale': [0.85, 1.0], 'ratio': [0.9, 1.1],
             'hflip': 0.0, 'interpolation': 'bilinear', 'crop_pct': 1.0},
    'optim': {'opt': 'sgd', 'lr': 0.1, 'momentum': 0.9, 'weight_decay': 5.0e-4},
    'schedule': {'sched': 'cosine', 'epochs': 6, 'warmup_epochs': 1, 'warmup_lr': 0.01},
    'train': {'seed': 0, 'label_smoothing': 0.1, 'output': 'runs/digits'},
}


@dataclass
class DemoResult:
    summary: Dict[str, Any]  # what `train` returned; summary['best'] is the epoch chosen on validation
    test: Dict[str, Any]  # the reloaded Hub folder on the 360 test images
    test_from_checkpoint: Dict[str, Any]  # best.pth on the same images
    train_time_s: float
    figure: str

    @property
    def val_images(self) -> int:
        return self.summary['final']['val_images']

    @property
    def reload_matches(self) -> bool:
        return abs(self.test['top1'] - self.test_from_checkpoint['top1']) < 1e-6 and \
            abs(self.test['loss'] - self.test_from_checkpoint['loss']) < 1e-5 * max(1.0, self.test['loss'])


def run_demo(output: str = 'runs/digits', seed: int = 0, progress: bool = True, overwrite: bool = False,
             overrides=()) -> DemoResult:
    """Trains, exports, scores the test split once (reloaded Hub folder and best.pth), draws the figure.

    The exported folder, reloaded with `timm.create_model('local-dir:...', pretrained=True)`, and best.pth must
    agree on the test digits (`DemoResult.reload_matches`)."""
    from bam_models.train import train
    from bam_models.train.config import apply_overrides, config_from_dict
    from bam_models.train.validate import validate

    sets = [f'train.seed={seed}', f'train.output={output}', f'train.progress={str(progress).lower()}', *overrides]
    cfg = config_from_dict(apply_overrides(DIGITS_DEMO, sets))
    start = time.perf_counter()
    summary = train(cfg, overwrite=overwrite)
    train_time = time.perf_counter() - start
    test = validate(f"local-dir:{summary['hub_dir']}", 'digits', split='test')
    from_checkpoint = validate(cfg.model.name, 'digits', checkpoint=os.path.join(output, 'best.pth'), split='test')
    figure = os.path.join(summary['output'], 'attention.png')
    write_attention_figure(f"local-dir:{summary['hub_dir']}", figure)
    return DemoResult(summary, test, from_checkpoint, train_time, figure)


def write_attention_figure(model_name: str, out_path: str) -> None:
    """The model's BAM maps and Grad-CAM for test digits, preprocessed exactly as in validation."""
    import timm
    import torch
    from timm.data import create_transform, resolve_data_config

    from bam_models.train.data import DigitsDataset
    from bam_models.visualize import save_attention_figure

    model = timm.create_model(model_name, pretrained=True).eval()
    dataset = DigitsDataset('test', transform=create_transform(
        **resolve_data_config({}, model=model), is_training=False))
    indices = [int((dataset.targets == c).nonzero()[0][0]) for c in FIGURE_CLASSES]
    images = torch.stack([dataset[i][0] for i in indices])
    # at 32 px layer4 is a single pixel; layer3's 2x2 map is the finest Grad-CAM that still sees the BAMs
    save_attention_figure(
        model, images, out_path, target_layer='layer3',
        titles=[f'digit {dataset.targets[i]}' for i in indices], class_names=dataset.classes)


def run(args: argparse.Namespace) -> int:
    import torch

    schedule, data = DIGITS_DEMO['schedule'], DIGITS_DEMO['data']
    print(f"training {DIGITS_DEMO['model']['name']} on the digits data ({schedule['epochs']} epochs at "
          f"{data['input_size']}px, {torch.get_num_threads()} CPU threads)")
    result = run_demo(args.out, args.seed, args.progress, args.overwrite)
    best, test, hub = result.summary['best'], result.test, result.summary['hub_dir']
    print()
    print(f"best epoch      {best['epoch']} of {result.summary['epochs']}, chosen on the {result.val_images} "
          f"validation digits: top-1 {best['top1']:.2f} %")
    print(f"test accuracy   {test['top1']:.2f} % top-1 on {test['count']} held-out digits, top-5 {test['top5']:.2f} %")
    print(f"reloaded        timm.create_model('local-dir:{hub}', pretrained=True) and best.pth score "
          f"{'the same' if result.reload_matches else 'DIFFERENTLY'} on the test digits")
    print(f"time            {result.train_time_s:.1f} s for training and export")
    print(f"files           {result.summary['output']}/ (last.pth, best.pth, log.jsonl, summary.json), "
          f"Hub format in {hub}/")
    print(f"attention maps  {result.figure} (BAM spatial attention per stage and Grad-CAM, "
          f"{len(FIGURE_CLASSES)} test digits)")
    return 0 if result.reload_matches else 1


def register(subparsers) -> None:
    parser = subparsers.add_parser('demo', help='the demo run by `make demo`: train resnet18_bam on digits',
                                   description=__doc__)
    parser.add_argument('--out', '--output', dest='out', default='runs/digits',
                        help='folder for checkpoints, logs and the Hub export (--output is deprecated)')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--overwrite', action='store_true', help='replace an earlier demo run in --out')
    parser.add_argument('--no-progress', dest='progress', action='store_false', help='no progress bars')
    parser.set_defaults(func=run)

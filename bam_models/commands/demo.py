""" `bam-models demo` (what `make demo` runs): fine-tune resnet18_bam on scikit-learn's bundled handwritten digits
on the CPU, export the best weights in Hub format, reload them with `timm.create_model('local-dir:...')` and check
that the reloaded model scores the same on the 360 test images, then draw the reloaded model's attention maps and
Grad-CAM for a few test digits. """
import argparse
import os
import time

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


def run(args: argparse.Namespace) -> int:
    import torch

    from bam_models.commands.validate import validate
    from bam_models.train.config import apply_overrides, config_from_dict
    from bam_models.train import train

    overrides = [f'train.seed={args.seed}', f'train.output={args.output}', f'train.progress={str(args.progress).lower()}']
    cfg = config_from_dict(apply_overrides(DIGITS_DEMO, overrides))
    print(f"fine-tuning {cfg.model.name} on the digits data ({cfg.schedule.epochs} epochs at {cfg.data.input_size}px, "
          f"{torch.get_num_threads()} CPU threads)")
    start = time.perf_counter()
    summary = train(cfg)
    train_time = time.perf_counter() - start
    reloaded = validate(f"local-dir:{summary['hub_dir']}", 'digits')
    best = summary['best']
    same = abs(reloaded['top1'] - best['top1']) < 1e-6
    print()
    print(f"test accuracy   {best['top1']:.2f} % top-1 on {reloaded['count']} held-out digits "
          f"(best epoch {best['epoch'] + 1} of {cfg.schedule.epochs}), top-5 {best['top5']:.2f} %")
    print(f"reloaded        timm.create_model('local-dir:{summary['hub_dir']}') -> {reloaded['top1']:.2f} % "
          f"({'same' if same else 'DIFFERENT'})")
    print(f"time            {train_time:.1f} s for training, export and reload checks")
    figure = os.path.join(summary['output'], 'attention.png')
    write_attention_figure(f"local-dir:{summary['hub_dir']}", figure)
    print(f"files           {summary['output']}/ (last.pth, best.pth, log.jsonl, summary.json), "
          f"Hub format in {summary['hub_dir']}/")
    print(f"attention maps  {figure} (BAM spatial attention per stage and Grad-CAM, {len(FIGURE_CLASSES)} test digits)")
    return 0 if same else 1


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


def register(subparsers) -> None:
    parser = subparsers.add_parser('demo', help='the demo run by `make demo`: fine-tune resnet18_bam on digits',
                                   description=__doc__)
    parser.add_argument('--output', default='runs/digits', help='folder for checkpoints, logs and the Hub export')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--no-progress', dest='progress', action='store_false', help='no progress bars')
    parser.set_defaults(func=run)

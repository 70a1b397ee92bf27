""" `bam-models demo` (what `make demo` runs): train resnet18_bam on scikit-learn's bundled handwritten digits on
the CPU, select the best epoch on a validation split carved from the training images, export it in Hub format,
score the 360 test images once with the reloaded `local-dir:` model, and draw its attention maps. """
import argparse


def run(args: argparse.Namespace) -> int:
    import torch

    from bam_models.train.demo import DIGITS_DEMO, FIGURE_CLASSES, run_demo

    schedule, data = DIGITS_DEMO['schedule'], DIGITS_DEMO['data']
    print(f"training {DIGITS_DEMO['model']['name']} on the digits data ({schedule['epochs']} epochs at "
          f"{data['input_size']}px, {torch.get_num_threads()} CPU threads)")
    result = run_demo(args.output, args.seed, args.progress, args.overwrite)
    best, test, hub = result.summary['best'], result.test, result.summary['hub_dir']
    print()
    print(f"best epoch      {best['epoch']} of {result.summary['epochs']}, chosen on the {result.val_images} "
          f"validation digits: top-1 {best['top1']:.2f} %")
    print(f"test accuracy   {test['top1']:.2f} % top-1 on {test['count']} held-out digits, top-5 {test['top5']:.2f} %")
    print(f"reloaded        timm.create_model('local-dir:{hub}') and best.pth score "
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
    parser.add_argument('--output', default='runs/digits', help='folder for checkpoints, logs and the Hub export')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--overwrite', action='store_true', help='replace an earlier demo run in --output')
    parser.add_argument('--no-progress', dest='progress', action='store_false', help='no progress bars')
    parser.set_defaults(func=run)

""" `bam-models demo`: build resnet50_bam and resnet50_cbam, run a forward and backward pass, print the zoo. """
import argparse
import time

import timm
import torch

from bam_models.commands.list_models import model_table
from bam_models.models import list_zoo_models
from bam_models.profiling import model_stats


def run(args: argparse.Namespace) -> int:
    torch.manual_seed(0)
    for name in ('resnet50_bam', 'resnet50_cbam'):
        model = timm.create_model(name, num_classes=10).train()
        images = torch.randn(2, 3, 128, 128)
        start = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(model(images), torch.tensor([0, 1]))
        loss.backward()
        grad_norm = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]).norm()
        print(f"{name}: forward+backward on 2x3x128x128 in {time.perf_counter() - start:.2f}s, "
              f"loss {loss.item():.4f}, grad norm {grad_norm:.3f}")
    print()
    print(model_table([model_stats(name) for name in list_zoo_models()]))
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser('demo', help='the demo run by `make demo`')
    parser.set_defaults(func=run)

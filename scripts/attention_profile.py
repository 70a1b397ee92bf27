#!/usr/bin/env python3
""" Where BAM's and CBAM's time goes: each model's attention modules timed on their own inside a training step and
an inference pass, next to its trunk, against the floor that memory bandwidth sets on the passes over the maps they
refine (see bam_models/benchmark/attention_profile.py):

    python scripts/attention_profile.py --models resnet50_bam resnet50_cbam --trunk resnet50 --threads 2
    python scripts/attention_profile.py --models resnet50_cbam seresnet50 --threads 2 --onnxruntime
    python scripts/attention_profile.py --quick

With --onnxruntime it adds, for the trunk and each model exported to ONNX, onnxruntime's own profile at batch 1:
the kernel time of each op type as onnxruntime runs the graph, its layout reorders included.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--models', nargs='+', default=['resnet50_bam', 'resnet50_cbam'])
    parser.add_argument('--trunk', default='resnet50', help='the plain trunk of the models (default resnet50)')
    parser.add_argument('--img-size', type=int, default=224)
    parser.add_argument('--batch-size', type=int, default=16)
    parser.add_argument('--repeats', type=int, default=5, help='timed passes, the median is reported (default 5)')
    parser.add_argument('--threads', type=int, help='torch.set_num_threads (default: torch default)')
    parser.add_argument('--quick', action='store_true', help='a tiny run (resnet18, 64 px, batch 2) to test it')
    parser.add_argument('--onnxruntime', action='store_true',
                        help="also onnxruntime's per-op-type profile of the exported trunk and models at batch 1")
    parser.add_argument('--markdown', help='also write the tables to a file')
    args = parser.parse_args(argv)
    from bam_models.benchmark.attention_profile import (
        attention_ops, copy_bandwidth, format_attention_ops, format_attention_profile, format_onnxruntime_ops,
        onnxruntime_ops, profile_attention)
    from bam_models.benchmark.report import describe_machine, write_report
    if args.quick:
        args.models, args.trunk, args.img_size, args.batch_size, args.repeats = ['resnet18_bam'], 'resnet18', 64, 2, 1
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    bandwidth = copy_bandwidth(64 if args.quick else 512)
    machine = describe_machine()
    tables = [format_attention_profile(profile_attention(
        name, args.trunk, args.img_size, args.batch_size, args.repeats, bandwidth=bandwidth)) for name in args.models]
    tables += [format_attention_ops(name, attention_ops(name, args.img_size, args.batch_size, train=train), train)
               for name in args.models for train in (True, False)]
    if args.onnxruntime:
        tables += [format_onnxruntime_ops(name, onnxruntime_ops(name, args.img_size, repeats=4 * args.repeats))
                   for name in [args.trunk, *args.models]]
    footer = (f"{machine['cpu']}, {machine['threads']} threads, torch {machine['torch']}, {machine['date']}; "
              f"{args.img_size} px, batch {args.batch_size}, median of {args.repeats}")
    write_report({}, '\n\n'.join(tables) + '\n\n' + footer, None, args.markdown)
    return 0


if __name__ == '__main__':
    sys.exit(main())

#!/usr/bin/env python3
""" Images per second of the training loader alone, the same photographs read as an image folder and as
webdataset shards, per number of loader workers (see bam_models/benchmark/input_pipeline.py):

    python scripts/input_pipeline.py --images 512 --workers 0 1 --markdown input_pipeline.md
    python scripts/input_pipeline.py --quick
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--images', type=int, default=512, help='training images (default 512)')
    parser.add_argument('--img-size', type=int, default=224, help='input size after augmentation (default 224)')
    parser.add_argument('--workers', type=int, nargs='+', default=[0, 1], help='loader workers (default 0 1)')
    parser.add_argument('--batch-size', type=int, default=32)
    parser.add_argument('--threads', type=int, default=1, help='torch.set_num_threads (default 1)')
    parser.add_argument('--quick', action='store_true', help='a tiny run (32 small images, 64 px) to test the tool')
    parser.add_argument('--json', help='also write the result as JSON')
    parser.add_argument('--markdown', help='also write the table to a file')
    args = parser.parse_args(argv)
    from bam_models.benchmark.input_pipeline import format_input_pipeline, measure_input_pipeline
    from bam_models.benchmark.report import write_report
    from bam_models.errors import BamModelsError
    sizes = dict(images=32, input_size=64, batch_size=8, shard_size=8, photo_size=(80, 60)) if args.quick else dict(
        images=args.images, input_size=args.img_size, batch_size=args.batch_size, shard_size=128)
    try:
        result = measure_input_pipeline(workers=args.workers, threads=args.threads, **sizes)
    except BamModelsError as e:  # e.g. webdataset not installed, or too few images for one batch
        print(f'error: {e}', file=sys.stderr)
        return e.exit_code
    write_report(result, format_input_pipeline(result), args.json, args.markdown)
    return 0


if __name__ == '__main__':
    sys.exit(main())

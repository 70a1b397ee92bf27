#!/usr/bin/env python3
""" Same as `bam-models benchmark ...`, runnable from a source checkout: `python scripts/benchmark.py --help`. """
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bam_models.cli import main  # noqa: E402

if __name__ == '__main__':
    sys.exit(main(['benchmark'] + sys.argv[1:]))

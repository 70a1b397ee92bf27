#!/usr/bin/env python3
""" Same as `bam-models train ...`; also works as `torchrun --nproc_per_node N scripts/train.py ...`. """
import sys

from bam_models.cli import main

if __name__ == '__main__':
    sys.exit(main(['train', *sys.argv[1:]]))

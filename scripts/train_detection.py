#!/usr/bin/env python3
""" Fine-tune a detector with a BAM/CBAM backbone on COCO-format data; same as `bam-models detect-train`.

    python scripts/train_detection.py --images DIR --annotations instances.json --out runs/det \
        --backbone resnet50_bam --epochs 12 --amp
"""
import sys

from bam_models.cli import main

if __name__ == '__main__':
    sys.exit(main(['detect-train', *sys.argv[1:]]))

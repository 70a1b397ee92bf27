""" The input pipeline alone: images per second of the training loader `bam-models train` builds (decode, timm's
training augmentation, collate; no model), for the same images read as an image folder and as webdataset shards
(`bam-models shards`), per number of loader worker processes.

The images are written first: photograph-sized JPEGs (500x375, about the mean ImageNet image) of a smooth random
field with noise, which encode to roughly the size of a real photograph of that shape, so decoding costs what it
would on real data. Everything is written to and read from one folder, removed afterwards unless kept.
"""
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from PIL import Image

from bam_models.benchmark.report import describe_machine
from bam_models.errors import UsageError
from bam_models.shards import write_shards
from bam_models.train import load_config
from bam_models.train.build import build_run, check_config
from bam_models.train.data import start_epoch

__all__ = ['format_input_pipeline', 'measure_input_pipeline', 'write_photo_folder']

PHOTO_SIZE = (500, 375)
CLASSES = 10


def _photo(rng: np.random.Generator, size) -> Image.Image:
    """A smooth colour field (upsampled noise) with fine noise on top: it compresses like a photograph."""
    width, height = size
    coarse = rng.uniform(0, 255, (height // 25 + 1, width // 25 + 1, 3)).astype(np.uint8)
    field = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC), dtype=np.float32)
    pixels = field + rng.normal(0, 12, field.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def write_photo_folder(root: Path, images: int, size=PHOTO_SIZE, seed: int = 0) -> Path:
    """root/train/CLASS/*.jpg with `images` images in all, and one validation image per class (the folder layout
    a run needs)."""
    rng = np.random.default_rng(seed)
    for split, count in (('train', images), ('val', CLASSES)):
        for index in range(count):
            folder = root / split / f'class{index % CLASSES}'
            folder.mkdir(parents=True, exist_ok=True)
            _photo(rng, size).save(folder / f'{index}.jpg', quality=90)
    return root


def _time_epoch(dataset: str, root: Optional[str], output: Path, workers: int, input_size: int,
                batch_size: int) -> Dict[str, float]:
    sets = ['model.name=resnet18', f'data.dataset={dataset}', f'data.input_size={input_size}',
            f'data.batch_size={batch_size}', f'data.workers={workers}', f'train.output={output}']
    if root:
        sets.append(f'data.root={root}')
    cfg = load_config(None, sets)
    loader = build_run(cfg, check_config(cfg)).train_loader
    start_epoch(loader, 0, 0)
    started = time.perf_counter()
    images = sum(len(targets) for _, targets in loader)
    seconds = time.perf_counter() - started
    return dict(images=images, seconds=seconds, images_per_s=images / seconds,
                images_per_s_per_process=images / seconds / max(1, workers))


def measure_input_pipeline(images: int = 512, input_size: int = 224, workers: Sequence[int] = (0, 1),
                           batch_size: int = 32, shard_size: int = 128, threads: int = 1,
                           photo_size=PHOTO_SIZE) -> Dict:
    """One epoch of the training loader over the same images as a folder and as shards, for each worker count."""
    needed = max(CLASSES, batch_size)
    if images < needed:
        raise UsageError(f"{images} images make no full batch of {batch_size} with every one of the {CLASSES} "
                         f"classes; measure at least {needed} images (--images)")
    torch.set_num_threads(threads)
    rows: List[Dict] = []
    with tempfile.TemporaryDirectory(prefix='bam-input-pipeline-') as tmp:
        folder = write_photo_folder(Path(tmp) / 'photos', images, size=photo_size)
        write_shards(folder, Path(tmp) / 'shards', shard_size)
        jpeg_bytes = sum(p.stat().st_size for p in (folder / 'train').rglob('*.jpg'))
        sources = (('folder', str(folder), None), ('shards', 'wds/photos', str(Path(tmp) / 'shards')))
        for count in workers:
            for source, dataset, root in sources:
                timing = _time_epoch(dataset, root, Path(tmp) / f'run-{source}-{count}', count, input_size,
                                     batch_size)
                rows.append(dict(source=source, workers=count, **timing))
    return dict(machine=describe_machine(), images=images, input_size=input_size, batch_size=batch_size,
                photo_size=list(photo_size), mean_jpeg_kb=jpeg_bytes / images / 1024, threads=threads, rows=rows)


def format_input_pipeline(result: Dict) -> str:
    machine = result['machine']
    lines = ['| source | loader workers | images | seconds | images/s | images/s per process |',
             '|---|---:|---:|---:|---:|---:|']
    lines += [f"| {r['source']} | {r['workers']} | {r['images']} | {r['seconds']:.2f} | {r['images_per_s']:.1f} | "
              f"{r['images_per_s_per_process']:.1f} |" for r in result['rows']]
    width, height = result['photo_size']
    lines.append(f"\n{machine['cpu']}, torch {machine['torch']} with {result['threads']} thread(s), timm "
                 f"{machine['timm']}, {machine['date']}; {result['images']} JPEGs of {width}x{height} (mean "
                 f"{result['mean_jpeg_kb']:.0f} KB) to {result['input_size']} px with timm's training augmentation, "
                 f"batch {result['batch_size']}, one epoch per row (worker start included); 'per process' divides "
                 f"by the worker processes (0 workers: the main process decodes)")
    return '\n'.join(lines)

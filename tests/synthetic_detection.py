""" A small synthetic detection set: coloured rectangles, discs and triangles on noise, with boxes and masks.

Each class has its own colour and shape, so a detector can learn it in a few dozen steps on CPU. Images
have different, non-square sizes. `write_coco` stores a set as an image folder plus COCO annotation JSON.
"""
import json
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import torch
from PIL import Image
from pycocotools import mask as mask_utils

CLASSES = ('rectangle', 'disc', 'triangle')
COLOURS = ((0.9, 0.15, 0.1), (0.1, 0.85, 0.2), (0.15, 0.2, 0.95))


def _shape_mask(kind: int, height: int, width: int, box: Tuple[int, int, int, int]) -> np.ndarray:
    x0, y0, x1, y1 = box
    ys, xs = np.mgrid[0:height, 0:width]
    if kind == 0:
        return (xs >= x0) & (xs < x1) & (ys >= y0) & (ys < y1)
    if kind == 1:
        cx, cy, rx, ry = (x0 + x1 - 1) / 2, (y0 + y1 - 1) / 2, (x1 - x0) / 2, (y1 - y0) / 2
        return ((xs - cx) / rx) ** 2 + ((ys - cy) / ry) ** 2 <= 1
    # triangle with its apex at the top centre and its base on the bottom edge of the box
    rel_y = (ys - y0) / max(y1 - 1 - y0, 1)
    half = rel_y * (x1 - x0) / 2
    cx = (x0 + x1 - 1) / 2
    return (ys >= y0) & (ys < y1) & (np.abs(xs - cx) <= half)


def make_sample(rng: np.random.Generator, height: int, width: int, max_objects: int = 3):
    """One (image float tensor (3, H, W) in [0, 1], target dict with boxes, labels, masks)."""
    image = rng.uniform(0.3, 0.6, size=(height, width, 3)) + rng.normal(0, 0.05, size=(height, width, 3))
    boxes, labels, masks = [], [], []
    for _ in range(rng.integers(1, max_objects + 1)):
        kind = int(rng.integers(len(CLASSES)))
        box_w, box_h = int(rng.integers(width // 5, width // 2)), int(rng.integers(height // 5, height // 2))
        x0, y0 = int(rng.integers(0, width - box_w)), int(rng.integers(0, height - box_h))
        mask = _shape_mask(kind, height, width, (x0, y0, x0 + box_w, y0 + box_h))
        image[mask] = COLOURS[kind]
        ys, xs = np.nonzero(mask)
        boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
        labels.append(kind + 1)  # 0 is the background class in torchvision detectors
        masks.append(mask)
    # later shapes cover earlier ones: keep masks consistent with what is visible
    for i in range(len(masks)):
        for later in masks[i + 1:]:
            masks[i] = masks[i] & ~later
    image = torch.from_numpy(np.clip(image, 0, 1).transpose(2, 0, 1)).float()
    target = dict(
        boxes=torch.tensor(boxes, dtype=torch.float32),
        labels=torch.tensor(labels, dtype=torch.int64),
        masks=torch.from_numpy(np.stack(masks)).to(torch.uint8),
    )
    return image, target


def make_dataset(num_images: int, seed: int = 0, sizes=((96, 128), (128, 96), (112, 144), (120, 120))):
    rng = np.random.default_rng(seed)
    return [make_sample(rng, *sizes[i % len(sizes)]) for i in range(num_images)]


def write_coco(samples, root: Path) -> Tuple[Path, Path]:
    """Write samples as PNGs under root/images and COCO instances JSON at root/annotations.json."""
    image_dir = root / 'images'
    image_dir.mkdir(parents=True, exist_ok=True)
    images: List[Dict] = []
    annotations: List[Dict] = []
    for image_id, (image, target) in enumerate(samples, start=1):
        file_name = f'{image_id:05d}.png'
        array = (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        Image.fromarray(array).save(image_dir / file_name)
        height, width = array.shape[:2]
        images.append(dict(id=image_id, file_name=file_name, height=height, width=width))
        for box, label, mask in zip(target['boxes'].tolist(), target['labels'].tolist(), target['masks'].numpy()):
            rle = mask_utils.encode(np.asfortranarray(mask))
            rle['counts'] = rle['counts'].decode('ascii')
            annotations.append(dict(
                id=len(annotations) + 1, image_id=image_id, category_id=label, iscrowd=0,
                bbox=[box[0], box[1], box[2] - box[0], box[3] - box[1]],
                area=float(mask.sum()), segmentation=rle,
            ))
    categories = [dict(id=i + 1, name=name) for i, name in enumerate(CLASSES)]
    ann_file = root / 'annotations.json'
    ann_file.write_text(json.dumps(dict(images=images, annotations=annotations, categories=categories)))
    return image_dir, ann_file

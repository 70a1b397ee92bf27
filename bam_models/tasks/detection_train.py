""" Minimal COCO-format fine-tuning of the zoo's detectors: an image folder plus an instances JSON.

Data comes through torchvision.datasets.CocoDetection wrapped for transforms v2 (tv_tensors boxes and masks),
training runs SGD with a cosine schedule and optional autocast (float16 + GradScaler on CUDA, bfloat16 on
CPU), a checkpoint is written after every epoch and can be resumed, and a validation set is scored with
pycocotools' COCOeval.
"""
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.datasets import CocoDetection, wrap_dataset_for_transforms_v2
from torchvision.transforms import v2 as T

from bam_models.tasks.detection import fasterrcnn_fpn, maskrcnn_fpn, retinanet_fpn

__all__ = ['DetectionTrainConfig', 'coco_dataset', 'train_detector', 'evaluate_coco']

BUILDERS = {'fasterrcnn': fasterrcnn_fpn, 'maskrcnn': maskrcnn_fpn, 'retinanet': retinanet_fpn}


@dataclass
class DetectionTrainConfig:
    images: str
    annotations: str
    out: str
    backbone: str = 'resnet50_bam'
    detector: str = 'fasterrcnn'
    pretrained_backbone: bool = False
    trainable_stages: int = 3
    fpn_channels: int = 256
    min_size: int = 800
    max_size: int = 1333
    epochs: int = 12
    batch_size: int = 2
    lr: float = 0.02
    momentum: float = 0.9
    weight_decay: float = 1e-4
    workers: int = 2
    amp: bool = False
    device: str = 'cuda' if torch.cuda.is_available() else 'cpu'
    val_images: Optional[str] = None
    val_annotations: Optional[str] = None
    resume: Optional[str] = None
    seed: int = 0


def coco_dataset(images: str, annotations: str, train: bool, masks: bool = False) -> Dataset:
    """A COCO instances dataset yielding (image float tensor, target dict of tv_tensors) pairs.

    Training drops images without annotations (nothing to learn from; torchvision's references do the same)
    and flips horizontally; boxes that end up degenerate are removed by SanitizeBoundingBoxes.
    """
    steps = [T.ToImage()]
    if train:
        steps.append(T.RandomHorizontalFlip())
    steps += [T.ToDtype(torch.float32, scale=True), T.SanitizeBoundingBoxes()]
    dataset = CocoDetection(images, annotations, transforms=T.Compose(steps))
    if train:
        dataset.ids = [i for i in dataset.ids if dataset.coco.getAnnIds(imgIds=i, iscrowd=False)]
    keys = ('boxes', 'labels', 'image_id') + (('masks',) if masks else ())
    wrapped = wrap_dataset_for_transforms_v2(dataset, target_keys=keys)
    wrapped.coco = dataset.coco  # the pycocotools index: category ids and COCOeval's ground truth
    return wrapped


def _collate(batch):
    return tuple(zip(*batch))


def _autocast(device: torch.device, enabled: bool):
    dtype = torch.float16 if device.type == 'cuda' else torch.bfloat16
    return torch.autocast(device.type, dtype=dtype, enabled=enabled)


@torch.no_grad()
def evaluate_coco(
        model: torch.nn.Module, dataset: Dataset, device: torch.device, amp: bool = False) -> Dict[str, float]:
    """COCO box AP and AP50 of `model` on a dataset from `coco_dataset(..., train=False)`."""
    from pycocotools.cocoeval import COCOeval

    model.eval()
    results: List[dict] = []
    for image, target in dataset:
        with _autocast(device, amp):
            detection = model([image.to(device)])[0]
        boxes = detection['boxes'].float().cpu()
        boxes[:, 2:] -= boxes[:, :2]  # xyxy -> COCO's xywh
        for box, score, label in zip(boxes.tolist(), detection['scores'].tolist(), detection['labels'].tolist()):
            results.append(dict(image_id=int(target['image_id']), category_id=label, bbox=box, score=score))
    if not results:
        return {'ap': 0.0, 'ap50': 0.0}
    coco = dataset.coco
    evaluator = COCOeval(coco, coco.loadRes(results), 'bbox')
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    return {'ap': float(evaluator.stats[0]), 'ap50': float(evaluator.stats[1])}


def train_detector(config: DetectionTrainConfig) -> Dict[str, float]:
    """Fine-tune a detector; returns the last epoch's mean loss (and validation AP when a val set is given)."""
    if config.detector not in BUILDERS:
        raise ValueError(f"detector must be one of {tuple(BUILDERS)}, got {config.detector!r}")
    torch.manual_seed(config.seed)
    device = torch.device(config.device)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)

    train_set = coco_dataset(config.images, config.annotations, train=True, masks=config.detector == 'maskrcnn')
    if len(train_set) == 0:
        raise ValueError(f"{config.annotations} has no annotated images; a detector needs boxes to train on")
    num_classes = max(train_set.coco.getCatIds()) + 1  # category ids as labels, 0 is background
    loader = DataLoader(
        train_set, batch_size=config.batch_size, shuffle=True, num_workers=config.workers,
        collate_fn=_collate, drop_last=len(train_set) > config.batch_size)

    model = BUILDERS[config.detector](
        config.backbone, num_classes=num_classes, pretrained_backbone=config.pretrained_backbone,
        trainable_stages=config.trainable_stages, out_channels=config.fpn_channels,
        min_size=config.min_size, max_size=config.max_size,
    ).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    total_steps = config.epochs * len(loader)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / total_steps)))
    scaler = torch.amp.GradScaler(device.type, enabled=config.amp and device.type == 'cuda')

    start_epoch = 0
    if config.resume:
        state = torch.load(config.resume, map_location=device, weights_only=False)
        model.load_state_dict(state['model'])
        optimizer.load_state_dict(state['optimizer'])
        scheduler.load_state_dict(state['scheduler'])
        scaler.load_state_dict(state['scaler'])
        start_epoch = state['epoch']
        print(f"resumed from {config.resume} after epoch {start_epoch}")

    summary: Dict[str, float] = {}
    for epoch in range(start_epoch, config.epochs):
        model.train()
        started, losses = time.perf_counter(), []
        for images, targets in loader:
            images = [image.to(device) for image in images]
            targets = [{k: v.to(device) if torch.is_tensor(v) else v for k, v in t.items()} for t in targets]
            with _autocast(device, config.amp):
                loss = sum(model(images, targets).values())
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"loss is {loss.item()} at epoch {epoch + 1}; lower --lr or check the annotations' boxes")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            losses.append(loss.item())
        summary = {'epoch': epoch + 1, 'loss': sum(losses) / len(losses)}
        print(f"epoch {epoch + 1}/{config.epochs}: loss {summary['loss']:.4f}, lr {scheduler.get_last_lr()[0]:.5f}, "
              f"{time.perf_counter() - started:.1f}s")
        torch.save(dict(
            model=model.state_dict(), optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
            scaler=scaler.state_dict(), epoch=epoch + 1, num_classes=num_classes, config=vars(config),
        ), out / 'last.pth')

    if config.val_images and config.val_annotations:
        val_set = coco_dataset(config.val_images, config.val_annotations, train=False)
        summary.update(evaluate_coco(model, val_set, device, config.amp))
        print(f"validation: box AP {summary['ap']:.4f}, AP50 {summary['ap50']:.4f}")
    return summary

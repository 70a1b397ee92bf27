""" Minimal COCO-format fine-tuning of the zoo's detectors: an image folder plus an instances JSON.

Data comes through torchvision.datasets.CocoDetection wrapped for transforms v2 (tv_tensors boxes and masks),
training runs SGD with momentum and a per-step cosine schedule (the optimizer and scheduler factories of
`bam_models.train.build`) and optional autocast (`bam_models.runs.autocast_for`: float16 + GradScaler on CUDA,
bfloat16 on CPU), a checkpoint is written after every epoch and can be resumed, and a validation set is scored
with pycocotools' COCOeval. Arguments are checked with the range rules of the training config
(`bam_models.train.config`). Run folders, checkpoints and resume follow `bam-models train`'s rules
(`bam_models.runs`): a folder that holds a run is refused unless the run resumes it or overwrites it, the
folder is locked while the run lasts, last.pth is written atomically and read back with weights_only=True, and
a resume with other arguments than the run's is refused, listing them (only where files are, the device and
the loader processes may change).
"""
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.datasets import CocoDetection, wrap_dataset_for_transforms_v2
from torchvision.transforms import v2 as T

from bam_models.detection.backbones import NUM_STAGES, fasterrcnn_fpn, maskrcnn_fpn, retinanet_fpn
from bam_models.errors import NonFiniteLossError, UsageError
from bam_models.runs import Checkpointer, RunFolderLock, autocast_for, prepare_run_folder, read_resume, resolve_resume
from bam_models.train.build import build_optimizer, build_scheduler
from bam_models.train.config import NON_EMPTY, POSITIVE_INT, OptimConfig, Range, ScheduleConfig, check_constraint

__all__ = ['DetectionTrainConfig', 'coco_dataset', 'train_detector', 'evaluate_coco']

BUILDERS = {'fasterrcnn': fasterrcnn_fpn, 'maskrcnn': maskrcnn_fpn, 'retinanet': retinanet_fpn}
CHECKPOINT_KEYS = ('model', 'optimizer', 'scheduler', 'scaler', 'epoch', 'config')
# arguments that may differ on resume, as train's RESUME_FREE_KEYS: where the output goes, the device, loader
# processes, the validation set scored after training, and the run controls themselves
RESUME_FREE_ARGS = ('out', 'resume', 'overwrite', 'workers', 'device', 'val_images', 'val_annotations')
# the rule of every argument: the training config's key of the same meaning, or a rule of its own
ARGUMENT_RULES = {
    'backbone': NON_EMPTY, 'detector': tuple(BUILDERS), 'trainable_stages': Range(0, NUM_STAGES + 1),
    'fpn_channels': POSITIVE_INT, 'min_size': POSITIVE_INT, 'max_size': POSITIVE_INT,
    'epochs': 'schedule.epochs', 'batch_size': 'data.batch_size', 'lr': 'optim.lr', 'momentum': 'optim.momentum',
    'weight_decay': 'optim.weight_decay', 'workers': 'data.workers', 'device': 'train.device', 'seed': 'train.seed',
}


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
    overwrite: bool = False
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


def _amp_mode(amp: bool) -> str:
    return 'auto' if amp else 'none'  # float16 on CUDA, bfloat16 elsewhere


@torch.no_grad()
def evaluate_coco(
        model: torch.nn.Module, dataset: Dataset, device: torch.device, amp: bool = False) -> Dict[str, float]:
    """COCO box AP and AP50 of `model` on a dataset from `coco_dataset(..., train=False)`."""
    from pycocotools.cocoeval import COCOeval

    model.eval()
    results: List[dict] = []
    for image, target in dataset:
        with autocast_for(device, _amp_mode(amp)):
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


def _check_inputs(config: DetectionTrainConfig) -> None:
    for name, rule in ARGUMENT_RULES.items():
        key = rule if isinstance(rule, str) else name
        check_constraint(key, getattr(config, name), None if isinstance(rule, str) else rule,
                         flag=f"--{name.replace('_', '-')}")
    for what, path, is_file in (('--images', config.images, False), ('--annotations', config.annotations, True),
                                ('--val-images', config.val_images, False),
                                ('--val-annotations', config.val_annotations, True)):
        if path and not (os.path.isfile(path) if is_file else os.path.isdir(path)):
            expected = 'COCO instances JSON' if is_file else 'image folder'
            raise UsageError(f"{what} {path} does not exist; pass the {expected}")


def _build(config: DetectionTrainConfig, device: torch.device) -> Tuple[Any, DataLoader, int, Dict[str, Any]]:
    """The data, the detector and its optimizer, cosine schedule and AMP scaler."""
    train_set = coco_dataset(config.images, config.annotations, train=True, masks=config.detector == 'maskrcnn')
    if len(train_set) == 0:
        raise UsageError(f"{config.annotations} has no annotated images; a detector needs boxes to train on")
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
    # 'momentum' is plain SGD with momentum, as torchvision's detection references train ('sgd' is Nesterov's)
    optimizer = build_optimizer(params, OptimConfig(
        opt='momentum', lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay))
    scheduler = build_scheduler(optimizer, ScheduleConfig(sched='cosine', epochs=config.epochs), len(loader))
    scaler = torch.amp.GradScaler(device.type, enabled=config.amp and device.type == 'cuda')
    return model, loader, num_classes, dict(model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler)


def _read_resume(config: DetectionTrainConfig, resume: str) -> Dict[str, Any]:
    """The checkpoint to continue from, refused before any work when it was written with other arguments
    (RESUME_FREE_ARGS excepted)."""
    return read_resume(resume, CHECKPOINT_KEYS, vars(config), RESUME_FREE_ARGS,
                       "start a new run with another --out")


def _train_epoch(config, objects, loader, device, epoch: int, checkpointer: Checkpointer) -> float:
    model, optimizer, scheduler, scaler = (objects[k] for k in ('model', 'optimizer', 'scheduler', 'scaler'))
    model.train()
    losses = []
    for step, (images, targets) in enumerate(loader):
        images = [image.to(device) for image in images]
        targets = [{k: v.to(device) if torch.is_tensor(v) else v for k, v in t.items()} for t in targets]
        with autocast_for(device, _amp_mode(config.amp)):
            loss = sum(model(images, targets).values())
        if not torch.isfinite(loss):
            raise NonFiniteLossError(
                f"loss is {loss.item()} at epoch {epoch + 1}; stopped without saving, {checkpointer.describe_last()}; "
                f"lower --lr or check the annotations' boxes")
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step_update(epoch * len(loader) + step + 1)
        losses.append(loss.item())
    return sum(losses) / len(losses)


def train_detector(config: DetectionTrainConfig) -> Dict[str, float]:
    """Fine-tune a detector; returns the last epoch's mean loss (and validation AP when a val set is given)."""
    _check_inputs(config)
    out = Path(config.out)
    resume = resolve_resume(config.resume, out)  # 'auto': OUT/last.pth where there is one, else a new run
    resumed = _read_resume(config, resume) if resume else None
    torch.manual_seed(config.seed)
    auto_device = 'cuda' if torch.cuda.is_available() else 'cpu'
    device = torch.device(auto_device if config.device == 'auto' else config.device)
    summary: Dict[str, float] = {}
    with RunFolderLock(out):
        prepare_run_folder(out, resume=resume is not None, overwrite=config.overwrite)
        model, loader, num_classes, objects = _build(config, device)
        checkpointer = Checkpointer(out, objects)
        start_epoch = 0
        if resumed is not None:
            checkpointer.restore(resumed, resume, 'model', model)
            start_epoch = resumed['epoch']
            print(f"resumed from {resume} after epoch {start_epoch}")
        for epoch in range(start_epoch, config.epochs):
            started = time.perf_counter()
            summary = {'epoch': epoch + 1, 'loss': _train_epoch(config, objects, loader, device, epoch, checkpointer)}
            print(f"epoch {epoch + 1}/{config.epochs}: loss {summary['loss']:.4f}, "
                  f"lr {objects['optimizer'].param_groups[0]['lr']:.5f}, {time.perf_counter() - started:.1f}s")
            checkpointer.save_last(checkpointer.state(epoch=epoch + 1, num_classes=num_classes, config=vars(config)))
    if config.val_images and config.val_annotations:
        val_set = coco_dataset(config.val_images, config.val_annotations, train=False)
        summary.update(evaluate_coco(model, val_set, device, config.amp))
        print(f"validation: box AP {summary['ap']:.4f}, AP50 {summary['ap50']:.4f}")
    return summary

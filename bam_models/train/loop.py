""" Training and fine-tuning on timm's factories: data transforms, optimizers, schedulers, mixup, EMA, losses.

`train(config)` runs one job described by a `RunConfig` on one process or under torchrun (DDP), writes
`last.pth` / `best.pth` (atomically, every epoch), `log.jsonl`, `summary.json`, and exports the best weights
in Hub format to `OUTPUT/hub` (loadable with `timm.create_model('local-dir:OUTPUT/hub')`).

It reads as timm's train.py does: `check_config` (before any work), `build_run` (device, model, data,
optimizer, scheduler, EMA, criterion), `train_one_epoch`, `evaluate`, a `Checkpointer` (atomic saves, RNG
state, resume, the Ctrl-C save; see `checkpointer.py`) and `export_best`. Epochs are numbered from 1
everywhere: the console, `log.jsonl`, `summary.json`, `best.pth` and the model card.
"""
import json
import os
import random
import signal
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Set, Tuple

import numpy as np
import timm
import torch
import torch.distributed as dist
import torch.nn as nn
from timm.data import Mixup, resolve_data_config
from timm.layers import freeze_batch_norm_2d
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.models import get_arch_pretrained_cfgs, split_model_name_tag
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3, NativeScaler, accuracy, dispatch_clip_grad
from timm.utils.distributed import init_distributed_device_so
from tqdm import tqdm

import bam_models  # noqa: F401  registers the zoo with timm
from bam_models.checkpoint import describe_mismatch, key_mismatch, load_strict, read_state_dict
from bam_models.errors import CheckpointError, NonFiniteLossError
from bam_models.hub import attention_keys, check_model_name, save_pretrained
from bam_models.train.checkpointer import (
    BEST, LAST, Checkpointer, RunFolderLock, config_changes, prepare_run_folder, read_run_checkpoint, set_rng_state)
from bam_models.train.config import ConfigError, RunConfig, flat_items
from bam_models.train.data import (
    DIGITS, build_dataset, cifar_classes, cifar_folder, create_train_eval_loaders, dataset_classes,
    shared_class_to_idx)

# config keys that may differ on resume: they change where and how visibly a run runs, not what it computes
RESUME_FREE_KEYS = ('train.output', 'train.device', 'train.progress', 'train.export', 'data.workers',
                    'data.eval_batch_size')
RUN_STATE_KEYS = ('state_dict', 'optimizer', 'epoch', 'step_in_epoch', 'best', 'rng', 'config')


# ---------------------------------------------------------------------------------------------- checks

def _check_model_name(name: str) -> None:
    check_model_name(name, where=' in model.name', error=ConfigError)


def data_classes(cfg: RunConfig) -> List[str]:
    """Class names in label order, as the reader that labels the training data numbers them."""
    data = cfg.data
    if data.dataset == DIGITS:
        return [str(c) for c in range(10)]
    if cifar_folder(data.dataset):
        return cifar_classes(data.dataset)
    if not os.path.isdir(data.dataset):
        raise ConfigError(f"data folder {data.dataset} does not exist; set data.dataset to a folder with "
                          f"train/ and val/ sub-folders of class folders, or to 'digits'")
    class_to_idx = shared_class_to_idx(data.dataset, data.train_split, data.val_split)
    return sorted(class_to_idx, key=class_to_idx.get)


def _wants_cuda(device: str) -> bool:
    return device.startswith('cuda') or (device == 'auto' and torch.cuda.is_available())


def check_config(cfg: RunConfig) -> List[str]:
    """Rejects a configuration that cannot run, before any work; returns the class names of the data."""
    _check_model_name(cfg.model.name)
    if cfg.model.checkpoint and not os.path.isfile(cfg.model.checkpoint):
        raise ConfigError(f"model.checkpoint {cfg.model.checkpoint} does not exist")
    classes = data_classes(cfg)
    if cfg.model.num_classes is not None and cfg.model.num_classes != len(classes):
        raise ConfigError(f"model.num_classes is {cfg.model.num_classes} but the data has {len(classes)} classes; "
                          f"set model.num_classes={len(classes)} or leave it null")
    if cfg.train.amp == 'fp16' and not _wants_cuda(cfg.train.device):
        raise ConfigError("train.amp 'fp16' needs a CUDA device; use train.amp=bf16 on CPU")
    if cfg.model.sync_bn and not _wants_cuda(cfg.train.device):
        raise ConfigError("model.sync_bn needs CUDA devices (torch's SyncBatchNorm is GPU-only); on CPU use "
                          "model.sync_bn=false, or model.freeze=bn to take batch statistics out of training")
    return classes


# ---------------------------------------------------------------------------------------------- model

def build_model(cfg: RunConfig, num_classes: int) -> nn.Module:
    model = timm.create_model(
        cfg.model.name, pretrained=cfg.model.pretrained, num_classes=num_classes,
        drop_rate=cfg.model.drop_rate, drop_path_rate=cfg.model.drop_path_rate)
    if cfg.model.checkpoint:
        load_start_weights(model, cfg.model.checkpoint)
    if cfg.model.freeze == 'bn':
        model = freeze_batch_norm_2d(model)
    elif cfg.model.freeze == 'trunk':
        freeze_trunk(model)
    if cfg.model.grad_checkpointing:
        model.set_grad_checkpointing(True)
    return model


def load_start_weights(model: nn.Module, path: str) -> None:
    """Loads weights to fine-tune from (read safely); a classifier of another class count keeps its fresh init."""
    load_strict(model, read_state_dict(path, what='model.checkpoint'), f'model.checkpoint {path}',
                'pass weights of this architecture', keep_fresh_head=True, error=ConfigError)


def attention_parameter_names(model: nn.Module) -> Set[str]:
    """Parameters of the BAM/CBAM modules (by module type, so timm's own SE blocks are trunk)."""
    return set(attention_keys(model)) & {name for name, _ in model.named_parameters()}


def freeze_trunk(model: nn.Module) -> None:
    """Trains only the attention modules and the classifier: the rest stops learning, its BN stats frozen."""
    classifier = model.pretrained_cfg.get('classifier', 'fc')
    attention_state = set(attention_keys(model))
    for name, param in model.named_parameters():
        if name not in attention_state and not name.startswith(classifier + '.'):
            param.requires_grad_(False)
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and f'{name}.running_var' not in attention_state:
            model.set_submodule(name, freeze_batch_norm_2d(module))


def param_groups(model: nn.Module, weight_decay: float, attention_lr_scale: float,
                 no_decay_bias_and_norm: bool) -> List[Dict[str, Any]]:
    """Groups by (attention or trunk) x (decayed or not); timm's schedulers honour each group's lr_scale."""
    attention = attention_parameter_names(model)
    groups: Dict[Tuple[bool, bool], List[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        decay = not (no_decay_bias_and_norm and (param.ndim <= 1 or name.endswith('.bias')))
        groups.setdefault((name in attention, decay), []).append(param)
    return [dict(params=params, weight_decay=weight_decay if decay else 0.0,
                 lr_scale=attention_lr_scale if is_attention else 1.0,
                 group_name=f"{'attention' if is_attention else 'trunk'}{'' if decay else '_no_decay'}")
            for (is_attention, decay), params in sorted(groups.items())]


def base_weights(cfg: RunConfig) -> Optional[str]:
    """What a run starts from, for its model card: the model.checkpoint file, else the pretrained tag
    (`arch.tag`, timm's default tag when none is named), None when trained from scratch."""
    if cfg.model.checkpoint:
        return cfg.model.checkpoint
    if not cfg.model.pretrained:
        return None
    arch, tag = split_model_name_tag(cfg.model.name)
    if tag:
        return f'{arch}.{tag}'
    return next(iter(get_arch_pretrained_cfgs(arch)), arch)  # the name timm resolves first, tag included


# ---------------------------------------------------------------------------------------------- the run

@dataclass
class Run:
    """Everything one training job is made of, built once by `build_run`."""
    cfg: RunConfig
    classes: List[str]
    device: torch.device
    rank: int
    world: int
    distributed: bool
    model: nn.Module
    train_model: nn.Module  # the DDP wrapper under torchrun, else the model
    data_config: Dict[str, Any]
    train_loader: torch.utils.data.DataLoader
    val_loader: torch.utils.data.DataLoader
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: Optional[NativeScaler]
    ema: Optional[ModelEmaV3]
    mixup: Optional[Mixup]
    criterion: nn.Module
    autocast: Callable[[], Any]

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def steps_per_epoch(self) -> int:
        return len(self.train_loader)

    @property
    def eval_model(self) -> nn.Module:
        return self.ema.module if self.ema is not None else self.model


def _init_device(cfg: RunConfig) -> Tuple[torch.device, int, int, bool]:
    device_name = cfg.train.device
    if device_name == 'auto':
        device_name = 'cuda' if torch.cuda.is_available() else 'cpu'
    env = init_distributed_device_so(device=device_name)
    return torch.device(env['device']), env['global_rank'], env['world_size'], env['distributed']


def _build_data(cfg: RunConfig, model: nn.Module, classes: List[str], device: torch.device, rank: int, world: int):
    data_config = resolve_data_config(dict(
        input_size=(3, cfg.data.input_size, cfg.data.input_size) if cfg.data.input_size else None,
        interpolation=cfg.data.interpolation, crop_pct=cfg.data.crop_pct,
        mean=tuple(cfg.data.mean) if cfg.data.mean else None, std=tuple(cfg.data.std) if cfg.data.std else None),
        model=model)
    splits = cfg.data.dataset, cfg.data.train_split, cfg.data.val_split
    class_to_idx = {name: index for index, name in enumerate(classes)}
    train_set = build_dataset(splits[0], 'train', *splits[1:], class_to_idx=class_to_idx)
    val_set = build_dataset(splits[0], 'val', *splits[1:], class_to_idx=class_to_idx)
    if dataset_classes(train_set) != classes:  # the labels the model learns are the names it exports
        raise ConfigError("the training data's classes changed while the run started; start it again")
    train_loader, val_loader = create_train_eval_loaders(
        train_set, val_set, data_config, cfg.data, num_replicas=world, rank=rank, seed=cfg.train.seed,
        pin_memory=device.type == 'cuda')
    if len(train_loader) == 0:
        raise ConfigError(f"{len(train_set)} training images make no full batch of {cfg.data.batch_size} x "
                          f"{world} processes; lower data.batch_size")
    return data_config, train_loader, val_loader


def _build_optimization(cfg: RunConfig, model: nn.Module, steps_per_epoch: int):
    optimizer = create_optimizer_v2(
        param_groups(model, cfg.optim.weight_decay, cfg.optim.attention_lr_scale, cfg.optim.no_decay_bias_and_norm),
        opt=cfg.optim.opt, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay, momentum=cfg.optim.momentum)
    scheduler = None
    if cfg.schedule.sched != 'none':
        scheduler, _ = create_scheduler_v2(
            optimizer, sched=cfg.schedule.sched, num_epochs=cfg.schedule.epochs,
            decay_epochs=cfg.schedule.decay_epochs, decay_rate=cfg.schedule.decay_rate, min_lr=cfg.schedule.min_lr,
            decay_milestones=[int(m) for m in cfg.schedule.decay_milestones],
            warmup_lr=cfg.schedule.warmup_lr, warmup_epochs=cfg.schedule.warmup_epochs,
            step_on_epochs=False, updates_per_epoch=steps_per_epoch)
    return optimizer, scheduler


def build_criterion(cfg: RunConfig, num_classes: int) -> Tuple[Optional[Mixup], nn.Module]:
    """Mixup/CutMix with a soft-target loss, or label smoothing, or plain cross-entropy."""
    t = cfg.train
    if t.mixup > 0 or t.cutmix > 0:
        mixup = Mixup(mixup_alpha=t.mixup, cutmix_alpha=t.cutmix, prob=t.mixup_prob, switch_prob=t.mixup_switch_prob,
                      label_smoothing=t.label_smoothing, num_classes=num_classes)
        return mixup, SoftTargetCrossEntropy()
    if t.label_smoothing > 0:
        return None, LabelSmoothingCrossEntropy(smoothing=t.label_smoothing)
    return None, nn.CrossEntropyLoss()


def _autocast_factory(device: torch.device, amp: str):
    if amp == 'none':
        return nullcontext
    dtype = torch.bfloat16 if amp == 'bf16' else torch.float16
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)


def build_run(cfg: RunConfig, classes: List[str]) -> Run:
    """Device (and DDP), model, data, optimizer, scheduler, AMP scaler, EMA and criterion of one job."""
    device, rank, world, distributed = _init_device(cfg)
    seed_epoch(cfg.train.seed, 0, rank)
    num_classes = cfg.model.num_classes or len(classes)
    model = build_model(cfg, num_classes)
    data_config, train_loader, val_loader = _build_data(cfg, model, classes, device, rank, world)
    model.to(device)
    if cfg.model.channels_last:
        model.to(memory_format=torch.channels_last)
    if distributed and cfg.model.sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    optimizer, scheduler = _build_optimization(cfg, model, len(train_loader))
    mixup, criterion = build_criterion(cfg, num_classes)
    train_model = nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == 'cuda' else None) if distributed else model
    return Run(
        cfg=cfg, classes=classes, device=device, rank=rank, world=world, distributed=distributed, model=model,
        train_model=train_model, data_config=data_config, train_loader=train_loader, val_loader=val_loader,
        optimizer=optimizer, scheduler=scheduler,
        scaler=NativeScaler(device=device.type) if cfg.train.amp == 'fp16' else None,
        ema=ModelEmaV3(model, decay=cfg.train.ema_decay) if cfg.train.ema else None,
        mixup=mixup, criterion=criterion, autocast=_autocast_factory(device, cfg.train.amp))


# ---------------------------------------------------------------------------------------------- epochs

def seed_epoch(seed: int, epoch: int, rank: int) -> None:
    """Every epoch starts from RNG states that depend only on (seed, epoch, rank), so a resumed epoch replays."""
    epoch_seed = (seed * 1_000_003 + epoch * 1009 + rank) % (2 ** 31)
    random.seed(epoch_seed)
    np.random.seed(epoch_seed)
    torch.manual_seed(epoch_seed)


class StopRequest:
    """Turns the first Ctrl-C (SIGINT) into a flag the training loop checks after each step."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc):
        signal.signal(signal.SIGINT, self._previous)


def _reduce(values: List[float], device, distributed: bool) -> List[float]:
    if not distributed:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


@dataclass
class EpochResult:
    loss: float  # mean over every process
    top1: float
    seen: float
    seconds: float
    step: int  # steps of this epoch done
    stopped: bool  # Ctrl-C: the epoch ended early at `step`


def _check_step(run: Run, loss: torch.Tensor, stop: StopRequest, epoch: int, step: int,
                checkpointer: Checkpointer) -> bool:
    """Raises on a non-finite loss; returns whether to stop. Under DDP every process decides together."""
    finite, stop_now = bool(torch.isfinite(loss).all()), stop.requested
    if run.distributed:
        flags = torch.tensor([float(not finite), float(stop_now)], device=run.device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        finite, stop_now = not flags[0].item(), bool(flags[1].item())
    if not finite:
        raise NonFiniteLossError(
            f"loss is not finite ({loss.item()}) at epoch {epoch + 1}, step {step + 1} of {run.steps_per_epoch}; "
            f"stopped without saving, {checkpointer.describe_last()}; lower optim.lr, set optim.clip_grad, or use "
            f"train.amp=none")
    return stop_now


def _optimizer_step(run: Run, loss: torch.Tensor) -> None:
    optim = run.cfg.optim
    run.optimizer.zero_grad(set_to_none=True)
    params = [p for p in run.model.parameters() if p.requires_grad]
    if run.scaler is not None:
        run.scaler(loss, run.optimizer, clip_grad=optim.clip_grad, clip_mode=optim.clip_mode, parameters=params)
        return
    loss.backward()
    if optim.clip_grad is not None:
        dispatch_clip_grad(params, optim.clip_grad, mode=optim.clip_mode)
    run.optimizer.step()


def train_one_epoch(run: Run, epoch: int, skip_steps: int, resume_rng: Optional[Dict[str, Any]],
                    stop: StopRequest, checkpointer: Checkpointer) -> EpochResult:
    """One epoch (0-based `epoch`) from step `skip_steps`, with the RNG of a resumed step restored."""
    cfg, steps = run.cfg, run.steps_per_epoch
    seed_epoch(cfg.train.seed, epoch, run.rank)
    sampler = run.train_loader.sampler
    sampler.set_epoch(epoch)
    sampler.skip = skip_steps * cfg.data.batch_size
    batches = iter(run.train_loader)  # creating it draws the loader's base seed from the epoch's RNG
    if skip_steps and resume_rng is not None:
        set_rng_state(resume_rng)  # the RNG exactly as it was after the last finished step
    if run.scheduler is not None:
        run.scheduler.step_update(epoch * steps + skip_steps)
    run.train_model.train()
    loss_sum = correct = seen = 0.0
    started, step, stop_now = time.perf_counter(), skip_steps, False
    bar = tqdm(batches, desc=f'epoch {epoch + 1}/{cfg.schedule.epochs}', initial=skip_steps, total=steps,
               disable=not (run.is_main and cfg.train.progress), dynamic_ncols=True)
    for images, targets in bar:
        images, targets = images.to(run.device, non_blocking=True), targets.to(run.device, non_blocking=True)
        if cfg.model.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        hard_targets = targets
        if run.mixup is not None:
            images, targets = run.mixup(images, targets)
        with run.autocast():
            logits = run.train_model(images)
            loss = run.criterion(logits, targets)
        stop_now = _check_step(run, loss, stop, epoch, step, checkpointer)
        _optimizer_step(run, loss)
        step += 1
        if run.ema is not None:
            run.ema.update(run.model, step=epoch * steps + step)
        if run.scheduler is not None:
            run.scheduler.step_update(epoch * steps + step)
        loss_sum += loss.item() * hard_targets.numel()
        correct += (logits.argmax(-1) == hard_targets).sum().item()
        seen += hard_targets.numel()
        bar.set_postfix(loss=f'{loss_sum / seen:.4f}', acc=f'{100 * correct / seen:.1f}',
                        lr=f"{run.optimizer.param_groups[0]['lr']:.2e}",
                        img_s=f'{seen * run.world / (time.perf_counter() - started):.0f}', refresh=False)
        if stop_now:
            break
    bar.close()
    if stop_now:
        return EpochResult(0.0, 0.0, 0.0, 0.0, step, stopped=True)
    loss_sum, correct, seen = _reduce([loss_sum, correct, seen], run.device, run.distributed)
    return EpochResult(loss_sum / seen, 100 * correct / seen, seen, time.perf_counter() - started, step, stopped=False)


@torch.no_grad()
def evaluate(model: nn.Module, loader, device, autocast, *, channels_last: bool = False,
             distributed: bool = False) -> Dict[str, float]:
    """Exact top-1/top-5/loss over the whole set (every process evaluates its own share, then sums)."""
    model.eval()
    criterion = nn.CrossEntropyLoss(reduction='sum')
    loss_sum = top1_sum = top5_sum = count = 0.0
    for images, targets in loader:
        images, targets = images.to(device), targets.to(device)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast():
            logits = model(images)
        logits = logits.float()
        top1, top5 = accuracy(logits, targets, topk=(1, min(5, logits.shape[1])))
        loss_sum += criterion(logits, targets).item()
        top1_sum += top1.item() * targets.numel() / 100
        top5_sum += top5.item() * targets.numel() / 100
        count += targets.numel()
    loss_sum, top1_sum, top5_sum, count = _reduce([loss_sum, top1_sum, top5_sum, count], device, distributed)
    return dict(loss=loss_sum / count, top1=100 * top1_sum / count, top5=100 * top5_sum / count, count=int(count))


# ---------------------------------------------------------------------------------------------- export

def export_best(model: nn.Module, out_dir: str, metrics: Dict[str, Any], data_config: Dict[str, Any],
                label_names: Optional[List[str]] = None, base: Optional[str] = None) -> Path:
    """Writes the best weights as a Hub folder (model.safetensors, config.json in timm's format, model card)
    that `timm.create_model('local-dir:...')` loads and `bam-models publish` uploads; `base` is what the run
    started from (`base_weights`), None for a run trained from scratch."""
    arch = model.pretrained_cfg.get('architecture')
    how = f'fine-tuned from {base}' if base else 'trained from scratch'
    save_pretrained(
        model, out_dir,
        metrics=[dict(dataset=metrics['dataset'], split='val', top1=metrics['top1'],
                      top5=metrics.get('top5'), input_size=data_config['input_size'][-1],
                      measured_by='this project', reference=f"bam-models train, best of epoch {metrics['epoch']}")],
        description=f"{arch} {how} with `bam-models train`.",
        data_config=data_config,
        model_config=dict(label_names=list(label_names)) if label_names else None,
        base_weights=base,
    )
    return Path(out_dir)


def _export_run(run: Run, output: Path, best: Dict[str, Any]) -> Path:
    """The best.pth weights in a fresh model (no frozen BN, no DDP/EMA wrappers), exported to OUTPUT/hub."""
    cfg = run.cfg
    state = read_state_dict(output / BEST, what='best.pth')
    model = timm.create_model(cfg.model.name, num_classes=cfg.model.num_classes or len(run.classes))
    # frozen BN (model.freeze) keeps no num_batches_tracked; everything else must match
    mismatch = key_mismatch(state, model, ignore=[k for k in model.state_dict() if k.endswith('num_batches_tracked')])
    if mismatch:
        raise CheckpointError(f"{output / BEST} does not fit {cfg.model.name}: {describe_mismatch(mismatch)}; "
                              f"the run wrote another model than its config names")
    model.load_state_dict(state, strict=False)
    metrics = dict(dataset=cfg.data.dataset, epoch=best['epoch'], top1=round(best['top1'], 3),
                   top5=round(best['top5'], 3))
    return export_best(model, str(output / 'hub'), metrics, run.data_config, label_names=run.classes,
                       base=base_weights(cfg))


# ---------------------------------------------------------------------------------------------- orchestration

def read_resume(cfg: RunConfig, path: str) -> Dict[str, Any]:
    """The run checkpoint to continue from; a config that differs from the one it was written with is refused
    (only the keys in RESUME_FREE_KEYS may change), so what the run records is what it ran."""
    state = read_run_checkpoint(path, RUN_STATE_KEYS)
    changes = config_changes(flat_items(state['config']), flat_items(cfg.to_dict()), RESUME_FREE_KEYS)
    if changes:
        raise ConfigError(
            f"--resume {path} was written with another config, {len(changes)} keys differ ({'; '.join(changes[:6])}"
            f"{'; ...' if len(changes) > 6 else ''}); resume with the run's own config, or start a new run from its "
            f"weights with model.checkpoint={path} in another train.output")
    return state


def _open_log(output: Path, finished_epochs: int, resumed: bool, is_main: bool) -> List[Dict[str, Any]]:
    """The history so far; a resumed run drops the lines of epochs about to run again."""
    if not is_main:
        return []
    output.mkdir(parents=True, exist_ok=True)
    log_path = output / 'log.jsonl'
    kept = []
    if resumed and log_path.exists():
        kept = [line for line in log_path.read_text().splitlines() if json.loads(line)['epoch'] <= finished_epochs]
    log_path.write_text(''.join(line + '\n' for line in kept))
    return [json.loads(line) for line in kept]


def _end_epoch(run: Run, checkpointer: Checkpointer, epoch: int, result: EpochResult,
               best: Optional[Dict[str, Any]], history: List[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
    """Validation, best.pth (when better), last.pth and the log line of a finished epoch; returns the best."""
    cfg, number = run.cfg, epoch + 1
    metrics = evaluate(run.eval_model, run.val_loader, run.device, run.autocast,
                       channels_last=cfg.model.channels_last, distributed=run.distributed)
    is_best = best is None or metrics['top1'] > best['top1']
    record = dict(epoch=number, train_loss=result.loss, train_top1=result.top1,
                  lr=run.optimizer.param_groups[0]['lr'], val_loss=metrics['loss'], val_top1=metrics['top1'],
                  val_top5=metrics['top5'], val_images=metrics['count'], img_per_s=result.seen / result.seconds,
                  epoch_time_s=result.seconds)
    if is_best:
        best = dict(epoch=number, top1=metrics['top1'], top5=metrics['top5'], loss=metrics['loss'])
    state = checkpointer.state(epoch=number, step_in_epoch=0, best=best, config=cfg.to_dict())
    if is_best:  # best before last: a kill in between re-runs this epoch and rewrites both
        checkpointer.save_file(dict(state_dict=run.eval_model.state_dict(), epoch=number, metrics=best,
                                    config=cfg.to_dict(), classes=run.classes, data_config=run.data_config), BEST)
    checkpointer.save_last(state)
    if run.is_main:
        with open(checkpointer.output / 'log.jsonl', 'a') as f:
            f.write(json.dumps(record) + '\n')
        history.append(record)
        if cfg.train.progress:
            tqdm.write(f"epoch {number}: train loss {record['train_loss']:.4f}, val top-1 {metrics['top1']:.2f} "
                       f"top-5 {metrics['top5']:.2f} loss {metrics['loss']:.4f}{' (best)' if is_best else ''}")
    return best


def _fit(run: Run, checkpointer: Checkpointer, resumed: Optional[Dict[str, Any]],
         history: List[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
    """The epochs from where the run stands to the last; Ctrl-C saves the very step and re-raises."""
    start_epoch, start_step, best, resume_rng = 0, 0, None, None
    if resumed is not None:
        start_epoch, start_step, best = resumed['epoch'], resumed['step_in_epoch'], resumed['best']
        resume_rng = resumed['rng'][run.rank] if run.rank < len(resumed['rng']) else None
    with StopRequest() as stop:
        for epoch in range(start_epoch, run.cfg.schedule.epochs):
            first = epoch == start_epoch
            result = train_one_epoch(run, epoch, start_step if first else 0, resume_rng if first else None, stop,
                                     checkpointer)
            if result.stopped:
                checkpointer.save_interrupted(checkpointer.state(
                    epoch=epoch, step_in_epoch=result.step, best=best, config=run.cfg.to_dict()), epoch, result.step)
                raise KeyboardInterrupt
            best = _end_epoch(run, checkpointer, epoch, result, best, history)
    return best


def train(cfg: RunConfig, resume: Optional[str] = None, overwrite: bool = False) -> Dict[str, Any]:
    """Runs the job; returns the summary (also written to OUTPUT/summary.json on rank 0).

    `resume` is a last.pth to continue from ('auto': OUTPUT/last.pth); a folder that already holds a run is
    refused unless the run resumes it or `overwrite` replaces it; the folder is locked while the run lasts.
    """
    classes = check_config(cfg)
    output = Path(cfg.train.output)
    resume = str(output / LAST) if resume == 'auto' else resume
    resumed = read_resume(cfg, resume) if resume else None
    is_main = int(os.environ.get('RANK', '0')) == 0  # before torch.distributed starts: only rank 0 owns the folder
    started = time.perf_counter()
    with RunFolderLock(output) if is_main else nullcontext():
        if is_main:  # under the lock: --overwrite never deletes the files of a run that is still going
            prepare_run_folder(output, resume=resume is not None, overwrite=overwrite)
        run = build_run(cfg, classes)
        checkpointer = Checkpointer(output, dict(
            state_dict=run.model, optimizer=run.optimizer, scheduler=run.scheduler, state_dict_ema=run.ema,
            scaler=run.scaler), is_main=run.is_main, distributed=run.distributed, world=run.world)
        if resumed is not None:
            checkpointer.restore(resumed, resume, 'state_dict', run.model)
        history = _open_log(output, resumed['epoch'] if resumed else 0, resumed is not None, run.is_main)
        best = _fit(run, checkpointer, resumed, history)
        summary = dict(model=cfg.model.name, base_weights=base_weights(cfg), epochs=cfg.schedule.epochs, best=best,
                       final=history[-1] if history else None, train_time_s=time.perf_counter() - started,
                       processes=run.world, output=str(output))
        if run.is_main:
            if cfg.train.export and best is not None:
                summary['hub_dir'] = str(_export_run(run, output, best))
            (output / 'summary.json').write_text(json.dumps(summary, indent=2) + '\n')
    if run.distributed:
        dist.barrier()
    return summary

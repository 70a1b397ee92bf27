""" Training and fine-tuning on timm's factories: data transforms, optimizers, schedulers, mixup, EMA, losses.

`train(config)` runs one job described by a `RunConfig` on one process or under torchrun (DDP), writes
`last.pth` / `best.pth` (atomically, every epoch), `log.jsonl`, `summary.json`, and exports the best weights
in Hub format to `OUTPUT/hub` (loadable with `timm.create_model('local-dir:OUTPUT/hub')`).
"""
import difflib
import json
import math
import os
import random
import signal
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import timm
import torch
import torch.distributed as dist
import torch.nn as nn
from timm.data import Mixup, resolve_data_config
from timm.data.dataset_factory import _search_split
from timm.layers import freeze_batch_norm_2d
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.models import get_arch_pretrained_cfgs, load_state_dict, split_model_name_tag
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3, NativeScaler, accuracy, dispatch_clip_grad
from timm.utils.distributed import init_distributed_device_so
from tqdm import tqdm

import bam_models  # noqa: F401  registers the zoo with timm
from bam_models.errors import NonFiniteLossError
from bam_models.hub import save_pretrained
from bam_models.train.config import ConfigError, RunConfig
from bam_models.train.data import (
    DIGITS, build_dataset, cifar_classes, cifar_folder, create_train_eval_loaders, dataset_classes, folder_classes)

ATTENTION_MARKERS = ('.bam.', '.se.')
LAST, BEST = 'last.pth', 'best.pth'


def is_attention_param(name: str) -> bool:
    """BAM modules sit at `layer{1,2,3}.bam` / `blocks.{i}.bam`, CBAM in the block attention slot `.se`."""
    return any(marker in f'.{name}' for marker in ATTENTION_MARKERS)


# ---------------------------------------------------------------------------------------------- checks

def check_config(cfg: RunConfig) -> List[str]:
    """Rejects a configuration that cannot run, before any work; returns the class names of the data."""
    arch, tag = split_model_name_tag(cfg.model.name)
    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=3)
        raise ConfigError(f"unknown model '{arch}' in model.name; did you mean {' or '.join(close)}?" if close
                          else f"unknown model '{arch}' in model.name; see `bam-models list` or timm.list_models()")
    if tag:
        tags = [t for t in get_arch_pretrained_cfgs(arch) if t]
        if tag not in tags:
            raise ConfigError(f"model '{arch}' has no tag '{tag}'; its tags: {', '.join(tags) or 'none'}")
    if cfg.model.checkpoint and not os.path.isfile(cfg.model.checkpoint):
        raise ConfigError(f"model.checkpoint {cfg.model.checkpoint} does not exist")
    data = cfg.data
    if data.dataset == DIGITS:
        classes = [str(c) for c in range(10)]
    elif cifar_folder(data.dataset):
        classes = cifar_classes(data.dataset)
    else:
        if not os.path.isdir(data.dataset):
            raise ConfigError(f"data folder {data.dataset} does not exist; set data.dataset to a folder with "
                              f"train/ and val/ sub-folders of class folders, or to 'digits'")
        classes = None
        for split in (data.train_split, data.val_split):
            try:
                split_classes = folder_classes(data.dataset, split)
            except FileNotFoundError:
                split_classes = []
            if os.path.normpath(_search_split(data.dataset, split)) == os.path.normpath(data.dataset) \
                    or not split_classes:
                raise ConfigError(f"data folder {data.dataset} has no '{split}' split with class sub-folders; "
                                  f"expected {data.dataset}/{split}/CLASS/IMAGE")
            if classes is None:
                classes = split_classes
            elif split_classes != classes:
                raise ConfigError(f"the {data.val_split} split of {data.dataset} has {len(split_classes)} classes "
                                  f"but {data.train_split} has {len(classes)}; both need the same class folders")
    if cfg.model.num_classes is not None and cfg.model.num_classes != len(classes):
        raise ConfigError(f"model.num_classes is {cfg.model.num_classes} but the data has {len(classes)} classes; "
                          f"set model.num_classes={len(classes)} or leave it null")
    if cfg.train.amp == 'fp16' and not (cfg.train.device.startswith('cuda') or
                                         (cfg.train.device == 'auto' and torch.cuda.is_available())):
        raise ConfigError("train.amp 'fp16' needs a CUDA device; use train.amp=bf16 on CPU")
    if cfg.model.sync_bn and not (cfg.train.device.startswith('cuda') or
                                  (cfg.train.device == 'auto' and torch.cuda.is_available())):
        raise ConfigError("model.sync_bn needs CUDA devices (torch's SyncBatchNorm is GPU-only); on CPU use "
                          "model.sync_bn=false, or model.freeze=bn to take batch statistics out of training")
    if data.batch_size < 1 or cfg.schedule.epochs < 1:
        raise ConfigError("data.batch_size and schedule.epochs must be at least 1")
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
    """Loads weights to fine-tune from; a classifier of another class count is left at its fresh init."""
    state = load_state_dict(path)
    own = model.state_dict()
    classifier = model.default_cfg.get('classifier', 'fc')
    dropped = [k for k, v in state.items() if k.startswith(classifier + '.') and k in own and v.shape != own[k].shape]
    for key in dropped:
        del state[key]
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k not in dropped]
    if unexpected or missing:
        raise ConfigError(f"model.checkpoint {path} does not fit {model.default_cfg.get('architecture')}: "
                          f"{len(missing)} missing keys (e.g. {missing[:2]}), {len(unexpected)} unexpected "
                          f"(e.g. {unexpected[:2]})")


def freeze_trunk(model: nn.Module) -> None:
    """Trains only the attention modules and the classifier: the rest stops learning, its BN stats frozen."""
    classifier = model.default_cfg.get('classifier', 'fc')
    for name, param in model.named_parameters():
        if not is_attention_param(name) and not name.startswith(classifier + '.'):
            param.requires_grad_(False)
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and not is_attention_param(name + '.'):
            model.set_submodule(name, freeze_batch_norm_2d(module))


def param_groups(model: nn.Module, weight_decay: float, attention_lr_scale: float,
                 no_decay_bias_and_norm: bool) -> List[Dict[str, Any]]:
    """Groups by (attention or trunk) x (decayed or not); timm's schedulers honour each group's lr_scale."""
    groups: Dict[Tuple[bool, bool], List[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        decay = not (no_decay_bias_and_norm and (param.ndim <= 1 or name.endswith('.bias')))
        groups.setdefault((is_attention_param(name), decay), []).append(param)
    return [dict(params=params, weight_decay=weight_decay if decay else 0.0,
                 lr_scale=attention_lr_scale if attention else 1.0, group_name=f"{'attention' if attention else 'trunk'}"
                 f"{'' if decay else '_no_decay'}") for (attention, decay), params in sorted(groups.items())]


def export_best(model: nn.Module, out_dir: str, metrics: Dict[str, Any], data_config: Dict[str, Any],
                label_names: Optional[List[str]] = None) -> Path:
    """Writes the best weights as a Hub folder (model.safetensors, config.json in timm's format, model card)
    that `timm.create_model('local-dir:...')` loads and `bam-models publish` uploads."""
    top5 = metrics.get('top5')
    save_pretrained(
        model, out_dir,
        metrics=[dict(dataset=metrics['dataset'], split='val', top1=metrics['top1'],
                      top5=top5, input_size=data_config['input_size'][-1],
                      measured_by='this project', reference=f"bam-models train, best of epoch {metrics['epoch']}")],
        description=f"{model.pretrained_cfg.get('architecture')} fine-tuned with `bam-models train`.",
        data_config=data_config,
        model_config=dict(label_names=list(label_names)) if label_names else None,
    )
    return Path(out_dir)


# ---------------------------------------------------------------------------------------------- state

def atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + '.tmp')
    with open(tmp, 'wb') as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def rng_state() -> Dict[str, Any]:
    np_state = np.random.get_state(legacy=False)
    return dict(
        torch=torch.get_rng_state(), cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        numpy=dict(key=torch.from_numpy(np_state['state']['key'].astype(np.int64)), pos=np_state['state']['pos'],
                   has_gauss=np_state['has_gauss'], gauss=np_state['gauss']),
        python=random.getstate())


def set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state['torch'])
    if state['cuda'] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])
    np_state = state['numpy']
    np.random.set_state(dict(bit_generator='MT19937', state=dict(key=np_state['key'].numpy().astype(np.uint32),
                                                                   pos=np_state['pos']),
                             has_gauss=np_state['has_gauss'], gauss=np_state['gauss']))
    random.setstate(state['python'])


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


# ---------------------------------------------------------------------------------------------- loops

def _reduce(values: List[float], device, distributed: bool) -> List[float]:
    if not distributed:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


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


def _autocast_factory(device: torch.device, amp: str):
    if amp == 'none':
        return nullcontext
    dtype = torch.bfloat16 if amp == 'bf16' else torch.float16
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)


def train(cfg: RunConfig, resume: Optional[str] = None) -> Dict[str, Any]:
    """Runs the job; returns the summary (also written to OUTPUT/summary.json on rank 0)."""
    classes = check_config(cfg)
    num_classes = cfg.model.num_classes or len(classes)
    output = Path(cfg.train.output)
    if resume == 'auto':
        resume = str(output / LAST)
    if resume and not os.path.isfile(resume):
        raise ConfigError(f"--resume {resume} does not exist; pass a last.pth written by an earlier run")

    device_name = cfg.train.device
    if device_name == 'auto':
        device_name = 'cuda' if torch.cuda.is_available() else 'cpu'
    env = init_distributed_device_so(device=device_name)
    device, rank, world, distributed = (torch.device(env['device']), env['global_rank'], env['world_size'],
                                        env['distributed'])
    is_main = rank == 0
    seed_epoch(cfg.train.seed, 0, rank)

    model = build_model(cfg, num_classes)
    data_config = resolve_data_config(dict(
        input_size=(3, cfg.data.input_size, cfg.data.input_size) if cfg.data.input_size else None,
        interpolation=cfg.data.interpolation, crop_pct=cfg.data.crop_pct,
        mean=tuple(cfg.data.mean) if cfg.data.mean else None, std=tuple(cfg.data.std) if cfg.data.std else None),
        model=model)
    train_set = build_dataset(cfg.data.dataset, 'train', cfg.data.train_split, cfg.data.val_split)
    val_set = build_dataset(cfg.data.dataset, 'val', cfg.data.train_split, cfg.data.val_split)
    train_loader, val_loader = create_train_eval_loaders(
        train_set, val_set, data_config, cfg.data, num_replicas=world, rank=rank, seed=cfg.train.seed,
        pin_memory=device.type == 'cuda')
    steps_per_epoch = len(train_loader)
    if steps_per_epoch == 0:
        raise ConfigError(f"{len(train_set)} training images make no full batch of {cfg.data.batch_size} x "
                          f"{world} processes; lower data.batch_size")

    model.to(device)
    if cfg.model.channels_last:
        model.to(memory_format=torch.channels_last)
    if distributed and cfg.model.sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
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
    scaler = NativeScaler(device=device.type) if cfg.train.amp == 'fp16' else None
    autocast = _autocast_factory(device, cfg.train.amp)
    ema = ModelEmaV3(model, decay=cfg.train.ema_decay) if cfg.train.ema else None

    mixup = None
    if cfg.train.mixup > 0 or cfg.train.cutmix > 0:
        mixup = Mixup(mixup_alpha=cfg.train.mixup, cutmix_alpha=cfg.train.cutmix, prob=cfg.train.mixup_prob,
                      switch_prob=cfg.train.mixup_switch_prob, label_smoothing=cfg.train.label_smoothing,
                      num_classes=num_classes)
        criterion = SoftTargetCrossEntropy()
    elif cfg.train.label_smoothing > 0:
        criterion = LabelSmoothingCrossEntropy(smoothing=cfg.train.label_smoothing)
    else:
        criterion = nn.CrossEntropyLoss()

    start_epoch, start_step, best, history = 0, 0, None, []
    resume_rng = None
    if resume:
        state = torch.load(resume, map_location='cpu', weights_only=True)
        model.load_state_dict(state['state_dict'])
        optimizer.load_state_dict(state['optimizer'])
        if scheduler is not None and state.get('scheduler'):
            scheduler.load_state_dict(state['scheduler'])
        if ema is not None and state.get('state_dict_ema'):
            ema.load_state_dict(state['state_dict_ema'])
        if scaler is not None and state.get('scaler'):
            scaler.load_state_dict(state['scaler'])
        start_epoch, start_step, best = state['epoch'], state['step_in_epoch'], state['best']
        resume_rng = state['rng'][rank] if rank < len(state['rng']) else None

    train_model = nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == 'cuda' else None) if distributed else model

    if is_main:
        output.mkdir(parents=True, exist_ok=True)
        log_path = output / 'log.jsonl'
        if resume and log_path.exists():  # drop lines of epochs that are about to run again
            kept = [line for line in log_path.read_text().splitlines() if json.loads(line)['epoch'] < start_epoch]
            log_path.write_text(''.join(line + '\n' for line in kept))
            history = [json.loads(line) for line in kept]
        elif not resume:
            log_path.write_text('')

    def checkpoint(epoch: int, step_in_epoch: int) -> Dict[str, Any]:
        rngs = [rng_state()]
        if distributed:
            rngs = [None] * world
            dist.all_gather_object(rngs, rng_state())
        return dict(
            state_dict=model.state_dict(), optimizer=optimizer.state_dict(),
            scheduler=scheduler.state_dict() if scheduler is not None else None,
            state_dict_ema=ema.state_dict() if ema is not None else None,
            scaler=scaler.state_dict() if scaler is not None else None,
            epoch=epoch, step_in_epoch=step_in_epoch, best=best, rng=rngs, config=cfg.to_dict())

    eval_model = ema.module if ema is not None else model
    started = time.perf_counter()
    images_seen = 0
    with StopRequest() as stop:
        for epoch in range(start_epoch, cfg.schedule.epochs):
            seed_epoch(cfg.train.seed, epoch, rank)
            sampler = train_loader.sampler
            sampler.set_epoch(epoch)
            skip_steps = start_step if epoch == start_epoch else 0
            sampler.skip = skip_steps * cfg.data.batch_size
            batches = iter(train_loader)  # creating it draws the loader's base seed from the epoch's RNG
            if skip_steps and resume_rng is not None:
                set_rng_state(resume_rng)  # the RNG exactly as it was after the last finished step
            if scheduler is not None:
                scheduler.step_update(epoch * steps_per_epoch + skip_steps)
            train_model.train()
            loss_sum = correct = seen = 0.0
            epoch_start = time.perf_counter()
            bar = tqdm(batches, desc=f'epoch {epoch + 1}/{cfg.schedule.epochs}', initial=skip_steps,
                       total=steps_per_epoch, disable=not (is_main and cfg.train.progress), dynamic_ncols=True)
            step, stop_now = skip_steps, False
            for images, targets in bar:
                images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
                if cfg.model.channels_last:
                    images = images.contiguous(memory_format=torch.channels_last)
                hard_targets = targets
                if mixup is not None:
                    images, targets = mixup(images, targets)
                with autocast():
                    logits = train_model(images)
                    loss = criterion(logits, targets)
                finite, stop_now = bool(torch.isfinite(loss).all()), stop.requested
                if distributed:  # every process stops together, on a non-finite loss anywhere or on Ctrl-C
                    flags = torch.tensor([float(not finite), float(stop_now)], device=device)
                    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
                    finite, stop_now = not flags[0].item(), bool(flags[1].item())
                if not finite:
                    raise NonFiniteLossError(
                        f"loss is not finite ({loss.item()}) at epoch {epoch + 1}, step {step + 1} of {steps_per_epoch}; stopped "
                        f"without saving, {output / LAST} still holds the last good epoch. Lower optim.lr, set "
                        f"optim.clip_grad, or use train.amp=none")
                optimizer.zero_grad(set_to_none=True)
                params = [p for p in model.parameters() if p.requires_grad]
                if scaler is not None:
                    scaler(loss, optimizer, clip_grad=cfg.optim.clip_grad, clip_mode=cfg.optim.clip_mode,
                           parameters=params)
                else:
                    loss.backward()
                    if cfg.optim.clip_grad is not None:
                        dispatch_clip_grad(params, cfg.optim.clip_grad, mode=cfg.optim.clip_mode)
                    optimizer.step()
                step += 1
                num_updates = epoch * steps_per_epoch + step
                if ema is not None:
                    ema.update(model, step=num_updates)
                if scheduler is not None:
                    scheduler.step_update(num_updates)
                batch = hard_targets.numel()
                loss_sum += loss.item() * batch
                correct += (logits.argmax(-1) == hard_targets).sum().item()
                seen += batch
                images_seen += batch * world
                elapsed = time.perf_counter() - epoch_start
                bar.set_postfix(loss=f'{loss_sum / seen:.4f}', acc=f'{100 * correct / seen:.1f}',
                                lr=f"{optimizer.param_groups[0]['lr']:.2e}", img_s=f'{seen * world / elapsed:.0f}',
                                refresh=False)
                if stop_now:
                    break
            bar.close()
            if stop_now:
                state = checkpoint(epoch, step)
                if is_main:
                    atomic_save(state, output / LAST)
                    print(f"interrupted at epoch {epoch + 1}, step {step}: saved {output / LAST}; "
                          f"continue with --resume {output / LAST}")
                raise KeyboardInterrupt
            train_loss, train_correct, train_seen = _reduce([loss_sum, correct, seen], device, distributed)
            epoch_time = time.perf_counter() - epoch_start
            metrics = evaluate(eval_model, val_loader, device, autocast, channels_last=cfg.model.channels_last,
                               distributed=distributed)
            is_best = best is None or metrics['top1'] > best['top1']
            record = dict(epoch=epoch, train_loss=train_loss / train_seen, train_top1=100 * train_correct / train_seen,
                          lr=optimizer.param_groups[0]['lr'], val_loss=metrics['loss'], val_top1=metrics['top1'],
                          val_top5=metrics['top5'], img_per_s=train_seen / epoch_time, epoch_time_s=epoch_time)
            if is_best:
                best = dict(epoch=epoch, top1=metrics['top1'], top5=metrics['top5'], loss=metrics['loss'])
            state = checkpoint(epoch + 1, 0)
            if is_main:
                if is_best:  # best before last: a kill in between re-runs this epoch and rewrites both
                    atomic_save(dict(state_dict=eval_model.state_dict(), epoch=epoch, metrics=best,
                                     config=cfg.to_dict(), classes=classes, data_config=data_config), output / BEST)
                atomic_save(state, output / LAST)
                with open(output / 'log.jsonl', 'a') as f:
                    f.write(json.dumps(record) + '\n')
                history.append(record)
                if not cfg.train.progress:
                    continue
                tqdm.write(f"epoch {epoch + 1}: train loss {record['train_loss']:.4f}, val top-1 "
                           f"{metrics['top1']:.2f} top-5 {metrics['top5']:.2f} loss {metrics['loss']:.4f}"
                           f"{' (best)' if is_best else ''}")

    summary = dict(model=cfg.model.name, epochs=cfg.schedule.epochs, best=best,
                   final=history[-1] if history else None, train_time_s=time.perf_counter() - started,
                   processes=world, output=str(output))
    if is_main:
        if cfg.train.export and best is not None:
            best_state = torch.load(output / BEST, map_location='cpu', weights_only=True)
            export_model = timm.create_model(cfg.model.name, num_classes=num_classes)
            # frozen BN (model.freeze) keeps no num_batches_tracked; everything else must match
            missing, unexpected = export_model.load_state_dict(best_state['state_dict'], strict=False)
            assert not unexpected and all(k.endswith('num_batches_tracked') for k in missing), (missing, unexpected)
            summary['hub_dir'] = str(export_best(
                export_model, str(output / 'hub'), dict(dataset=cfg.data.dataset, epoch=best['epoch'] + 1,
                                                        top1=round(best['top1'], 3), top5=round(best['top5'], 3)),
                data_config, label_names=classes))
        (output / 'summary.json').write_text(json.dumps(summary, indent=2) + '\n')
    if distributed:
        dist.barrier()
    return summary

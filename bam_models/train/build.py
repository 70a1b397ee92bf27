""" The build steps of a classification run, as timm's train.py makes them: the config check (before any work),
the model (start weights, freezing, parameter groups), device and DDP, data, the optimizer and scheduler
(`build_optimizer` / `build_scheduler`, the factories every trainer of the package uses), EMA, the criterion,
and the `Run` that holds them for the loop (`loop.py`).
"""
import os
from dataclasses import dataclass
from typing import Any, ContextManager, Dict, List, Optional, Set, Tuple

import timm
import torch
import torch.nn as nn
from timm.data import Mixup, resolve_data_config
from timm.layers import freeze_batch_norm_2d
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.models import get_arch_pretrained_cfgs, split_model_name_tag
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3, NativeScaler
from timm.utils.distributed import init_distributed_device_so

import bam_models  # noqa: F401  registers the zoo with timm
from bam_models.checkpoint import load_strict, read_state_dict
from bam_models.errors import ConfigError
from bam_models.hub import check_model_name
from bam_models.insert.inserted import check_attention_args
from bam_models.layers import attention_keys
from bam_models.runs import autocast_for, seed_epoch
from bam_models.train.config import OptimConfig, RunConfig, ScheduleConfig, reader_prefix
from bam_models.train.data import (
    DIGITS, build_dataset, cifar_classes, cifar_folder, create_train_eval_loaders, dataset_classes,
    shared_class_to_idx, train_sample_count)
from bam_models.train.readers import reader_dataset

__all__ = ['Run', 'base_weights', 'build_criterion', 'build_model', 'build_optimizer', 'build_run',
           'build_scheduler', 'check_config', 'freeze_trunk', 'load_start_weights', 'param_groups']


# ---------------------------------------------------------------------------------------------- checks

def _check_model_name(name: str) -> None:
    check_model_name(name, where=' in model.name', error=ConfigError)


def data_classes(cfg: RunConfig) -> List[str]:
    """Class names in label order, as the reader that labels the training data numbers them."""
    data = cfg.data
    if reader_prefix(data.dataset):  # opens the training split: a missing split or package fails here
        return dataset_classes(reader_dataset(data, is_training=True, seed=cfg.train.seed))
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
    _check_attention_args(cfg)
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

def attention_kwargs(cfg: RunConfig) -> Dict[str, Any]:
    """model.bam_args / model.cbam_args as the model builders' keyword arguments (only those that are set), with
    an activation name resolved to timm's layer as for insert's folders."""
    return {f'{attention}_args': check_attention_args(attention, args, where=f'model.{attention}_args',
                                                      error=ConfigError)
            for attention, args in (('bam', cfg.model.bam_args), ('cbam', cfg.model.cbam_args)) if args}


def _check_attention_args(cfg: RunConfig) -> None:
    """Builds the model on the meta device with model.bam_args / cbam_args, so that a value the layers refuse (or
    a model that takes no such arguments) is one line before any work."""
    kwargs = attention_kwargs(cfg)
    if not kwargs:
        return
    try:
        timm.create_model(cfg.model.name, device='meta', **kwargs)
    except (TypeError, ValueError) as e:
        keys = ' / '.join(f'model.{key}' for key in kwargs)
        raise ConfigError(f"{keys} cannot build {cfg.model.name}: {str(e).splitlines()[0]}; fix {keys} "
                          f"(docs/layers.md lists every option)") from None


def build_model(cfg: RunConfig, num_classes: int) -> nn.Module:
    model = timm.create_model(
        cfg.model.name, pretrained=cfg.model.pretrained, num_classes=num_classes,
        drop_rate=cfg.model.drop_rate, drop_path_rate=cfg.model.drop_path_rate, **attention_kwargs(cfg))
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

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def steps_per_epoch(self) -> int:
        return len(self.train_loader)

    @property
    def eval_model(self) -> nn.Module:
        return self.ema.module if self.ema is not None else self.model

    def autocast(self) -> ContextManager:
        return autocast_for(self.device, self.cfg.train.amp)


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
    if reader_prefix(cfg.data.dataset):  # labels are the dataset's own indices
        train_set = reader_dataset(cfg.data, is_training=True, seed=cfg.train.seed)
        val_set = reader_dataset(cfg.data, is_training=False, seed=cfg.train.seed)
    else:
        train_set = build_dataset(splits[0], 'train', *splits[1:], class_to_idx=class_to_idx)
        val_set = build_dataset(splits[0], 'val', *splits[1:], class_to_idx=class_to_idx)
    if dataset_classes(train_set) != classes:  # the labels the model learns are the names it exports
        raise ConfigError("the training data's classes changed while the run started; start it again")
    train_loader, val_loader = create_train_eval_loaders(
        train_set, val_set, data_config, cfg.data, num_replicas=world, rank=rank, seed=cfg.train.seed,
        pin_memory=device.type == 'cuda')
    if len(train_loader) == 0:
        raise ConfigError(f"{train_sample_count(train_set)} training images make no full batch of "
                          f"{cfg.data.batch_size} x {world} processes; lower data.batch_size")
    return data_config, train_loader, val_loader


def build_optimizer(params: Any, optim: OptimConfig) -> torch.optim.Optimizer:
    """timm's optimizer named by `optim.opt` over `params` (parameters or parameter groups)."""
    return create_optimizer_v2(params, opt=optim.opt, lr=optim.lr, weight_decay=optim.weight_decay,
                               momentum=optim.momentum)


def build_scheduler(optimizer: torch.optim.Optimizer, schedule: ScheduleConfig, steps_per_epoch: int) -> Any:
    """timm's scheduler named by `schedule.sched`, stepped per update (`step_update(updates so far)`); None for
    'none'."""
    if schedule.sched == 'none':
        return None
    scheduler, _ = create_scheduler_v2(
        optimizer, sched=schedule.sched, num_epochs=schedule.epochs, decay_epochs=schedule.decay_epochs,
        decay_rate=schedule.decay_rate, min_lr=schedule.min_lr,
        decay_milestones=[int(m) for m in schedule.decay_milestones], warmup_lr=schedule.warmup_lr,
        warmup_epochs=schedule.warmup_epochs, step_on_epochs=False, updates_per_epoch=steps_per_epoch)
    return scheduler


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
    optim = cfg.optim
    optimizer = build_optimizer(
        param_groups(model, optim.weight_decay, optim.attention_lr_scale, optim.no_decay_bias_and_norm), optim)
    scheduler = build_scheduler(optimizer, cfg.schedule, len(train_loader))
    mixup, criterion = build_criterion(cfg, num_classes)
    train_model = nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == 'cuda' else None) if distributed else model
    return Run(
        cfg=cfg, classes=classes, device=device, rank=rank, world=world, distributed=distributed, model=model,
        train_model=train_model, data_config=data_config, train_loader=train_loader, val_loader=val_loader,
        optimizer=optimizer, scheduler=scheduler,
        scaler=NativeScaler(device=device.type) if cfg.train.amp == 'fp16' else None,
        ema=ModelEmaV3(model, decay=cfg.train.ema_decay) if cfg.train.ema else None,
        mixup=mixup, criterion=criterion)

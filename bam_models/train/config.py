""" Training configuration: YAML files of named sections, `--set section.key=value` overrides, and checks
that reject a bad configuration with one clear line before any work starts. """
import dataclasses
import difflib
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import yaml

from bam_models.errors import ConfigError


@dataclass
class ModelConfig:
    name: str = 'resnet18_bam'  # any timm-registered architecture, optionally with a pretrained tag: ARCH[.TAG]
    pretrained: bool = False
    num_classes: Optional[int] = None  # None: the number of classes found in the data
    checkpoint: Optional[str] = None  # local weights to start from; a classifier of another size is dropped
    freeze: str = 'none'  # none | bn (freeze every BatchNorm) | trunk (train only attention modules and the head)
    grad_checkpointing: bool = False
    channels_last: bool = False
    sync_bn: bool = False  # SyncBatchNorm when training on several processes
    drop_rate: float = 0.0
    drop_path_rate: float = 0.0


@dataclass
class DataConfig:
    # 'digits' (scikit-learn's bundled handwritten digits), an extracted CIFAR folder (cifar-100-python,
    # cifar-10-batches-py, or the folder holding one) or a folder timm can read
    dataset: str = 'digits'
    train_split: str = 'train'
    val_split: str = 'validation'  # timm also finds val/, valid/, eval/ for this name
    input_size: Optional[int] = None  # square side in pixels; None: the model's pretrained_cfg
    batch_size: int = 64  # per process
    eval_batch_size: Optional[int] = None
    workers: int = 0
    scale: List[float] = field(default_factory=lambda: [0.08, 1.0])
    ratio: List[float] = field(default_factory=lambda: [3 / 4, 4 / 3])
    hflip: float = 0.5
    pad_crop: int = 0  # >0: random crop from the image zero-padded by this many pixels (CIFAR: 4), not scale/ratio
    color_jitter: float = 0.0
    auto_augment: Optional[str] = None  # timm policy string, e.g. rand-m9-mstd0.5-inc1
    re_prob: float = 0.0  # random erasing
    interpolation: Optional[str] = None  # None: the model's pretrained_cfg
    crop_pct: Optional[float] = None
    mean: Optional[List[float]] = None
    std: Optional[List[float]] = None


@dataclass
class OptimConfig:
    opt: str = 'sgd'  # any timm optimizer name: sgd, momentum, adamw, lamb, ...
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    no_decay_bias_and_norm: bool = True  # False applies weight decay to every parameter, as the BAM/CBAM authors did
    attention_lr_scale: float = 1.0  # lr multiplier for BAM/CBAM parameters (names containing .bam. or .se.)
    clip_grad: Optional[float] = None
    clip_mode: str = 'norm'  # norm | value | agc


@dataclass
class ScheduleConfig:
    sched: str = 'cosine'  # cosine | step | multistep | none
    epochs: int = 90
    warmup_epochs: int = 0
    warmup_lr: float = 1e-5
    min_lr: float = 0.0
    decay_epochs: float = 30  # step schedule: lr x decay_rate every decay_epochs
    decay_rate: float = 0.1
    decay_milestones: List[float] = field(default_factory=lambda: [30, 60, 90])  # multistep: lr x decay_rate here


@dataclass
class TrainConfig:
    seed: int = 0
    amp: str = 'none'  # none | bf16 | fp16 (fp16 needs CUDA and uses a GradScaler)
    label_smoothing: float = 0.0
    mixup: float = 0.0  # mixup alpha; 0 disables
    cutmix: float = 0.0  # cutmix alpha; 0 disables
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    ema: bool = False
    ema_decay: float = 0.9998
    device: str = 'auto'  # auto | cpu | cuda | cuda:N
    output: str = 'runs/train'
    progress: bool = True
    export: bool = True  # write the best weights in Hub format to OUTPUT/hub


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


CHOICES = {
    'model.freeze': ('none', 'bn', 'trunk'),
    'schedule.sched': ('cosine', 'step', 'multistep', 'none'),
    'train.amp': ('none', 'bf16', 'fp16'),
    'optim.clip_mode': ('norm', 'value', 'agc'),
}


def _did_you_mean(name: str, options: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, list(options), n=1, cutoff=0.5)
    return f"; did you mean '{close[0]}'?" if close else f"; expected one of: {', '.join(options)}"


def _coerce(key: str, value: Any, default: Any, hint: Any) -> Any:
    """Checks a value against the type of its field (from the default, or the annotation when that is None)."""
    if value is None:
        return None
    expected = type(default) if default is not None else hint
    if expected in (float, Optional[float]) and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if expected in (int, Optional[int]) and isinstance(value, int) and not isinstance(value, bool):
        return value
    if expected in (bool,) and isinstance(value, bool):
        return value
    if expected in (str, Optional[str]) and isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return str(value)
    if expected in (list, Optional[List[float]], List[float]) and isinstance(value, (list, tuple)):
        return [float(v) for v in value]
    type_name = getattr(expected, '__name__', None) or str(expected).replace('typing.', '')
    raise ConfigError(f"config key '{key}' must be {type_name}, got {value!r}")


def _section_from_dict(section: str, cls, values: Dict[str, Any]):
    if not isinstance(values, dict):
        raise ConfigError(f"config section '{section}' must be a mapping of keys to values, got {values!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    defaults = cls()
    kwargs = {}
    for key, value in values.items():
        if key not in fields:
            raise ConfigError(f"unknown config key '{section}.{key}'{_did_you_mean(key, list(fields))}")
        kwargs[key] = _coerce(f'{section}.{key}', value, getattr(defaults, key), fields[key].type)
    return cls(**kwargs)


def config_from_dict(values: Dict[str, Any]) -> RunConfig:
    values = values or {}
    sections = {f.name: f.default_factory for f in dataclasses.fields(RunConfig)}
    kwargs = {}
    for section, content in values.items():
        if section not in sections:
            raise ConfigError(f"unknown config section '{section}'{_did_you_mean(section, list(sections))}")
        kwargs[section] = _section_from_dict(section, sections[section], content or {})
    config = RunConfig(**kwargs)
    for key, options in CHOICES.items():
        section, name = key.split('.')
        value = getattr(getattr(config, section), name)
        if value not in options:
            raise ConfigError(f"config key '{key}' is {value!r}{_did_you_mean(str(value), options)}")
    return config


def apply_overrides(values: Dict[str, Any], overrides: Sequence[str]) -> Dict[str, Any]:
    """Applies `section.key=value` strings; values are parsed as YAML (`0.1`, `true`, `[0.5, 1.0]`, `null`)."""
    values = {section: dict(content or {}) for section, content in (values or {}).items()}
    for item in overrides:
        key, sep, raw = item.partition('=')
        if not sep or key.count('.') != 1:
            raise ConfigError(f"--set expects section.key=value (e.g. optim.lr=0.05), got {item!r}")
        section, name = key.strip().split('.')
        values.setdefault(section, {})[name] = yaml.safe_load(raw)
    return values


def load_config(path: Optional[str] = None, overrides: Sequence[str] = ()) -> RunConfig:
    values: Dict[str, Any] = {}
    if path is not None:
        if not os.path.isfile(path):
            raise ConfigError(f"config file {path} does not exist; the bundled ones are in configs/")
        with open(path) as f:
            values = yaml.safe_load(f) or {}
        if not isinstance(values, dict):
            raise ConfigError(f"config file {path} must hold a mapping of sections (model, data, optim, ...)")
    return config_from_dict(apply_overrides(values, overrides))

""" Training configuration: YAML files of named sections, `--set section.key=value` overrides, and checks
that reject a bad configuration with one clear line before any work starts. """
import dataclasses
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple

import yaml

from bam_models.errors import ConfigError, count, did_you_mean, excerpt
from bam_models.insert.inserted import check_attention_args


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
    bam_args: Optional[Dict[str, Any]] = None  # keyword arguments of every BAM (bam_models.layers.BAM)
    cbam_args: Optional[Dict[str, Any]] = None  # of every CBAM: the CBAM paper's ablations (docs/layers.md)


@dataclass
class DataConfig:
    # 'digits' (scikit-learn's bundled handwritten digits), an extracted CIFAR folder (cifar-100-python,
    # cifar-10-batches-py, or the folder holding one), a folder timm can read, or one of timm's reader names:
    # wds/NAME (webdataset shards), hfds/NAME, hfids/NAME (Hugging Face datasets), tfds/NAME
    dataset: str = 'digits'
    root: Optional[str] = None  # wds/hfds/hfids/tfds: the data folder (timm's --data-dir; hfds: datasets' cache)
    train_split: str = 'train'
    val_split: str = 'validation'  # timm also finds val/, valid/, eval/ for this name
    train_num_samples: Optional[int] = None  # wds/hfids: samples of an epoch where the reader cannot know them
    val_num_samples: Optional[int] = None
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
    attention_lr_scale: float = 1.0  # lr multiplier for the parameters of BAM/CBAM modules
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


# ---------------------------------------------------------------------------------------------- constraints

class Range(NamedTuple):
    """A number in [low, high]; `low_open` / `high_open` exclude that end; None: unbounded."""
    low: Optional[float] = None
    high: Optional[float] = None
    low_open: bool = False
    high_open: bool = False

    def violation(self, value: float) -> Optional[str]:
        too_low = self.low is not None and (value <= self.low if self.low_open else value < self.low)
        too_high = self.high is not None and (value >= self.high if self.high_open else value > self.high)
        return None if not (too_low or too_high) and math.isfinite(value) else self.describe()

    def describe(self) -> str:
        low, high = _number(self.low), _number(self.high)
        if self.low is None and self.high is None:
            return 'a finite number'
        if self.high is None:
            return f"{'above' if self.low_open else 'at least'} {low}"
        if self.low is None:
            return f"{'below' if self.high_open else 'at most'} {high}"
        return f"in {'(' if self.low_open else '['}{low}, {high}{')' if self.high_open else ']'}"


def _number(value: Optional[float]) -> str:
    """Whole numbers in full (train.seed's 4294967295, not 4.29497e+09), others short."""
    return str(value) if isinstance(value, int) else f'{value:g}' if value is not None else ''


class Pair(NamedTuple):
    """Two numbers [a, b] with a <= b, each within `each`."""
    each: Range

    def violation(self, value: List[float]) -> Optional[str]:
        if len(value) == 2 and value[0] <= value[1] and not any(self.each.violation(v) for v in value):
            return None
        return f"two numbers [min, max], min <= max, each {self.each.describe()}"


class PerChannel(NamedTuple):
    """One number per image channel (3), each within `each`."""
    each: Range

    def violation(self, value: List[float]) -> Optional[str]:
        if len(value) == 3 and not any(self.each.violation(v) for v in value):
            return None
        return f"three numbers (one per RGB channel), each {self.each.describe()}"


class Increasing(NamedTuple):
    """A non-empty list of increasing numbers, each within `each` (e.g. lr milestones in epochs)."""
    each: Range

    def violation(self, value: List[float]) -> Optional[str]:
        if value and all(a < b for a, b in zip(value, value[1:])) and not any(self.each.violation(v) for v in value):
            return None
        return f"a non-empty list of increasing numbers, each {self.each.describe()}"


class AttentionArgs(NamedTuple):
    """Keyword arguments of every BAM or CBAM of the model, checked as a `bam-models insert` folder's are (known
    keys, types, bounds: `insert.inserted.check_attention_args`)."""
    attention: str  # 'bam' | 'cbam'

    def violation(self, value: Dict[str, Any]) -> Optional[str]:
        # the check names the key at fault in its own message, which says more than a range could
        check_attention_args(self.attention, value, where=f'model.{self.attention}_args', error=ConfigError)
        return None


class Pattern(NamedTuple):
    """A string matching `regex`; `hint` names the accepted forms."""
    regex: str
    hint: str

    def violation(self, value: str) -> Optional[str]:
        return None if re.fullmatch(self.regex, value) else self.hint


NON_NEGATIVE, POSITIVE, POSITIVE_INT = Range(0), Range(0, low_open=True), Range(1)
FRACTION, FRACTION_BELOW_1 = Range(0, 1), Range(0, 1, high_open=True)
NON_EMPTY = Pattern(r'.+', 'a non-empty string')
INTERPOLATIONS = ('bilinear', 'bicubic', 'nearest', 'box', 'hamming', 'lanczos', 'random')

# The range, choices or form of every key, next to the dataclasses above. A choice list is a tuple; a
# callable returns the choices (timm's registries). `bool` keys need no more than their type.
CONSTRAINTS: Dict[str, Any] = {
    'model.name': NON_EMPTY,  # also checked against timm's registry by the loop's check_config
    'model.num_classes': POSITIVE_INT,
    'model.checkpoint': NON_EMPTY,
    'model.freeze': ('none', 'bn', 'trunk'),
    'model.drop_rate': FRACTION_BELOW_1,
    'model.drop_path_rate': FRACTION_BELOW_1,
    'model.bam_args': AttentionArgs('bam'),
    'model.cbam_args': AttentionArgs('cbam'),
    'data.dataset': NON_EMPTY,
    'data.root': NON_EMPTY,  # also checked with data.dataset: `_check_data_root`
    'data.train_split': NON_EMPTY,
    'data.train_num_samples': POSITIVE_INT,
    'data.val_num_samples': POSITIVE_INT,
    'data.val_split': NON_EMPTY,
    'data.input_size': POSITIVE_INT,
    'data.batch_size': POSITIVE_INT,
    'data.eval_batch_size': POSITIVE_INT,
    'data.workers': NON_NEGATIVE,
    'data.scale': Pair(Range(0, 1, low_open=True)),
    'data.ratio': Pair(POSITIVE),
    'data.hflip': FRACTION,
    'data.pad_crop': NON_NEGATIVE,
    'data.color_jitter': NON_NEGATIVE,
    'data.auto_augment': Pattern(r'(rand|augmix|original|v0|3a)[\w.\-]*', 'a timm policy string such as '
                                 'rand-m9-mstd0.5-inc1, augmix-m5-w4-d2, original or v0'),
    'data.re_prob': FRACTION,
    'data.interpolation': INTERPOLATIONS,
    'data.crop_pct': Range(0, 1, low_open=True),
    'data.mean': PerChannel(Range()),
    'data.std': PerChannel(POSITIVE),
    'optim.opt': lambda: _timm_optimizers(),
    'optim.lr': POSITIVE,
    'optim.momentum': FRACTION_BELOW_1,
    'optim.weight_decay': NON_NEGATIVE,
    'optim.attention_lr_scale': NON_NEGATIVE,
    'optim.clip_grad': POSITIVE,
    'optim.clip_mode': ('norm', 'value', 'agc'),
    'schedule.sched': ('cosine', 'step', 'multistep', 'none'),
    'schedule.epochs': POSITIVE_INT,
    'schedule.warmup_epochs': NON_NEGATIVE,
    'schedule.warmup_lr': NON_NEGATIVE,
    'schedule.min_lr': NON_NEGATIVE,
    'schedule.decay_epochs': POSITIVE,
    'schedule.decay_rate': Range(0, 1, low_open=True),
    'schedule.decay_milestones': Increasing(NON_NEGATIVE),
    'train.seed': Range(0, 2 ** 32 - 1),  # numpy's seed range; the samplers' derived seeds stay in 64 bits
    'train.amp': ('none', 'bf16', 'fp16'),
    'train.label_smoothing': FRACTION_BELOW_1,
    'train.mixup': NON_NEGATIVE,
    'train.cutmix': NON_NEGATIVE,
    'train.mixup_prob': FRACTION,
    'train.mixup_switch_prob': FRACTION,
    'train.ema_decay': Range(0, 1, low_open=True, high_open=True),
    'train.device': Pattern(r'auto|cpu|cuda(:\d+)?|mps', "'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'"),
    'train.output': NON_EMPTY,
}


def _timm_optimizers() -> Tuple[str, ...]:
    from timm.optim import list_optimizers
    return tuple(list_optimizers())


def _did_you_mean(name: str, options: Sequence[str]) -> str:
    hint = did_you_mean(name, options, n=1, cutoff=0.5)
    if hint:
        return f"; {hint}"
    if len(options) > 12:
        return f"; expected one of {len(options)} names such as {', '.join(list(options)[:6])}"
    return f"; expected one of: {', '.join(options)}"


def _sections() -> Dict[str, type]:
    return {f.name: f.default_factory for f in dataclasses.fields(RunConfig)}


def _section_of(key: str) -> Optional[str]:
    """The section that has a key of this name, if any (`epochs` -> 'schedule')."""
    for section, cls in _sections().items():
        if key in {f.name for f in dataclasses.fields(cls)}:
            return section
    return None


def check_constraint(key: str, value: Any, rule: Any = None, flag: Optional[str] = None) -> None:
    """Raises ConfigError when `value` breaks `rule` (default: the key's entry in CONSTRAINTS). `flag` names a
    command-line option that set it (detection checks its flags with these rules); default: a config key."""
    rule = CONSTRAINTS.get(key) if rule is None else rule
    if rule is None or value is None or isinstance(value, bool):
        return
    if callable(rule):
        rule = rule()
    what = flag or f"config key '{key}'"
    if type(rule) is tuple:  # choices (Range and the other rules are NamedTuples)
        if value not in rule:
            raise ConfigError(f"{what} is {excerpt(value)}{_did_you_mean(excerpt(value), rule)}")
        return
    problem = rule.violation(value)
    if problem:
        fix = f'pass {flag} VALUE' if flag else f'fix it in the config or with --set {key}=VALUE'
        raise ConfigError(f"{what} is {excerpt(value)} but must be {problem}; {fix}")


# ---------------------------------------------------------------------------------------------- parsing

def _type_name(expected: Any) -> str:
    return getattr(expected, '__name__', None) or str(expected).replace('typing.', '')


def _coerce(key: str, value: Any, default: Any, hint: Any) -> Any:
    """Checks a value against the type of its field (from the default, or the annotation when that is None)."""
    if value is None:
        return None
    expected = type(default) if default is not None else hint
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if expected in (float, Optional[float]) and is_number:
        return float(value)
    if expected in (int, Optional[int]) and isinstance(value, int) and not isinstance(value, bool):
        return value
    if expected in (bool,) and isinstance(value, bool):
        return value
    if expected in (str, Optional[str]) and isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return str(value)
    if expected in (list, Optional[List[float]], List[float]) and isinstance(value, (list, tuple)) and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        return [float(v) for v in value]
    if expected in (dict, Optional[Dict[str, Any]]) and isinstance(value, dict):
        return {str(k): v for k, v in value.items()}
    if expected in (list, Optional[List[float]], List[float]):
        raise ConfigError(f"config key '{key}' must be a list of numbers such as [0.5, 1.0], got {excerpt(value)}; "
                          f"fix it in the config or with --set {key}=VALUE")
    raise ConfigError(f"config key '{key}' must be {_type_name(expected)}, got {excerpt(value)}; "
                      f"fix it in the config or with --set {key}=VALUE")


def _unknown_key(section: str, key: str, options: Sequence[str]) -> ConfigError:
    home = _section_of(key)
    if home is not None and home != section:
        return ConfigError(f"unknown config key '{section}.{key}'; '{key}' belongs to section '{home}': "
                           f"write {home}.{key}")
    return ConfigError(f"unknown config key '{section}.{key}'{_did_you_mean(key, options)}")


def _section_from_dict(section: str, cls, values: Any):
    if not isinstance(values, dict):
        example = 'model:\\n  name: resnet18_bam' if section == 'model' else f'{section}:\\n  KEY: VALUE'
        raise ConfigError(f"config section '{section}' must be a mapping of keys to values, got {excerpt(values)}; a "
                          f"config is sectioned, e.g. '{example}'")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    defaults = cls()
    kwargs = {}
    for key, value in values.items():
        if key not in fields:
            raise _unknown_key(section, excerpt(key).strip("'"), list(fields))
        kwargs[key] = _coerce(f'{section}.{key}', value, getattr(defaults, key), fields[key].type)
        check_constraint(f'{section}.{key}', kwargs[key])
    return cls(**kwargs)


def config_from_dict(values: Dict[str, Any]) -> RunConfig:
    """A RunConfig from nested sections; every key's type and range is checked (see CONSTRAINTS)."""
    values = values or {}
    sections = _sections()
    kwargs = {}
    for section, content in values.items():
        if section not in sections:
            section = excerpt(section).strip("'")
            home = _section_of(section)
            if home is not None:
                raise ConfigError(f"'{section}' at the top level of the config is a key of section '{home}'; "
                                  f"a config is sectioned: write it under '{home}:'")
            raise ConfigError(f"unknown config section '{section}'{_did_you_mean(section, list(sections))}")
        kwargs[section] = _section_from_dict(section, sections[section], {} if content is None else content)
    config = RunConfig(**kwargs)
    _check_warmup(config.schedule)
    _check_data_root(config.data)
    return config


# timm's reader prefixes of data.dataset (wds/NAME, ...), which read their data from data.root
READER_PREFIXES = ('wds', 'hfds', 'hfids', 'tfds')


def reader_prefix(dataset: str) -> Optional[str]:
    """'wds', 'hfds', 'hfids' or 'tfds' for a data.dataset that names one of timm's readers, else None (the
    prefix is case-insensitive, as in timm)."""
    prefix, sep, _ = dataset.partition('/')
    return prefix.lower() if sep and prefix.lower() in READER_PREFIXES else None


def _check_data_root(data: DataConfig) -> None:
    """data.root goes with a reader name in data.dataset, and is then an existing folder."""
    if not reader_prefix(data.dataset):
        if data.root is not None:
            raise ConfigError(f"config key 'data.root' is set but data.dataset {excerpt(data.dataset)} is not a "
                              f"reader name (wds/, hfds/, hfids/, tfds/); a folder dataset is data.dataset itself: "
                              f"remove data.root")
        return
    if data.root is None:
        raise ConfigError(f"data.dataset {excerpt(data.dataset)} needs data.root, the folder the reader reads "
                          f"(timm's --data-dir); set it in the config or with --set data.root=FOLDER")
    if not os.path.isdir(data.root):
        raise ConfigError(f"data.root {excerpt(data.root)} is not a folder; set data.root to the folder of "
                          f"{excerpt(data.dataset)}")


def _check_warmup(schedule: ScheduleConfig) -> None:
    """A warmup as long as the run would train the whole run at the warmup learning rate."""
    if schedule.warmup_epochs and schedule.warmup_epochs >= schedule.epochs:
        raise ConfigError(f"config key 'schedule.warmup_epochs' is {schedule.warmup_epochs} but the run has only "
                          f"{count(schedule.epochs, 'epoch')} (schedule.epochs), so it would never leave the warmup; "
                          f"set schedule.warmup_epochs below schedule.epochs")


# far more values than any configuration has: YAML aliases can make a few hundred bytes mean billions of them
MAX_YAML_VALUES = 10_000


def _check_expansion(value: Any, where: str) -> None:
    """Refuses a parsed document that holds more than MAX_YAML_VALUES values once its aliases are expanded
    (a "billion laughs"), or refers to itself; counted without expanding anything, stopping at the bound."""
    pending, seen = [value], 0
    while pending:
        item = pending.pop()
        seen += 1
        if seen > MAX_YAML_VALUES:
            raise ConfigError(f"{where} expands to more than {MAX_YAML_VALUES:,} values (YAML aliases '*' repeat "
                              f"or nest anchors); write the values out instead of nesting aliases")
        if isinstance(item, dict):
            pending.extend(item.keys())
            pending.extend(item.values())
        elif isinstance(item, (list, tuple)):
            pending.extend(item)


def _parse_yaml(text: str, where: str) -> Any:
    try:
        values = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, 'problem_mark', None)
        at = f' at line {mark.line + 1}, column {mark.column + 1}' if mark is not None else ''
        problem = getattr(e, 'problem', None) or str(e).splitlines()[0]
        raise ConfigError(f"{where} is not valid YAML ({problem}{at}); fix the syntax (quote strings that "
                          f"hold ':' or brackets)") from None
    except ValueError as e:  # e.g. an integer of more digits than Python converts
        raise ConfigError(f"{where} holds a value that cannot be read ({excerpt(str(e))}); write a shorter "
                          f"value") from None
    _check_expansion(values, where)
    return values


def apply_overrides(values: Dict[str, Any], overrides: Sequence[str]) -> Dict[str, Any]:
    """Applies `section.key=value` strings; values are parsed as YAML (`0.1`, `true`, `[0.5, 1.0]`, `null`)."""
    values = {section: dict(content) if isinstance(content, dict) else content
              for section, content in (values or {}).items()}
    for item in overrides:
        key, sep, raw = item.partition('=')
        if not sep or key.count('.') != 1:
            raise ConfigError(f"--set expects section.key=value (e.g. optim.lr=0.05), got {excerpt(item)}")
        section, name = key.strip().split('.')
        content = values.setdefault(section, {})
        if not isinstance(content, dict):
            content = values[section] = {}  # the section check reports a non-mapping section of the file
        content[name] = _parse_yaml(raw, f'the value of --set {item[:100]}')
    return values


def load_config(path: Optional[str] = None, overrides: Sequence[str] = ()) -> RunConfig:
    values: Dict[str, Any] = {}
    if path is not None:
        if not os.path.isfile(path):
            raise ConfigError(f"config file {path} does not exist; the bundled ones are in configs/")
        with open(path) as f:
            values = _parse_yaml(f.read(), f'config file {path}') or {}
        if not isinstance(values, dict):
            raise ConfigError(f"config file {path} must hold a mapping of sections (model, data, optim, ...)")
        for section, content in values.items():  # before --set, which could otherwise mask a flat file
            if section in _sections() and content is not None and not isinstance(content, dict):
                _section_from_dict(section, _sections()[section], content)
    return config_from_dict(apply_overrides(values, overrides))

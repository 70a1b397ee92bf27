""" Weight files, read and checked one way everywhere (hub, convert, publish, train, validate, visualize,
export, detection).

- `read_state_dict`: the tensors of a `.safetensors` file or a torch file read with `weights_only=True` (no
  pickled code ever runs), with `state_dict` / `model` wrappers and `module.` prefixes removed (timm's reader);
  NaN/Inf values and negative BatchNorm variances are refused with the offending keys.
- `check_storage`: tensors whose shape claims more bytes than their storage holds (stride-0 expanded views) are
  refused, in weight files and in run checkpoints (optimizer, scheduler, EMA states), before any value is read.
- `head_classes`: how many classes a state dict's classifier has, which sizes the model built for it.
- `key_mismatch`: missing / unexpected / mis-shaped / wrongly-typed keys of a state dict against a model,
  and `describe_mismatch` the one message format for them.
- `load_strict`: all of the above, then `model.load_state_dict`; with `keep_fresh_head` a classifier of another
  class count is left as initialised (fine-tuning on other classes) and everything else loads strictly.
- `model_from_checkpoint`: the one checkpoint -> model path: the model built with the checkpoint's class count
  (`create_sized_model`), then loaded strictly.
- `read_data_config`: the preprocessing a `bam-models train` checkpoint was trained with.
"""
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, NamedTuple, Optional, Sequence, Tuple, Type, Union

import timm
import torch
import torch.nn as nn
from timm.models import load_state_dict

from bam_models.errors import BamModelsError, CheckpointError, count

__all__ = [
    'KeyMismatch', 'check_state_dict', 'check_storage', 'create_sized_model', 'describe_mismatch', 'head_classes',
    'key_mismatch', 'load_strict', 'model_from_checkpoint', 'read_data_config', 'read_state_dict',
]

PathLike = Union[str, Path]
_EXAMPLES = 3  # keys named per kind of problem; the counts say how many there are in all


def _tensors(obj: Any) -> Iterator[Tuple[str, torch.Tensor]]:
    """Every tensor in nested dicts, lists and tuples, named by its path ('optimizer.state.0.exp_avg'); each
    object once, iteratively, so a file of shared references nested deeply or a million times over is walked in
    one pass over what it holds."""
    seen, stack = set(), [('', obj)]
    while stack:
        path, value = stack.pop()
        if id(value) in seen:
            continue
        seen.add(id(value))
        if isinstance(value, torch.Tensor):
            yield path, value
        elif isinstance(value, (dict, list, tuple)):
            items = value.items() if isinstance(value, dict) else enumerate(value)
            stack.extend(reversed([(f'{path}.{key}' if path else str(key), item) for key, item in items]))


def _overclaimed(state: Any) -> List[str]:
    """Tensors whose shape needs more bytes than the storage saved for them: checking or loading their values
    would materialise what the file never held (an expanded tensor of 80 KB on disk can claim gigabytes)."""
    return [f'{key} ({tuple(value.shape)}, {value.numel() * value.element_size():,} bytes from '
            f'{value.untyped_storage().nbytes():,} stored)'
            for key, value in _tensors(state)
            if value.numel() * value.element_size() > value.untyped_storage().nbytes()]


def check_storage(state: Any, what: str, error: Type[BamModelsError] = CheckpointError,
                  fix: str = 'save the weights with .contiguous() (or safetensors)') -> None:
    """Refuses `state` (a state dict, or a run checkpoint with optimizer, scheduler and EMA states nested in it)
    if any tensor in it claims more data than its storage holds, before anything reads their values."""
    overclaimed = _overclaimed(state)
    if overclaimed:
        raise error(f"{what} has {count(len(overclaimed), 'tensor')} whose shape claims more data than the file holds: "
                    f"{_examples(overclaimed)}; it was saved from expanded or strided views, not weights: {fix}")


def _bad_values(state_dict: Dict[str, torch.Tensor]) -> List[str]:
    """Keys whose values no trained network has: NaN/Inf, or a negative BatchNorm running variance."""
    bad = []
    for key, value in state_dict.items():
        if value.is_floating_point() and not torch.isfinite(value).all():
            bad.append(f'{key} (NaN/Inf)')
        elif key.endswith('running_var') and value.is_floating_point() and (value < 0).any():
            bad.append(f'{key} (negative variance)')
    return bad


def check_state_dict(
        state_dict: Dict[str, object],
        what: str,
        error: Type[BamModelsError] = CheckpointError,
) -> Dict[str, torch.Tensor]:
    """The tensors of `state_dict` (other entries dropped), refused with `error` if any holds impossible values."""
    tensors = {k: v for k, v in state_dict.items() if isinstance(v, torch.Tensor)}
    check_storage(tensors, what, error)
    bad = _bad_values(tensors)
    if bad:
        raise error(f"{what} holds values no trained network has in {count(len(bad), 'tensor')}: "
                    f"{_examples(bad)}; the file is damaged or was saved mid-divergence")
    return tensors


def read_state_dict(
        path: PathLike,
        what: str = 'checkpoint',
        error: Type[BamModelsError] = CheckpointError,
) -> Dict[str, torch.Tensor]:
    """The tensors of the weight file at `path`, read safely and checked for impossible values.

    `what` names the file in messages ('checkpoint', 'weights of resnet18_bam'); `error` is the class raised.
    """
    if not Path(path).is_file():
        raise error(f"{what} {path} does not exist; pass the path of a .safetensors or .pth file")
    try:
        state_dict = load_state_dict(str(path), use_ema=False, weights_only=True)
    except Exception as e:
        reason = (str(e).splitlines() or [''])[0][:200]
        raise error(
            f"{what} {path} could not be read as weights ({type(e).__name__}: {reason}); "
            f"pass a .safetensors file or a torch state dict (read with weights_only=True, so pickled objects "
            f"are refused)") from None
    return check_state_dict(state_dict, f'{what} {path}', error)


def head_classes(state_dict: Dict[str, torch.Tensor], classifier: Union[str, Sequence[str], None]) -> Optional[int]:
    """Number of classes of the first of `classifier`'s module names found in `state_dict` (None: no head)."""
    names = (classifier,) if isinstance(classifier, str) else tuple(classifier or ())
    for name in names:
        weight = state_dict.get(f'{name}.weight')
        if weight is not None:
            return weight.shape[0]
    return None


class KeyMismatch(NamedTuple):
    missing: List[str]
    unexpected: List[str]
    mismatched: List[str]  # 'key: checkpoint (shape/dtype), model (shape/dtype)'

    def __bool__(self) -> bool:
        return bool(self.missing or self.unexpected or self.mismatched)


def key_mismatch(
        state_dict: Dict[str, torch.Tensor],
        model: nn.Module,
        ignore: Iterable[str] = (),
        ignore_shape: Iterable[str] = (),
) -> KeyMismatch:
    """How `state_dict` differs from `model.state_dict()`.

    Keys in `ignore` are adapted by the caller (may be absent, any shape); keys in `ignore_shape` must be present
    and of a float type where the model's is, but their shape is adapted (timm's input-conv adaptation).
    """
    ignore, ignore_shape = set(ignore), set(ignore_shape)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict and k not in ignore]
    unexpected = sorted(k for k in state_dict if k not in expected and k not in ignore)
    mismatched = []
    for key, value in state_dict.items():
        if key in ignore or key not in expected:
            continue
        want = expected[key]
        if value.shape != want.shape and key not in ignore_shape:
            mismatched.append(f'{key}: checkpoint {tuple(value.shape)}, model {tuple(want.shape)}')
        elif want.is_floating_point() and not value.is_floating_point():
            mismatched.append(f'{key}: checkpoint {value.dtype}, model {want.dtype}')
    return KeyMismatch(missing, unexpected, mismatched)


def _examples(keys: Sequence[str]) -> str:
    more = f', ... ({len(keys) - _EXAMPLES} more)' if len(keys) > _EXAMPLES else ''
    return ', '.join(keys[:_EXAMPLES]) + more


def describe_mismatch(mismatch: KeyMismatch) -> str:
    """'12 missing keys (e.g. a, b, c, ... (9 more)); 3 unexpected keys (...)': only the kinds that occur."""
    parts = [f'{count(len(keys), kind)} (e.g. {_examples(keys)})' for kind, keys in (
        ('missing key', mismatch.missing), ('unexpected key', mismatch.unexpected),
        ('mismatched tensor', mismatch.mismatched)) if keys]
    return '; '.join(parts)


def _classifier(model: nn.Module) -> Sequence[str]:
    names = getattr(model, 'pretrained_cfg', {}).get('classifier') or 'fc'
    return (names,) if isinstance(names, str) else tuple(names)


def _architecture(model: nn.Module) -> str:
    return getattr(model, 'pretrained_cfg', {}).get('architecture') or type(model).__name__


def load_strict(
        model: nn.Module,
        state_dict: Dict[str, torch.Tensor],
        source: str,
        advice: str,
        *,
        keep_fresh_head: bool = False,
        error: Type[BamModelsError] = CheckpointError,
) -> nn.Module:
    """Loads `state_dict` into `model` only if every key, shape and dtype fits; else one `error`.

    With `keep_fresh_head`, a classifier whose class count differs from the model's is not loaded (the model
    keeps its fresh head, to fine-tune on other classes); every other key must still fit."""
    classifier = _classifier(model)
    head_keys = {k for k in model.state_dict() if k.startswith(tuple(f'{name}.' for name in classifier))}
    fresh_head = keep_fresh_head and head_classes(state_dict, classifier) not in (
        None, head_classes(model.state_dict(), classifier))
    if fresh_head:
        state_dict = {k: v for k, v in state_dict.items() if k not in head_keys}
    mismatch = key_mismatch(state_dict, model, ignore=head_keys if fresh_head else ())
    if mismatch:
        raise error(f"{source} does not fit {_architecture(model)}: {describe_mismatch(mismatch)}; {advice}")
    model.load_state_dict(state_dict, strict=not fresh_head)
    return model


def create_sized_model(model_name: str, state_dict: Dict[str, torch.Tensor], **model_kwargs) -> nn.Module:
    """`timm.create_model(model_name, pretrained=False, **model_kwargs)` with as many classes as the classifier
    of `state_dict` has (a 10-class checkpoint gets a 10-class model, not the registered 1000; one without a
    classifier a model without one)."""
    classifier = timm.create_model(model_name, device='meta', **model_kwargs).pretrained_cfg.get('classifier')
    classes = head_classes(state_dict, classifier) or 0
    return timm.create_model(model_name, pretrained=False, **dict(model_kwargs, num_classes=classes))


def model_from_checkpoint(
        model_name: str,
        checkpoint: PathLike,
        suggest: Optional[Callable[[Dict[str, torch.Tensor], str], Optional[str]]] = None,
        **model_kwargs,
) -> nn.Module:
    """`model_name` built without downloads, with a local checkpoint loaded strictly.

    The file is read by `read_state_dict` (no pickled code runs), the size of its classifier sets
    `num_classes`, and a checkpoint of another architecture raises a `CheckpointError` that counts and names
    missing and unexpected keys, and the architecture they fit when `suggest(state_dict, architecture)` finds one.
    """
    state_dict = read_state_dict(checkpoint)
    model = create_sized_model(model_name, state_dict, **model_kwargs)
    advice = 'pass the architecture it was trained as'
    try:
        return load_strict(model, state_dict, f'checkpoint {checkpoint}', advice)
    except CheckpointError as e:
        guess = suggest(state_dict, _architecture(model)) if suggest else None
        if guess is None:
            raise
        raise CheckpointError(f"{str(e)[:-len(advice)]}its keys fit {guess}: pass that model name") from None


def read_data_config(path: PathLike) -> Optional[Dict[str, Any]]:
    """The preprocessing stored in a torch checkpoint of `bam-models train`, as timm data-config keys.

    best.pth holds the resolved `data_config`; last.pth only the run's config, whose `data` section gives
    what was set explicitly. None for a safetensors file or a plain state dict (no preprocessing stored).
    """
    if str(path).endswith('.safetensors'):
        return None
    try:
        raw = torch.load(path, map_location='cpu', weights_only=True)
    except Exception:  # read_state_dict already reported an unreadable file; this one holds no config
        return None
    if not isinstance(raw, dict):
        return None
    if isinstance(raw.get('data_config'), dict):
        return dict(raw['data_config'])
    data = (raw.get('config') or {}).get('data') if isinstance(raw.get('config'), dict) else None
    if not isinstance(data, dict):
        return None
    size = data.get('input_size')
    stored = dict(input_size=(3, size, size) if size else None, interpolation=data.get('interpolation'),
                  crop_pct=data.get('crop_pct'), mean=data.get('mean'), std=data.get('std'))
    return {k: tuple(v) if isinstance(v, list) else v for k, v in stored.items() if v is not None}

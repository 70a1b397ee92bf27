""" `with_attention`: any timm CNN with BAM or CBAM inserted, as a timm model that Hub folders can name.

`timm.create_model('with_attention', base_model='convnext_tiny', attention='bam')` builds timm's convnext_tiny
and runs `insert_bam` on it; `pretrained=True` starts it from the base model's timm weights (the attention
freshly initialised). A folder written by `bam-models insert` or `bam-models train` records
`architecture: with_attention` and the base model in config.json's `model_args`, with the base model's
pretrained_cfg (preprocessing, classifier name), so `timm.create_model('local-dir:FOLDER')` (and `hf-hub:` of
the pushed folder) rebuilds the same network and, with `pretrained=True`, loads its weights with the zoo's
key checks.

Those arguments come from files (config.json of a folder or a Hub repo), so `with_attention` checks them before
any module exists (`check_attention_args`): only the keys BAM / CBAM take, of their types, within the bounds
the layers declare and enforce themselves (`BAM.BOUNDS`, `CBAM.BOUNDS`), an activation only by a name
`timm.layers.get_act_layer` knows; then the whole model is built once on the meta device (no memory), where the
layers' own checks run and every hidden width is compared with its module's channels. A base model that has
attention already (a `with_attention` folder or repo, itself included, or a zoo BAM model) is refused in one line
instead of recursing.
"""
import collections.abc
import contextvars
import inspect
import typing
from functools import partial
from typing import Any, Dict, Optional, Type

import timm
import torch.nn as nn
from timm.layers import get_act_layer
from timm.models import generate_default_cfgs, register_model

from bam_models.errors import BamModelsError, UsageError, did_you_mean, excerpt
from bam_models.layers import BAM, CBAM
from bam_models.layers.bounds import bound_problem
from bam_models.weights import WEIGHT_LOCATION_FIELDS, build_model_with_weights
from .insertion import insert_bam, insert_cbam

__all__ = ['ARCHITECTURE', 'ATTENTIONS', 'check_attention_args', 'with_attention']

ARCHITECTURE = 'with_attention'
# where the base model's weights live and which of its tags they are: not where an inserted model's do
_BASE_WEIGHT_KEYS = (*WEIGHT_LOCATION_FIELDS, 'source', 'tag')


ATTENTIONS = ('bam', 'cbam')
_LAYERS = {'bam': BAM, 'cbam': CBAM}
_SEQUENCES = (collections.abc.Sequence, list, tuple)
_NOT_ARGS = ('self', 'channels', 'device', 'dtype')  # set by the insertion, per module
_building = contextvars.ContextVar('with_attention_building', default=None)


def _accepts(annotation: Any, value: Any) -> bool:
    """Whether a JSON value fits a constructor annotation (int, float, bool, str, Optional[...], Sequence[...])."""
    if typing.get_origin(annotation) in _SEQUENCES:  # CBAM's pool_types: a JSON list of its items
        item = typing.get_args(annotation)[0]
        return isinstance(value, (list, tuple)) and all(_accepts(item, v) for v in value)
    if typing.get_origin(annotation) is typing.Union:
        return any(_accepts(a, value) for a in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, annotation) if isinstance(annotation, type) else False


def check_attention_args(attention: str, attention_args: Any, where: str = 'with_attention: attention_args',
                         error: Type[BamModelsError] = UsageError) -> Dict[str, Any]:
    """`attention_args` checked against what `BAM` / `CBAM` take (see the module docstring); returns them with
    an activation name resolved to timm's layer. Raises `error` naming the first bad key; `where` names the
    arguments in that message (a folder's config.json, a training config key)."""
    if attention not in ATTENTIONS:
        raise error(f"with_attention: attention is {excerpt(attention)}; use one of {', '.join(ATTENTIONS)}")
    if attention_args is None:
        return {}
    if not isinstance(attention_args, dict):
        raise error(f"{where} is {excerpt(attention_args)}; give a mapping of "
                         f"{attention.upper()} arguments such as {{\"rd_ratio\": 0.0625}}")
    params = {name: p for name, p in inspect.signature(_LAYERS[attention]).parameters.items()
              if name not in _NOT_ARGS}
    checked = {}
    for key, value in attention_args.items():
        if key not in params:
            hint = did_you_mean(str(key), params) or f"{attention.upper()} takes {', '.join(params)}"
            raise error(f"{where} key {excerpt(key)} is not an argument of "
                             f"{attention.upper()}; {hint}")
        checked[key] = _checked_value(attention, key, value, params[key].annotation, where, error)
    return checked


def _checked_value(attention: str, key: str, value: Any, annotation: Any, where: str,
                   error: Type[BamModelsError]) -> Any:
    what = f"{where} {key!r} is {excerpt(value)}"
    if key == 'act_layer':
        try:
            return get_act_layer(value) if isinstance(value, str) else _refuse_act(what, error)
        except KeyError:
            return _refuse_act(what, error)
    if not _accepts(annotation, value):
        raise error(f"{what}; {attention.upper()} takes {_type_name(annotation)} there")
    # the layer's own declaration (bam_models.layers.bounds), checked here before any module exists
    problem = bound_problem(_LAYERS[attention].BOUNDS, key, value)
    if problem:
        raise error(f"{what}; {problem}")
    return value


def _refuse_act(what: str, error: Type[BamModelsError]) -> None:
    raise error(f"{what}; name an activation timm knows, such as 'relu', 'silu' or 'gelu' "
                f"(timm.layers.get_act_layer)")


def _type_name(annotation: Any) -> str:
    if typing.get_origin(annotation) in _SEQUENCES:
        return f'a list of {_type_name(typing.get_args(annotation)[0])}'
    names = [getattr(a, '__name__', str(a)) for a in (typing.get_args(annotation) or (annotation,))]
    return ' or '.join('null' if n == 'NoneType' else n for n in names)


def _check_widths(model: nn.Module) -> None:
    """Every hidden width no wider than its module's channels (a bottleneck; rd_channels=10**6 is 36 TB)."""
    for name, module in model.named_modules():
        if isinstance(module, (BAM, CBAM)) and module.rd_channels > module.channels:
            raise UsageError(f"with_attention: attention_args rd_channels is {module.rd_channels} but {name} has "
                             f"{module.channels} channels; use at most the narrowest stage's channels, or rd_ratio")


def _base_cfg(base_model: str) -> Dict[str, Any]:
    """The base model's pretrained_cfg (preprocessing, classifier, first conv) as the inserted model's; read from
    the model timm builds for the name, so `ARCH.TAG`, `hf-hub:` and `local-dir:` names all work."""
    cfg = dict(timm.create_model(base_model, device='meta').pretrained_cfg)
    for key in _BASE_WEIGHT_KEYS:
        cfg.pop(key, None)
    cfg['architecture'] = ARCHITECTURE
    return cfg


def _build(
        base_model: str,
        attention: str,
        attention_args: Optional[Dict[str, Any]],
        replace_existing: bool,
        trunk_pretrained: bool,
        **kwargs,
) -> nn.Module:
    model = timm.create_model(base_model, pretrained=trunk_pretrained, **kwargs)
    if attention == 'bam':
        return insert_bam(model, bam_args=attention_args)
    return insert_cbam(model, cbam_args=attention_args, replace_existing=replace_existing)


default_cfgs = generate_default_cfgs({ARCHITECTURE: dict(url='', license='mit')})


@register_model
def with_attention(
        pretrained: bool = False,
        base_model: Optional[str] = None,
        attention: str = 'bam',
        attention_args: Optional[Dict[str, Any]] = None,
        replace_existing: bool = False,
        pretrained_cfg: Optional[Dict[str, Any]] = None,
        pretrained_cfg_overlay: Optional[Dict[str, Any]] = None,
        **kwargs,
) -> nn.Module:
    """`base_model` (a timm name, optionally with a tag) with BAM (insert_bam) or CBAM (insert_cbam) inserted.

    Without a saved pretrained_cfg (a folder, a Hub repo, or an overlay naming a file) `pretrained=True` loads
    the base model's timm weights before insertion; with one it loads the saved weights after insertion.
    """
    if not base_model or not isinstance(base_model, str):
        raise UsageError("with_attention needs base_model, a timm model name; e.g. timm.create_model("
                         "'with_attention', base_model='convnext_tiny', attention='bam')")
    attention_args = check_attention_args(attention, attention_args)
    if _building.get() is not None:  # timm is building a base_model for a with_attention model
        raise UsageError(f"with_attention: base_model {excerpt(_building.get())} has attention inserted already "
                         f"(a folder or repo written by `bam-models insert`, or one naming itself); name the plain "
                         f"timm model it was made from")
    token = _building.set(base_model)
    try:
        _check_on_meta(base_model, attention, attention_args, replace_existing, kwargs)
        saved = bool(pretrained_cfg) or bool(pretrained_cfg_overlay)
        build = partial(_build, base_model, attention, attention_args, replace_existing, pretrained and not saved)
        return build_model_with_weights(
            build, ARCHITECTURE, pretrained and saved,
            pretrained_cfg=pretrained_cfg if pretrained_cfg else _base_cfg(base_model),
            pretrained_cfg_overlay=pretrained_cfg_overlay,
            feature_cfg=_feature_cfg(base_model) if kwargs.get('features_only') else None,
            **kwargs,
        )
    finally:
        _building.reset(token)


def _check_on_meta(base_model: str, attention: str, attention_args: Dict[str, Any], replace_existing: bool,
                   kwargs: Dict[str, Any]) -> None:
    """The model built once on the meta device (no memory): the layers' own argument checks, the insertion's
    (attention there already, no stage or slot) and the hidden widths, as one line each."""
    meta_kwargs = {k: v for k, v in kwargs.items() if k not in ('features_only', 'out_indices', 'device')}
    try:
        model = _build(base_model, attention, attention_args, replace_existing, False, device='meta',
                       **meta_kwargs)
    except BamModelsError:
        raise
    except ValueError as e:  # the layers' and the insertion's own checks say what to do
        raise UsageError(f"with_attention with base_model {excerpt(base_model)}: {str(e).rstrip('.')[:300]}"
                         ) from None
    except TypeError as e:  # an argument the base model does not take
        raise UsageError(f"with_attention with base_model {excerpt(base_model)}: {str(e)[:300]}; fix or remove "
                         f"that argument (config.json's model_args)") from None
    _check_widths(model)


def _feature_cfg(base_model: str) -> Dict[str, Any]:
    """features_only through forward_intermediates, in which every stage module runs with its attention; by
    default every stage the base model describes."""
    num_stages = len(timm.create_model(base_model, device='meta').feature_info)
    return dict(feature_cls='getter', out_indices=tuple(range(num_stages)))

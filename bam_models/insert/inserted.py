""" `with_attention`: any timm CNN with BAM or CBAM inserted, as a timm model that Hub folders can name.

`timm.create_model('with_attention', base_model='convnext_tiny', attention='bam')` builds timm's convnext_tiny
and runs `insert_bam` on it; `pretrained=True` starts it from the base model's timm weights (the attention
freshly initialised). A folder written by `bam-models insert` or `bam-models train` records
`architecture: with_attention` and the base model in config.json's `model_args`, with the base model's
pretrained_cfg (preprocessing, classifier name), so `timm.create_model('local-dir:FOLDER')` (and `hf-hub:` of
the pushed folder) rebuilds the same network and, with `pretrained=True`, loads its weights with the zoo's
key checks.
"""
from functools import partial
from typing import Any, Dict, Optional

import timm
import torch.nn as nn
from timm.models import generate_default_cfgs, register_model

from bam_models.weights import WEIGHT_LOCATION_FIELDS, build_model_with_weights
from .insertion import insert_bam, insert_cbam

__all__ = ['ARCHITECTURE', 'ATTENTIONS', 'with_attention']

ARCHITECTURE = 'with_attention'
# where the base model's weights live and which of its tags they are: not where an inserted model's do
_BASE_WEIGHT_KEYS = (*WEIGHT_LOCATION_FIELDS, 'source', 'tag')


ATTENTIONS = ('bam', 'cbam')


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
    if not base_model:
        raise TypeError("with_attention needs base_model, e.g. timm.create_model('with_attention', "
                        "base_model='convnext_tiny', attention='bam').")
    if attention not in ATTENTIONS:
        raise ValueError(f"with_attention: attention must be one of {ATTENTIONS}, got {attention!r}.")
    saved = bool(pretrained_cfg) or bool(pretrained_cfg_overlay)
    build = partial(_build, base_model, attention, attention_args, replace_existing, pretrained and not saved)
    return build_model_with_weights(
        build, ARCHITECTURE, pretrained and saved,
        pretrained_cfg=pretrained_cfg if pretrained_cfg else _base_cfg(base_model),
        pretrained_cfg_overlay=pretrained_cfg_overlay,
        feature_cfg=_feature_cfg(base_model) if kwargs.get('features_only') else None,
        **kwargs,
    )


def _feature_cfg(base_model: str) -> Dict[str, Any]:
    """features_only through forward_intermediates, in which every stage module runs with its attention; by
    default every stage the base model describes."""
    num_stages = len(timm.create_model(base_model, device='meta').feature_info)
    return dict(feature_cls='getter', out_indices=tuple(range(num_stages)))

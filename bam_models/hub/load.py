""" One way from a model name (and optionally a weights file) to a model, for every command and caller.

Names are what `timm.create_model` takes: `ARCH`, `ARCH.TAG`, `local-dir:PATH` (a folder with config.json
and weights, as `bam-models train`, `convert` and `publish` write) and `hf-hub:ORG/NAME`. A `checkpoint`
(safetensors, or a torch file such as best.pth/last.pth of `bam-models train`, read by
`bam_models.checkpoint`) replaces the pretrained weights; its classifier sets `num_classes` and the
preprocessing stored in it (input size, mean, std, crop) becomes the model's `pretrained_cfg`, as the
config.json of a `local-dir:` folder does, so `timm.data.resolve_data_config(model=model)` preprocesses as in
training. Every expected failure is a `BamModelsError` whose message says what to do.
"""
import difflib
import json
from pathlib import Path
from typing import Optional

import timm
import torch.nn as nn
from huggingface_hub.errors import HfHubHTTPError
from timm.models import get_pretrained_cfg, split_model_name_tag

from bam_models.checkpoint import read_data_config
from bam_models.errors import PretrainedWeightsError, UsageError
from bam_models.hub.pretrained import model_from_checkpoint

__all__ = ['create_model_from_name']

_LOCAL_DIR, _HF_HUB = 'local-dir:', 'hf-hub:'
_OWN_WEIGHTS = 'pass your weights with --checkpoint FILE or name a local-dir:PATH / hf-hub:ORG/NAME model'


def _close_matches(word: str, choices) -> str:
    matches = difflib.get_close_matches(word, list(choices), n=3, cutoff=0.6)
    return f" (did you mean {', '.join(matches)}?)" if matches else ''


def _check_architecture(arch: str, where: str = '') -> None:
    if not timm.is_model(arch):
        raise UsageError(f"unknown model '{arch}'{where}{_close_matches(arch, timm.list_models())}; "
                         f"see `bam-models list` or timm.list_models()")


def _check_local_dir(name: str) -> None:
    folder = Path(name[len(_LOCAL_DIR):])
    written_by = "pass a folder written by `bam-models train` (OUT/hub), `convert` or `publish`, or timm's save_for_hf"
    if not (folder / 'config.json').is_file():
        raise UsageError(f"{name}: {folder} is not a folder with a config.json; {written_by}")
    try:
        config = json.loads((folder / 'config.json').read_text(encoding='utf-8'))
    except (ValueError, UnicodeDecodeError) as error:
        raise UsageError(f"{name}: {folder / 'config.json'} is not valid JSON ({error}); {written_by}") from None
    if not isinstance(config, dict) or not isinstance(config.get('architecture'), str):
        raise UsageError(f"{name}: {folder / 'config.json'} names no architecture; {written_by}")
    _check_architecture(config['architecture'], f" in {folder / 'config.json'}")


def _check_name(name: str) -> None:
    """Refuse a name no loader can resolve, before any work (or download) starts."""
    if name.startswith(_LOCAL_DIR):
        return _check_local_dir(name)
    if name.startswith(_HF_HUB):
        return None
    arch, tag = split_model_name_tag(name)
    _check_architecture(arch)
    tags = timm.list_pretrained(f'{arch}.*')
    if tag and name not in tags:
        raise UsageError(f"{arch} has no pretrained tag '{tag}' (tags: {', '.join(tags) or 'none'}); "
                         f"pass one of them or the architecture alone")


def _check_has_weights(name: str) -> None:
    if name.startswith((_LOCAL_DIR, _HF_HUB)):
        return
    cfg = get_pretrained_cfg(name)
    if cfg is None or not any(getattr(cfg, key, None) for key in ('url', 'hf_hub_id', 'file', 'state_dict')):
        arch = split_model_name_tag(name)[0]
        tags = ', '.join(t for t in timm.list_pretrained(f'{arch}.*') if t != name) or 'none'
        raise PretrainedWeightsError(f"{name} has no pretrained weights (tags with weights: {tags}); {_OWN_WEIGHTS}")


def create_model_from_name(name: str, checkpoint: Optional[str] = None, pretrained: bool = True,
                           **kwargs) -> nn.Module:
    """The model `name` with the weights of `checkpoint`, else its pretrained weights (`pretrained`), else
    random ones. Raises UsageError (unknown name or tag, no such folder), CheckpointError (missing, unreadable
    or non-fitting file) or PretrainedWeightsError (no or unreachable pretrained weights)."""
    _check_name(name)
    if checkpoint is not None:
        model = model_from_checkpoint(name, checkpoint, **kwargs)
        data_config = read_data_config(checkpoint)
        if data_config:
            model.pretrained_cfg = model.default_cfg = dict(model.pretrained_cfg, **data_config)
        return model
    if not pretrained:
        return timm.create_model(name, pretrained=False, **kwargs)
    _check_has_weights(name)
    try:
        return timm.create_model(name, pretrained=True, **kwargs)
    except (HfHubHTTPError, OSError) as error:  # timm's own downloads (zoo weights raise their own error)
        raise PretrainedWeightsError(
            f"the pretrained weights of {name} could not be downloaded ({type(error).__name__}: "
            f"{str(error).splitlines()[0][:200]}); check the network and HF_ENDPOINT, or {_OWN_WEIGHTS}") from None

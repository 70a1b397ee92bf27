""" One way from a model name (and optionally a weights file) to a model, for every command and caller.

A name is what `timm.create_model` takes: `ARCH[.TAG]` (any timm or zoo model), `local-dir:PATH` (a folder with
config.json and weights, as `bam-models train`, `convert`, `insert` and `publish` write) or
`hf-hub:ORG/NAME[@REVISION]`. The weights come from `checkpoint` when one is given (read by
`bam_models.checkpoint`: no pickled code runs, its classifier sets `num_classes`, and the preprocessing a
`bam-models train` checkpoint stores becomes the model's `pretrained_cfg`, as a folder's config.json does), else
from what the name names (a registry tag, the folder, the repo), else the model is randomly initialised
(`pretrained=False`). Downloads run under one download budget. Every expected failure is one `BamModelsError`
line: an unknown name with its close matches, an unknown tag with the tags there are, a folder without a valid
config.json, a name without weights, an unreachable Hub.
"""
import difflib
import json
from pathlib import Path
from typing import Optional, Union

import timm
import torch.nn as nn
from huggingface_hub.errors import (
    EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled, RepositoryNotFoundError)
from timm.models import get_pretrained_cfg, parse_model_name, split_model_name_tag

from bam_models.checkpoint import read_data_config
from bam_models.errors import BamModelsError, PretrainedWeightsError, UsageError
from bam_models.hub.download import TRANSPORT_ERRORS, bounded_downloads, describe_failure
from bam_models.hub.pretrained import model_from_checkpoint

__all__ = ['create_model_from_name']

_NAME_FORMS = 'ARCH[.TAG], local-dir:PATH or hf-hub:ORG/NAME'
_OWN_WEIGHTS = ('pass your weights with --checkpoint FILE, name a local-dir:PATH / hf-hub:ORG/NAME model, or use '
                'random weights (pretrained=False, --random-init)')
_WRITTEN_BY = ("pass a folder written by `bam-models train` (OUT/hub), `convert`, `insert` or `publish`, or timm's "
               "save_for_hf")


def _check_architecture(arch: str, where: str) -> None:
    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=3, cutoff=0.6)
        hint = f" (close matches: {', '.join(close)})" if close else ''
        raise UsageError(f"unknown model '{arch}'{hint} {where}; see `bam-models list` or timm.list_models()")


def _check_local_dir(name: str, folder: Path) -> None:
    config_file = folder / 'config.json'
    if not folder.is_dir():
        raise UsageError(f"{name}: no such folder; {_WRITTEN_BY}")
    if not config_file.is_file():
        raise UsageError(f"{name}: the folder has no config.json; {_WRITTEN_BY}")
    try:
        config = json.loads(config_file.read_text(encoding='utf-8'))
    except (ValueError, UnicodeDecodeError) as error:
        raise UsageError(f"{name}: {config_file} is not valid JSON ({error}); {_WRITTEN_BY}") from None
    if not isinstance(config, dict) or not isinstance(config.get('architecture'), str):
        raise UsageError(f"{name}: {config_file} names no architecture; {_WRITTEN_BY}")
    _check_architecture(config['architecture'], f'named in {config_file}')


def _check_name(name: str) -> None:
    """Refuse names that cannot work before anything is built or downloaded."""
    source, model_id = parse_model_name(name) if ':' in name else (None, name)
    if source == 'local-dir':
        return _check_local_dir(name, Path(model_id))
    if source == 'hf-hub':
        return None
    arch, tag = split_model_name_tag(model_id)
    _check_architecture(arch, f'in {name!r} (names are {_NAME_FORMS})')
    tags = timm.list_pretrained(f'{arch}.*')
    if tag and name not in tags:
        raise UsageError(f"{arch} has no pretrained tag '{tag}' (tags: {', '.join(tags) or 'none'}); pick one of "
                         f"them or drop the tag")


def _check_has_weights(name: str) -> None:
    """A registry name whose cfg names no weights at all (before timm says so in a traceback)."""
    if ':' in name:
        return
    cfg = get_pretrained_cfg(name)
    if cfg is None or not any(getattr(cfg, key, None) for key in ('url', 'hf_hub_id', 'file', 'state_dict')):
        arch = split_model_name_tag(name)[0]
        tags = ', '.join(t for t in timm.list_pretrained(f'{arch}.*') if t != name) or 'none'
        raise PretrainedWeightsError(f"{name} has no pretrained weights (tags with weights: {tags}); {_OWN_WEIGHTS}")


def _from_checkpoint(name: str, checkpoint: Union[str, Path], **model_kwargs) -> nn.Module:
    model = model_from_checkpoint(name, checkpoint, **model_kwargs)
    data_config = read_data_config(checkpoint)
    if data_config:  # preprocess as in training: resolve_data_config(model=model) reads the pretrained_cfg
        model.pretrained_cfg = model.default_cfg = dict(model.pretrained_cfg, **data_config)
    return model


def _build(name: str, checkpoint: Optional[Union[str, Path]], pretrained: bool, **model_kwargs) -> nn.Module:
    if checkpoint is not None:
        return _from_checkpoint(name, checkpoint, **model_kwargs)
    if pretrained:
        _check_has_weights(name)
    return timm.create_model(name, pretrained=pretrained, **model_kwargs)


def create_model_from_name(
        name: str,
        checkpoint: Optional[Union[str, Path]] = None,
        *,
        pretrained: bool = True,
        **model_kwargs,
) -> nn.Module:
    """The model `name` names, with weights from `checkpoint` if given, else (with `pretrained`) from the name.

    `model_kwargs` go to `timm.create_model`. Raises `UsageError` for a name that cannot work,
    `CheckpointError` for a bad checkpoint and `PretrainedWeightsError` when weights are missing or cannot be
    fetched or verified.
    """
    _check_name(name)
    try:
        with bounded_downloads():
            return _build(name, checkpoint, pretrained, **model_kwargs)
    except BamModelsError:
        raise
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as e:  # no network, and not in the cache
        raise PretrainedWeightsError(f"{name}: the Hub could not be reached and the file is not in the cache "
                                     f"({type(e).__name__}); check the network, HF_ENDPOINT and "
                                     f"HF_HUB_OFFLINE") from None
    except RepositoryNotFoundError:
        raise PretrainedWeightsError(f"{name}: the Hub repository does not exist (or needs a token); check the "
                                     f"name, HF_ENDPOINT and HF_TOKEN") from None
    except EntryNotFoundError:
        raise PretrainedWeightsError(f"{name}: the repository has no config.json, so it is not a timm model "
                                     f"repo; pass the architecture name with a checkpoint file instead") from None
    except (HfHubHTTPError,) + TRANSPORT_ERRORS as e:
        raise PretrainedWeightsError(f"{name}: fetching its weights failed ({describe_failure(e)}); check the "
                                     f"network and HF_ENDPOINT, or {_OWN_WEIGHTS}") from None
    except RuntimeError as e:
        message = str(e)
        if message.startswith('Unknown model'):  # the architecture a repo's config.json names
            _check_architecture(message.split('(', 1)[-1].rstrip(')'), f'named by the config.json of {name}')
        if 'pretrained weights' in message.lower():
            raise PretrainedWeightsError(f"{name} has no pretrained weights ({describe_failure(e)}); "
                                         f"{_OWN_WEIGHTS}") from None
        raise

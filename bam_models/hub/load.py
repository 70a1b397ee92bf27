""" One way from a model name to a model, for every command and for library users.

A name is `ARCH[.TAG]` (any timm or zoo model), `local-dir:PATH` (a Hub-format folder) or
`hf-hub:ORG/NAME[@REVISION]`; the weights come from a checkpoint file when one is given, else from what the name
names (a registry tag, the folder, the repo), else the model is randomly initialised (`pretrained=False`).
Every expected failure is one `BamModelsError` line: an unknown name with its close matches, an unknown tag
with the tags there are, a folder without config.json, a name without weights, an unreachable Hub.
"""
import difflib
from pathlib import Path
from typing import Optional, Union

import timm
import torch.nn as nn
from huggingface_hub.errors import (
    EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled, RepositoryNotFoundError)
from timm.models import parse_model_name, split_model_name_tag

from bam_models.errors import BamModelsError, PretrainedWeightsError, UsageError
from bam_models.hub.download import TRANSPORT_ERRORS, bounded_downloads, describe_failure
from bam_models.hub.pretrained import model_from_checkpoint

__all__ = ['create_model_from_name']

_NAME_FORMS = 'ARCH[.TAG], local-dir:PATH or hf-hub:ORG/NAME'


def _check_architecture(arch: str, what: str) -> None:
    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=3, cutoff=0.6)
        hint = f" (close matches: {', '.join(close)})" if close else ''
        raise UsageError(f"unknown model '{arch}'{hint} {what}; see `bam-models list` or timm.list_models()")


def _check_name(name: str) -> None:
    """Refuse names that cannot work before anything is built or downloaded."""
    source, model_id = parse_model_name(name) if ':' in name else (None, name)
    if source == 'local-dir':
        folder = Path(model_id)
        if not folder.is_dir():
            raise UsageError(f"{name}: no such folder; pass a folder written by `bam-models train`/`convert`/"
                             f"`publish` or timm's save_for_hf")
        if not (folder / 'config.json').is_file():
            raise UsageError(f"{name}: the folder has no config.json; pass a Hub-format folder (config.json + "
                             f"model.safetensors), or the architecture name with a checkpoint file")
        return
    if source == 'hf-hub':
        return
    arch, tag = split_model_name_tag(model_id)
    _check_architecture(arch, f'in {name!r} (names are {_NAME_FORMS})')
    if tag:
        try:
            timm.models.get_pretrained_cfg(name, allow_unregistered=False)
        except RuntimeError:
            tags = ', '.join(timm.list_pretrained(f'{arch}.*')) or 'none'
            raise UsageError(f"{arch} has no pretrained tag '{tag}' (tags: {tags}); pick one of them or "
                             f"drop the tag") from None


def _without_weights(name: str, error: Exception) -> PretrainedWeightsError:
    return PretrainedWeightsError(
        f"{name} has no pretrained weights ({describe_failure(error)}); pass a checkpoint file, a "
        f"local-dir:/hf-hub: name that holds weights, or pretrained=False for random weights")


def create_model_from_name(
        name: str,
        checkpoint: Optional[Union[str, Path]] = None,
        *,
        pretrained: bool = True,
        **model_kwargs,
) -> nn.Module:
    """The model `name` names, with weights from `checkpoint` if given, else (with `pretrained`) from the name.

    `checkpoint` is read by `bam_models.checkpoint` (no pickled code runs; its classifier sets num_classes; keys
    checked strictly); `model_kwargs` go to `timm.create_model`. Downloads (config.json and weights of an
    `hf-hub:` name, registry weights) run under one download budget. Raises `UsageError` for a name that
    cannot work, `CheckpointError` for a bad checkpoint and `PretrainedWeightsError` when weights are missing
    or cannot be fetched or verified.
    """
    _check_name(name)
    try:
        with bounded_downloads():
            if checkpoint is not None:
                return model_from_checkpoint(name, checkpoint, **model_kwargs)
            return timm.create_model(name, pretrained=pretrained, **model_kwargs)
    except BamModelsError:
        raise
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as e:  # no network, and not in the cache
        raise PretrainedWeightsError(f"{name}: the Hub could not be reached and its config.json is not in the "
                                     f"cache ({type(e).__name__}); check the network, HF_ENDPOINT and "
                                     f"HF_HUB_OFFLINE") from None
    except RepositoryNotFoundError:
        raise PretrainedWeightsError(f"{name}: the Hub repository does not exist (or needs a token); check the "
                                     f"name, HF_ENDPOINT and HF_TOKEN") from None
    except EntryNotFoundError:
        raise PretrainedWeightsError(f"{name}: the repository has no config.json, so it is not a timm model "
                                     f"repo; pass the architecture name with a checkpoint file instead") from None
    except (HfHubHTTPError,) + TRANSPORT_ERRORS as e:
        raise PretrainedWeightsError(
            f"{name}: fetching it failed ({describe_failure(e)}); check the network, "
            f"HF_ENDPOINT and HF_HUB_OFFLINE, or retry later") from None
    except RuntimeError as e:
        message = str(e)
        if message.startswith('Unknown model'):  # the architecture a folder's or repo's config.json names
            _check_architecture(message.split('(', 1)[-1].rstrip(')'), f'named by the config.json of {name}')
        if 'pretrained weights' in message.lower():
            raise _without_weights(name, e) from None
        raise

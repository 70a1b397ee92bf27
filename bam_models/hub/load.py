""" One way from a model name (and optionally a weights file) to a model, for every command and the trainer.

A name is what `timm.create_model` takes: `ARCH[.TAG]` (any timm or zoo model), `local-dir:PATH` (a folder with
config.json and weights, as `bam-models train`, `convert`, `insert` and `publish` write) or
`hf-hub:ORG/NAME[@REVISION]`. `check_model_name` refuses a name that cannot work before anything is built or
downloaded; it is the one name check (did-you-mean, tags, folders) of every command and of `bam-models train`.

A tag is a name timm's registry knows (`timm.models.get_arch_pretrained_cfgs`): the zoo registers one per
weights-manifest entry, published or not, so `resnet50_bam.official_in1k` is a valid name to build randomly
initialised (pretrained=False); with pretrained=True a tag whose manifest entry is not published is refused
with the manifest's status and what to use instead.

`create_model_from_name` builds the model. Its weights come from `checkpoint` when one is given (read by
`bam_models.checkpoint`: no pickled code runs, its classifier sets `num_classes`, and the preprocessing a
`bam-models train` checkpoint stores becomes the model's `pretrained_cfg`, as a folder's config.json does), else
from what the name names (a registry tag, the folder, the repo), else the model is randomly initialised
(`pretrained=False`). Downloads run under one download budget; a failed download is described by
`bam_models.weights.download.describe_hub_error`, as in the verified build.
"""
import json
import math
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple, Type, Union

import timm
import torch
import torch.nn as nn
from timm.models import get_arch_pretrained_cfgs, get_pretrained_cfg, parse_model_name, split_model_name_tag

from bam_models._compat import hf_split
from bam_models.checkpoint import head_classes, key_mismatch, model_from_checkpoint, read_data_config
from bam_models.errors import BamModelsError, PretrainedWeightsError, UsageError, did_you_mean, excerpt
from bam_models.models import list_zoo_models
from bam_models.weights import HUB_FILENAME, WEIGHT_LOCATION_FIELDS, check_published
from bam_models.weights.download import bounded_downloads, describe_hub_error

__all__ = ['MAX_INPUT_SIDE', 'check_model_name', 'check_preprocessing', 'create_model_from_name',
           'fitting_architecture']

_OWN_WEIGHTS = ('pass your weights with --checkpoint FILE, name a local-dir:PATH / hf-hub:ORG/NAME model, or use '
                'random weights (pretrained=False, --random-init)')
_WRITTEN_BY = ("pass a folder written by `bam-models train` (OUT/hub), `convert`, `insert` or `publish`, or timm's "
               "save_for_hf")


def _check_architecture(arch: str, where: str, error: Type[BamModelsError]) -> None:
    if not timm.is_model(arch):
        hint = did_you_mean(arch, timm.list_models()) or 'see `bam-models list` or timm.list_models()'
        raise error(f"unknown model '{arch}'{where}; {hint}")


def _check_local_dir(name: str, folder: Path, error: Type[BamModelsError]) -> None:
    config_file = folder / 'config.json'
    if not folder.is_dir():
        raise error(f"{name}: no such folder (so it has no config.json); {_WRITTEN_BY}")
    if not config_file.is_file():
        raise error(f"{name}: the folder has no config.json; {_WRITTEN_BY}")
    try:
        config = json.loads(config_file.read_text(encoding='utf-8'))
    except (ValueError, UnicodeDecodeError) as e:
        raise error(f"{name}: {config_file} is not valid JSON ({e}); {_WRITTEN_BY}") from None
    if not isinstance(config, dict) or not isinstance(config.get('architecture'), str):
        raise error(f"{name}: {config_file} names no architecture; {_WRITTEN_BY}")
    _check_architecture(config['architecture'], f' named in {config_file}', error)
    if isinstance(config.get('pretrained_cfg'), dict):  # timm asserts on a malformed input_size while building
        check_preprocessing(config['pretrained_cfg'], name, 'fix the pretrained_cfg of its config.json', error)
    _check_size_against_weights(name, folder, error)


def _check_size_against_weights(name: str, folder: Path, error: Type[BamModelsError]) -> None:
    """A folder whose config.json describes far more parameters than its weights file holds (at least one byte
    each) is refused before the model is allocated: counted on the meta device."""
    weights = next((folder / f for f in (HUB_FILENAME, 'pytorch_model.bin') if (folder / f).is_file()), None)
    if weights is None:  # nothing to compare with; loading pretrained weights reports the missing file
        return
    try:
        model = timm.create_model(name, device='meta')
    except BamModelsError:
        raise
    except (TypeError, ValueError) as e:  # model_args the architecture does not take
        raise error(f"{name}: the config.json's model_args cannot build {excerpt(str(e), 200)}; {_WRITTEN_BY}"
                    ) from None
    num_params = sum(p.numel() for p in model.parameters())
    size = weights.stat().st_size
    if num_params > size:
        raise error(f"{name}: its config.json describes a model of {num_params:,} parameters but {weights.name} "
                    f"holds {size:,} bytes, less than one per parameter; the config.json was changed after the "
                    f"weights were written: {_WRITTEN_BY}")


def _source_and_id(name: str, error: Type[BamModelsError]) -> Tuple[Optional[str], str]:
    try:
        return parse_model_name(name)
    except ValueError as e:  # an unknown 'source:' prefix
        raise error(f"{e}; names are ARCH[.TAG], local-dir:PATH or hf-hub:ORG/NAME") from None


def _registry_tags(arch: str) -> list:
    """Every tag timm's registry has for `arch` (published weights or not), without the untagged default."""
    return [tag for tag in (split_model_name_tag(name)[1] for name in get_arch_pretrained_cfgs(arch)) if tag]


def _check_has_weights(model_id: str) -> None:
    """A registry name without weights to load: an unpublished manifest entry, or a cfg that names none."""
    arch, tag = split_model_name_tag(model_id)
    cfg = get_pretrained_cfg(model_id)
    check_published(arch, tag or getattr(cfg, 'tag', None))  # a bare name means timm's default tag
    if cfg is None or not any(getattr(cfg, key, None) for key in WEIGHT_LOCATION_FIELDS):
        tags = ', '.join(t for t in timm.list_pretrained(f'{arch}.*') if t != model_id) or 'none'
        raise PretrainedWeightsError(
            f"{model_id} has no pretrained weights (tags with weights: {tags}); {_OWN_WEIGHTS}")


def check_model_name(
        name: str,
        *,
        pretrained: bool = False,
        where: str = '',
        error: Type[BamModelsError] = UsageError,
) -> None:
    """Refuses a model name that cannot work, before anything is built or downloaded.

    Raises `error` (a `BamModelsError`; `UsageError` by default, `ConfigError` for the trainer) for an unknown
    architecture (with close spellings), an unknown tag (with the tags there are) or a `local-dir:` folder
    without a valid config.json; with `pretrained`, a `PretrainedWeightsError` for a registry name that has no
    weights to load. `where` says where the name came from (' in model.name').
    """
    source, model_id = _source_and_id(name, error)
    if source == 'local-dir':
        return _check_local_dir(name, Path(model_id), error)
    if source == 'hf-hub':
        return None
    arch, tag = split_model_name_tag(model_id)
    _check_architecture(arch, where, error)
    tags = _registry_tags(arch)
    if tag and tag not in tags:
        raise error(f"model '{arch}' has no tag '{tag}'; its tags: {', '.join(tags) or 'none'}")
    if pretrained:
        _check_has_weights(model_id)
    return None


_STEM_KEYS = ('conv1.weight', 'features.init_block.conv.conv.weight', 'features.init_block.conv.weight',
              'features.init_block.weight', 'stem.conv.weight')


def _zoo_candidates(state_dict: Dict[str, torch.Tensor], exclude: str) -> List[str]:
    """Zoo models worth trying for a checkpoint that did not fit `exclude`: those with its attention kind, and the
    CIFAR networks only for a 3x3 stem conv."""
    state_dict = {k[len('module.'):] if k.startswith('module.') else k: v for k, v in state_dict.items()}
    keys = ' '.join(state_dict)
    kind = '_cbam' if 'cbam' in keys or '.se.spatial_gate' in keys else '_bam' if 'bam' in keys else ''
    stem = next((state_dict[k] for k in _STEM_KEYS if k in state_dict), None)
    cifar = stem is not None and stem.dim() == 4 and stem.shape[-1] == 3
    return [name for name in list_zoo_models() if name != exclude and ('_cifar' in name) == cifar
            and (name.endswith(kind) if kind else not name.endswith(('_bam', '_cbam')))]


def _fits_as_is(state_dict: Dict[str, torch.Tensor], name: str) -> bool:
    classifier = timm.create_model(name, device='meta').pretrained_cfg.get('classifier')
    classes = head_classes(state_dict, classifier) or 0
    return not key_mismatch(state_dict, timm.create_model(name, device='meta', num_classes=classes))


def fitting_architecture(
        state_dict: Dict[str, torch.Tensor],
        exclude: str,
        fits: Optional[Callable[[str], bool]] = None,
) -> Optional[str]:
    """The zoo model other than `exclude` whose keys, shapes and dtypes `state_dict` fits exactly, if one does:
    what a message suggests for a checkpoint given with the wrong architecture. `fits(name)` decides for a
    state dict of another layout (convert's sources); by default it is loaded as it is (on the meta device)."""
    fits = fits or (lambda name: _fits_as_is(state_dict, name))
    for name in _zoo_candidates(state_dict, exclude):
        try:
            if fits(name):
                return name
        except (RuntimeError, ValueError, KeyError):  # a layout this candidate cannot be built or sized for
            continue
    return None


def _from_checkpoint(name: str, checkpoint: Union[str, Path], **model_kwargs) -> nn.Module:
    model = model_from_checkpoint(name, checkpoint, suggest=fitting_architecture, **model_kwargs)
    data_config = read_data_config(checkpoint)
    if data_config:  # preprocess as in training: resolve_data_config(model=model) reads the pretrained_cfg
        model.pretrained_cfg = model.default_cfg = dict(model.pretrained_cfg, **data_config)
    return model


def _build(name: str, checkpoint: Optional[Union[str, Path]], pretrained: bool, **model_kwargs) -> nn.Module:
    if checkpoint is not None:
        return _from_checkpoint(name, checkpoint, **model_kwargs)
    return timm.create_model(name, pretrained=pretrained, **model_kwargs)


def _hub_failure(name: str, error: Exception) -> Optional[PretrainedWeightsError]:
    """A download timm ran itself failed (a timm model's weights, an `hf-hub:` repo's config.json)."""
    source, model_id = parse_model_name(name)
    repo_id = hf_split(model_id)[0] if source == 'hf-hub' else None
    described = describe_hub_error(error, repo_id=repo_id, filename='config.json' if repo_id else None)
    return PretrainedWeightsError(f"{name}: {described[0]}; {described[1]}") if described else None


# far above any pretrained cfg (timm's largest are about 1,000 px); one 100,000 px image alone is 120 GB
MAX_INPUT_SIDE = 4096


def check_preprocessing(cfg: Dict[str, object], source: str, fix: str,
                        error: Type[BamModelsError] = UsageError) -> None:
    """The preprocessing a folder's config.json or a checkpoint's data_config gives a model (the entries it has),
    checked before any image is resized by it: a few bytes could ask for images of 100,000 px (or resize to
    input / crop_pct) or hold values no transform takes."""
    size, crop_pct = cfg.get('input_size', (3, 1, 1)), cfg.get('crop_pct', 1.0)
    problem = None
    if not (isinstance(size, (list, tuple)) and len(size) == 3 and all(_whole(v) and v >= 1 for v in size)
            and size[0] <= 4):
        problem = f"input_size {excerpt(size)} is not (channels, height, width)"
    elif not (_number(crop_pct) and 0 < crop_pct and max(size[1:]) / crop_pct <= MAX_INPUT_SIDE):
        problem = (f"input_size {list(size)} with crop_pct {excerpt(crop_pct)} resizes images to more than "
                   f"{MAX_INPUT_SIDE} px")
    for key in ('mean', 'std'):
        value = cfg.get(key)
        if not problem and value is not None and not (
                isinstance(value, (list, tuple)) and value and all(_number(v) for v in value)
                and (key == 'mean' or min(value) > 0)):
            problem = f"{key} {excerpt(value)} is not a list of {'positive ' if key == 'std' else ''}numbers"
    if problem:
        raise error(f"the preprocessing stored with {source} is unusable: {problem}; {fix}")


def _whole(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


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
    check_model_name(name, pretrained=pretrained and checkpoint is None)
    try:
        with bounded_downloads():
            model = _build(name, checkpoint, pretrained, **model_kwargs)
        check_preprocessing(model.pretrained_cfg, *(
            (f'checkpoint {checkpoint}', "save it again with the data_config of the run's own config")
            if checkpoint else (name, "fix the pretrained_cfg of its config.json")))
        return model
    except BamModelsError:
        raise
    except Exception as e:
        failure = _hub_failure(name, e)
        if failure is not None:
            raise failure from None
        message = str(e)
        if isinstance(e, RuntimeError) and message.startswith('Unknown model'):  # named by a repo's config.json
            _check_architecture(message.split('(', 1)[-1].rstrip(')'), f' named by the config.json of {name}',
                                UsageError)
        if isinstance(e, RuntimeError) and 'pretrained weights' in message.lower():
            raise PretrainedWeightsError(f"{name} has no pretrained weights ({message.splitlines()[0][:200]}); "
                                         f"{_OWN_WEIGHTS}") from None
        raise

""" The verified build: pretrained weights through timm and the Hugging Face Hub, checked before they load.

`build_model_with_weights` is what every zoo `_create_*` builder calls. Without `pretrained` it is timm's
`build_model_with_cfg`. With it, the weights are first resolved and read here:

- a registry tag (`resnet50_bam.official_in1k`) is looked up in the weights manifest: an unpublished entry is
  refused; otherwise `hf_hub_download` fetches the file at the pinned revision (honouring `HF_ENDPOINT`,
  `HF_HUB_OFFLINE`, the HF cache and `cache_dir`) and its sha256 and size are checked before the bytes are
  parsed as safetensors; a file that fails is evicted from the cache so a retry downloads it again;
- `hf-hub:org/repo[@rev]` names fetch only `model.safetensors` (nothing downloaded is ever unpickled), verified
  when the repo is in the manifest;
- local files (`pretrained_cfg_overlay=dict(file=...)`, `local-dir:`) are read by `bam_models.checkpoint`
  (`weights_only=True`);
- a config.json of a Hub repo or `local-dir:` folder may not say where the weights come from (any of
  `WEIGHT_LOCATION_FIELDS`, the fields of timm's `PretrainedCfg` that locate weights): the weights of
  `hf-hub:R` come from repo R, those of `local-dir:P` from folder P, and a config naming another source is
  refused;
- every download runs under `bounded_downloads` (timeouts and a total budget); every transport failure is one
  `PretrainedWeightsError`, and a cached copy that fails its checks is evicted so a retry downloads it again;
- every state dict is checked by `bam_models.checkpoint` for NaN/Inf, negative BatchNorm variances and
  integer/bool tensors where the model has floats.

The state dict then goes through timm's own `load_pretrained` (input-conv adaptation, classifier dropped when
`num_classes` differs), with `num_classes` of the cfg taken from the checkpoint's classifier, and a key check
that names missing/unexpected keys. A trunk checkpoint (all and only the BAM/CBAM tensors missing) loads with
a `TrunkOnlyWeightsWarning`; anything else missing is an error.
"""
import hashlib
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence, Tuple, Union

import safetensors.torch
import torch
import torch.nn as nn
from huggingface_hub import hf_hub_download
from timm.models import build_model_with_cfg, resolve_pretrained_cfg

from bam_models._compat import hf_split
from bam_models.checkpoint import check_state_dict, describe_mismatch, head_classes, key_mismatch, read_state_dict
from bam_models.errors import PretrainedWeightsError
from bam_models.layers import attention_keys
from bam_models.weights.download import bounded_downloads, describe_hub_error
from bam_models.weights.manifest import load_manifest, manifest_entry, manifest_entry_for_repo

__all__ = [
    'HUB_FILENAME', 'PretrainedWeightsError', 'TrunkOnlyWeightsWarning', 'UnverifiedWeightsWarning',
    'WEIGHT_LOCATION_FIELDS', 'build_model_with_weights', 'check_published', 'file_sha256',
]

HUB_FILENAME = 'model.safetensors'
# the fields of timm's PretrainedCfg that say where weights come from (timm's save_for_hf never writes them into
# a config.json); `source` and `custom_load` only say how the named location is read
WEIGHT_LOCATION_FIELDS = ('url', 'file', 'state_dict', 'hf_hub_id', 'hf_hub_filename')


class TrunkOnlyWeightsWarning(UserWarning):
    """Only the plain trunk was loaded; the attention modules are freshly initialised."""


class UnverifiedWeightsWarning(UserWarning):
    """The weight file was loaded without a known sha256 to check it against."""


@dataclass
class _WeightSource:
    """Where the weights of one load come from, for messages and checks."""
    model: str  # 'arch.tag' or the name the user gave
    where: str  # 'repo R, revision V, file F' or 'file P'
    kind: Optional[str] = None  # manifest kind: 'full' / 'trunk'; None when unknown (local file, foreign repo)
    trunk_of: Optional[str] = None

    def error(self, problem: str, advice: str) -> PretrainedWeightsError:
        return PretrainedWeightsError(
            f"cannot load pretrained weights for {self.model} ({self.where}): {problem}; {advice}")

    @property
    def what(self) -> str:
        """How `bam_models.checkpoint` names these weights in its messages."""
        return f'pretrained weights for {self.model} ({self.where})'


def file_sha256(path: Union[str, Path]) -> str:
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 20), b''):
            digest.update(chunk)
    return digest.hexdigest()


def _evict_cached_file(path: str) -> None:
    """Remove a cached download (the snapshot link and the blob it points to) so that it is fetched again."""
    blob = os.path.realpath(path)
    for p in {path, blob}:
        try:
            os.remove(p)
        except FileNotFoundError:
            pass


def _hub_download(source: _WeightSource, repo_id: str, filename: str, revision: Optional[str], cache_dir) -> str:
    """`hf_hub_download` under the download budget, every failure turned into one PretrainedWeightsError."""
    try:
        with bounded_downloads():
            return hf_hub_download(repo_id, filename, revision=revision, cache_dir=cache_dir, library_name='bam_models')
    except PretrainedWeightsError as e:  # the download budget ran out, or its setting is invalid
        problem, _, advice = str(e).partition('; ')
        raise source.error(problem, advice) from None
    except Exception as e:
        described = describe_hub_error(e, repo_id, filename, revision, cache_dir)
        if described is None:
            raise
        raise source.error(*described) from None


def _download_verified(
        source: _WeightSource,
        repo_id: str,
        filename: str,
        revision: Optional[str],
        sha256: Optional[str],
        size: Optional[int],
        unverified_reason: str,
        cache_dir: Optional[Union[str, Path]],
) -> Dict[str, torch.Tensor]:
    if not filename.endswith('.safetensors'):
        raise source.error(
            f"{filename} is not a safetensors file",
            "bam_models loads only safetensors from the Hub and never unpickles a download; convert the file "
            "with `bam-models convert` or load it from disk with pretrained_cfg_overlay=dict(file=...)")
    path = _hub_download(source, repo_id, filename, revision, cache_dir)
    data = Path(path).read_bytes()
    actual = hashlib.sha256(data).hexdigest()
    evicted = ("the bad copy was removed from the cache: retry to download it again (if it fails again, the Hub "
               "copy itself is bad: report it)")
    if sha256 is None:
        warnings.warn(
            f"{source.model}: {source.where} is not verified ({unverified_reason}); sha256 of the file read: "
            f"{actual}.", UnverifiedWeightsWarning, stacklevel=5)
    elif actual != sha256 or (size is not None and len(data) != size):
        _evict_cached_file(path)
        raise source.error(
            f"the file is corrupt or has been tampered with: sha256 {actual} ({len(data)} bytes), "
            f"expected {sha256} ({size} bytes)", evicted)
    try:
        state_dict = safetensors.torch.load(data)
    except Exception as e:  # a truncated or damaged copy: without a known sha256 this is where it shows
        _evict_cached_file(path)
        raise source.error(f"{filename} is not a readable safetensors file ({e})", evicted) from None
    return check_state_dict(state_dict, source.what, PretrainedWeightsError)


def _refuse_redirection(cfg: Any) -> None:
    """A config.json of a Hub repo or a `local-dir:` folder may not choose where the weights come from.

    timm's parser already replaces `hf_hub_id`/`source` (Hub) and `file`/`source` (folder) with what the user
    named; any other source field left in the cfg came from the downloaded file and is refused."""
    if not isinstance(cfg, dict) or cfg.get('source') not in ('hf-hub', 'local-dir'):
        return
    own = 'hf_hub_id' if cfg['source'] == 'hf-hub' else 'file'
    named = [k for k in WEIGHT_LOCATION_FIELDS if k != own and cfg.get(k) not in (None, '', {}, [])]
    if named:
        where = f"Hub repo {cfg['hf_hub_id']}" if cfg['source'] == 'hf-hub' else f"folder {cfg['file']}"
        raise PretrainedWeightsError(
            f"the config.json of {where} names its own weight source ({', '.join(named)}), which could load "
            f"weights from outside it and skip their verification; remove these fields from its pretrained_cfg "
            f"(timm's save_for_hf never writes them), or load a file you trust with "
            f"pretrained_cfg_overlay=dict(file=...)")


def _local_dir_weights(folder: Path, source: _WeightSource) -> Dict[str, torch.Tensor]:
    """The weight file of a Hub-format folder, read from that folder only."""
    for name in (HUB_FILENAME, 'pytorch_model.bin'):
        path = folder / name
        if path.is_file():
            if folder.resolve() not in path.resolve().parents:
                raise source.error(f"{name} links to {path.resolve()}, outside the folder",
                                   "a local-dir: folder is read on its own: copy the weights file into it")
            return read_state_dict(path, source.what, PretrainedWeightsError)
    raise source.error(f"the folder has no {HUB_FILENAME} (nor pytorch_model.bin)",
                       "pass a folder written by `bam-models convert`/`publish`/`train` (model.safetensors + "
                       "config.json)")


def _hub_repo_weights(cfg: Dict[str, Any], model: str, manifest, cache_dir) -> Tuple[Dict, _WeightSource]:
    """`hf-hub:` weights: model.safetensors of that repo, pinned and verified when the manifest knows it."""
    repo_id, revision = hf_split(cfg['hf_hub_id'])
    entry = manifest_entry_for_repo(repo_id, manifest)
    if entry is not None and revision in (None, entry['revision']):
        revision = entry['revision']
        filename = entry['filename']
    else:
        entry = None
        filename = cfg.get('hf_hub_filename') or HUB_FILENAME  # only a caller's overlay can set it
    source = _WeightSource(
        model, f"repo {repo_id}, revision {revision or 'main'}, file {filename}", kind=entry['kind'] if entry else None)
    return _download_verified(
        source, repo_id, filename, revision,
        sha256=entry['sha256'] if entry else None,
        size=entry['size'] if entry else None,
        unverified_reason=(entry or {}).get('unverified_reason', f'{repo_id} is not in the weights manifest'),
        cache_dir=cache_dir,
    ), source


def _resolve_weights(cfg: Dict[str, Any], variant: str, cache_dir) -> Tuple[Dict[str, torch.Tensor], _WeightSource]:
    """The state dict named by a resolved pretrained cfg, read and verified."""
    architecture = cfg.get('architecture') or variant
    tag = cfg.get('tag')
    model = f'{architecture}.{tag}' if tag else architecture
    if cfg.get('source') == 'local-dir':
        source = _WeightSource(model, f"local folder {cfg['file']}")
        return _local_dir_weights(Path(cfg['file']), source), source
    if cfg.get('source') == 'hf-hub':
        return _hub_repo_weights(cfg, model, load_manifest(), cache_dir)
    if cfg.get('state_dict') is not None:
        source = _WeightSource(model, 'state dict in pretrained_cfg')
        return check_state_dict(cfg['state_dict'], source.what, PretrainedWeightsError), source
    if cfg.get('file'):
        source = _WeightSource(model, f"file {cfg['file']}")
        return read_state_dict(cfg['file'], source.what, PretrainedWeightsError), source
    return _registry_weights(architecture, tag, model, cache_dir)


def _registry_weights(architecture: str, tag: Optional[str], model: str, cache_dir) -> Tuple[Dict, _WeightSource]:
    """`ARCH.TAG` weights: the manifest entry's file at its pinned revision, verified."""
    manifest = load_manifest()
    entry = manifest_entry(architecture, tag, manifest)
    if entry is None:
        tags = sorted(e['tag'] for e in manifest['weights'].values() if e['architecture'] == architecture)
        available = ', '.join(f'{architecture}.{t}' for t in tags) or 'none'
        raise PretrainedWeightsError(
            f"{model} has no pretrained weights in the weights manifest (available tags: {available}); "
            f"trunk tags load timm's ImageNet weights of the plain architecture and leave BAM/CBAM freshly "
            f"initialised (fine-tune before use); or use pretrained=False")
    revision = entry['revision'] or ('main, unpinned' if entry['published'] else 'none pinned')
    where = f"repo {entry['hf_hub_id']}, revision {revision}, file {entry['filename']}"
    source = _WeightSource(model, where, kind=entry['kind'], trunk_of=entry['source'].get('trunk_of'))
    check_published(architecture, tag, manifest)
    return _download_verified(
        source, entry['hf_hub_id'], entry['filename'], entry['revision'], entry['sha256'], entry['size'],
        entry.get('unverified_reason', ''), cache_dir,
    ), source


def check_published(architecture: str, tag: Optional[str], manifest: Optional[Dict[str, Any]] = None) -> None:
    """Refuses `architecture.tag` when its manifest entry is not published (yet), with what to use instead.

    A tag without a manifest entry is not this function's business (timm's own tags, `resnet18_bam` bare)."""
    manifest = manifest if manifest is not None else load_manifest()
    entry = manifest_entry(architecture, tag, manifest)
    if entry is None or entry['published']:
        return
    trunks = [f"{architecture}.{e['tag']}" for e in manifest['weights'].values()
              if e['architecture'] == architecture and e['kind'] == 'trunk' and e['published']]
    trunk_hint = (f"the trunk tag {' / '.join(trunks)} (attention freshly initialised, fine-tune it)" if trunks
                  else 'no trunk tag')
    where = f"repo {entry['hf_hub_id']}, revision {entry['revision'] or 'none pinned'}, file {entry['filename']}"
    raise _WeightSource(f'{architecture}.{tag}', where).error(
        "these weights are not published yet (manifest: published=false)",
        f"use pretrained=False, {trunk_hint}, or convert the original checkpoint yourself (`bam-models convert`) "
        f"and load it with pretrained_cfg_overlay=dict(file='.../model.safetensors')")


def _key_check(source: _WeightSource, classifier: Sequence[str], first_conv: Sequence[str]) -> Callable:
    """timm `filter_fn`: `key_mismatch`, except that a trunk (all and only the BAM/CBAM tensors missing) loads."""
    # timm adapts these itself after the filter: the classifier to num_classes, the stem conv to in_chans
    adapted = {f'{name}.{p}' for name in classifier for p in ('weight', 'bias')}
    stem = {f'{name}.weight' for name in first_conv}

    def check(state_dict: Dict[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
        mismatch = key_mismatch(state_dict, model, ignore=adapted, ignore_shape=stem)
        attention = attention_keys(model)
        # a trunk lacks all and only the attention tensors; a manifest 'full' entry that lacks them is broken
        is_trunk = bool(mismatch.missing) and set(mismatch.missing) == set(attention) and not (
            mismatch.unexpected or mismatch.mismatched) and source.kind != 'full'
        if is_trunk:
            mismatch = mismatch._replace(missing=[])
        elif source.kind == 'trunk' and not mismatch:
            mismatch = mismatch._replace(
                unexpected=['(a trunk entry whose file holds BAM/CBAM weights: fix its kind in the manifest)'])
        if mismatch:
            raise source.error(
                f"the checkpoint does not fit {type(model).__name__} '{model.pretrained_cfg.get('architecture')}': "
                f"{describe_mismatch(mismatch)}",
                "it was saved from another architecture or with other arguments; pick the matching model name")
        if is_trunk:
            trunk = f' of {source.trunk_of}' if source.trunk_of else ''
            warnings.warn(
                f"{source.model}: loaded only the plain ImageNet trunk{trunk} ({source.where}); the "
                f"{len(attention)} BAM/CBAM tensors are freshly initialised. This is not a BAM/CBAM checkpoint: "
                f"fine-tune the model before using it.", TrunkOnlyWeightsWarning, stacklevel=2)
            # keep timm's strict load: only exactly these keys may come from the fresh init
            expected = model.state_dict()
            state_dict = dict(state_dict, **{k: expected[k] for k in attention})
        return state_dict

    return check


def _as_tuple(value) -> tuple:
    if value is None:
        return ()
    return (value,) if isinstance(value, str) else tuple(value)


def build_model_with_weights(model_cls, variant: str, pretrained: bool = False, **kwargs):
    """timm's `build_model_with_cfg` with verified weight resolution (see the module docstring)."""
    if not pretrained:
        return build_model_with_cfg(model_cls, variant, pretrained, **kwargs)
    _refuse_redirection(kwargs.get('pretrained_cfg'))  # before the caller's own overlay is applied
    cfg = resolve_pretrained_cfg(
        variant, kwargs.pop('pretrained_cfg', None), kwargs.pop('pretrained_cfg_overlay', None)).to_dict()
    state_dict, source = _resolve_weights(cfg, variant, kwargs.get('cache_dir'))
    classifier = _as_tuple(cfg.get('classifier'))
    # the checkpoint's classifier, not the registered cfg, says how many classes it has (a 10-class file with
    # pretrained_cfg_overlay=dict(file=...) must not be taken for a 1000-class one and lose its head)
    load_cfg = dict(cfg, state_dict=state_dict, source=None, custom_load=False,
                    num_classes=head_classes(state_dict, classifier) or 0)
    model = build_model_with_cfg(
        model_cls, variant, True,
        pretrained_cfg=load_cfg,
        pretrained_filter_fn=_key_check(source, classifier, _as_tuple(cfg.get('first_conv'))),
        **kwargs,
    )
    # what the model reports is the cfg the user asked for, without the tensors it was loaded from
    shown = {k: v for k, v in model.pretrained_cfg.items() if k != 'state_dict'}
    for key in ('source', 'file', 'hf_hub_id'):
        if cfg.get(key) is not None:
            shown[key] = cfg[key]
    model.pretrained_cfg = model.default_cfg = shown
    return model

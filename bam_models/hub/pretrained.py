""" Verified pretrained weights through timm and the Hugging Face Hub, and the Hub folder writer.

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
- a config.json of a Hub repo or `local-dir:` folder may not say where the weights come from (`file`, `url`,
  `state_dict`, `hf_hub_filename`, `hf_hub_id`): the weights of `hf-hub:R` come from repo R, those of
  `local-dir:P` from folder P, and a config naming another source is refused;
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
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import safetensors.torch
import timm
import torch
import torch.nn as nn
from huggingface_hub import constants as hf_constants
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from timm.models._builder import build_model_with_cfg, resolve_pretrained_cfg
from timm.models._hub import hf_split, save_config_for_hf, save_for_hf

from bam_models.checkpoint import (
    check_state_dict, describe_mismatch, head_classes, key_mismatch, load_strict, read_state_dict)
from bam_models.errors import PretrainedWeightsError
from bam_models.layers import BAM, CBAM
from bam_models.hub.download import TRANSPORT_ERRORS, bounded_downloads, describe_failure
from bam_models.hub.manifest import load_manifest, manifest_entry, manifest_entry_for_repo

__all__ = [
    'PretrainedWeightsError', 'TrunkOnlyWeightsWarning', 'UnverifiedWeightsWarning',
    'build_model_with_weights', 'attention_keys', 'file_sha256', 'model_from_checkpoint', 'save_pretrained',
    'model_card',
]

HUB_FILENAME = 'model.safetensors'
# pretrained-cfg fields that locate weights: timm's save_for_hf never writes them into a config.json
_SOURCE_FIELDS = ('file', 'url', 'state_dict', 'hf_hub_id', 'hf_hub_filename')


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


def attention_keys(model: nn.Module) -> List[str]:
    """State-dict keys of every BAM/CBAM module in `model`: what a plain-trunk checkpoint lacks."""
    prefixes = tuple(f'{name}.' for name, module in model.named_modules() if isinstance(module, (BAM, CBAM)))
    return [k for k in model.state_dict() if k.startswith(prefixes)] if prefixes else []


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
    except (LocalEntryNotFoundError, OfflineModeIsEnabled):
        cache = cache_dir or hf_constants.HF_HUB_CACHE
        if hf_constants.is_offline_mode():
            raise source.error(
                f"HF_HUB_OFFLINE is set and the file is not in the cache ({cache})",
                "load it once with network access (same cache_dir / HF_HOME), or unset HF_HUB_OFFLINE") from None
        raise source.error(
            f"the Hub at {hf_constants.ENDPOINT} could not be reached and the file is not in the cache ({cache})",
            "check the network or HF_ENDPOINT, or fill the cache where the Hub is reachable") from None
    except RepositoryNotFoundError:
        raise source.error(
            f"repository {repo_id} does not exist on {hf_constants.ENDPOINT} (or needs a token)",
            "check the repo id, HF_ENDPOINT, and HF_TOKEN for private repos") from None
    except RevisionNotFoundError:
        raise source.error(
            f"revision {revision} does not exist in {repo_id}",
            "update the manifest's pinned revision (bam-models publish --push records it)") from None
    except EntryNotFoundError:
        raise source.error(
            f"{repo_id} has no file {filename} at this revision (404)",
            "publish it with `bam-models publish ... --push`, or fix the manifest entry") from None
    except PretrainedWeightsError as e:  # the download budget ran out, or its setting is invalid
        problem, _, advice = str(e).partition('; ')
        raise source.error(problem, advice) from None
    except HfHubHTTPError as e:
        raise source.error(f"the Hub answered {describe_failure(e)}", "retry later or check HF_ENDPOINT") from None
    except TRANSPORT_ERRORS as e:
        raise source.error(
            f"the download failed ({describe_failure(e)})",
            "retry later, check the network and HF_ENDPOINT; nothing partial was kept in the cache") from None


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
    named = [k for k in _SOURCE_FIELDS if k != own and cfg.get(k) not in (None, '', {}, [])]
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
        if (folder / name).is_file():
            return read_state_dict(folder / name, source.what, PretrainedWeightsError)
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
    if not entry['published']:
        trunks = [f"{architecture}.{e['tag']}" for e in manifest['weights'].values()
                  if e['architecture'] == architecture and e['kind'] == 'trunk' and e['published']]
        trunk_hint = (f"the trunk tag {' / '.join(trunks)} (attention freshly initialised, fine-tune it)" if trunks
                      else 'no trunk tag')
        raise source.error(
            "these weights are not published yet (manifest: published=false)",
            f"use pretrained=False, {trunk_hint}, or convert the original checkpoint yourself "
            f"(`bam-models convert`) and load it with pretrained_cfg_overlay=dict(file='.../model.safetensors')")
    return _download_verified(
        source, entry['hf_hub_id'], entry['filename'], entry['revision'], entry['sha256'], entry['size'],
        entry.get('unverified_reason', ''), cache_dir,
    ), source


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


_CITATIONS = (
    "@inproceedings{park2018bam,\n  title={BAM: Bottleneck Attention Module},\n"
    "  author={Park, Jongchan and Woo, Sanghyun and Lee, Joon-Young and Kweon, In So},\n"
    "  booktitle={British Machine Vision Conference (BMVC)},\n  year={2018}\n}",
    "@inproceedings{woo2018cbam,\n  title={CBAM: Convolutional Block Attention Module},\n"
    "  author={Woo, Sanghyun and Park, Jongchan and Lee, Joon-Young and Kweon, In So},\n"
    "  booktitle={European Conference on Computer Vision (ECCV)},\n  year={2018}\n}",
)


def model_card(
        arch_tag: str,
        repo_id: Optional[str] = None,
        metrics: Sequence[Dict[str, Any]] = (),
        license: str = 'mit',
        description: str = '',
        num_params: Optional[int] = None,
        *,
        base_weights: Optional[str] = None,
        local_dir: Optional[Union[str, Path]] = None,
) -> str:
    """A Hub model card (README.md) in timm's style: metadata, metrics with their source, usage, citations.

    The usage loads these weights: `hf-hub:REPO` when `repo_id` is given, else `local-dir:LOCAL_DIR` (the
    folder the card is written into), else the registry name `arch_tag`. `base_weights` is what training started
    from (a pretrained tag or a checkpoint): only then is the model called fine-tuned; None means either trained
    from scratch or not trained here (converted or published weights).
    """
    architecture = arch_tag.split('.')[0]
    datasets = sorted({m['dataset'] for m in metrics})
    lines = ['---', 'tags:', '- image-classification', '- timm', '- bam_models',
             f"- {'cbam' if architecture.endswith('_cbam') else 'bam'}",
             'library_name: timm', f'license: {license}']
    if datasets:
        lines += ['datasets:'] + [f'- {d}' for d in datasets]
    lines += ['---', f'# Model card for {arch_tag}', '']
    if not description:
        description = (f'{architecture} image classification weights, fine-tuned from `{base_weights}`.'
                       if base_weights else f'{architecture} image classification weights.')
    lines += [description, '']
    if num_params:
        lines += [f'- **Parameters:** {num_params:,}']
    if base_weights:
        lines += [f'- **Fine-tuned from:** `{base_weights}`']
    lines += [f'- **Architecture:** `{architecture}` from [bam_models](https://pypi.org/project/bam-models/)',
              f'- **License:** {license}', '', '## Metrics', '']
    if metrics:
        lines += ['| dataset | split | top-1 | top-5 | input | measured by | source |',
                  '|---|---|---:|---:|---:|---|---|']
        for m in metrics:
            top5 = f"{m['top5']:.3f}" if m.get('top5') is not None else '-'
            lines.append(f"| {m['dataset']} | {m.get('split', '-')} | {m['top1']:.3f} | {top5} | "
                         f"{m.get('input_size', '-')} | {m['measured_by']} | {m['reference']} |")
    else:
        lines.append('No evaluation has been recorded for these weights.')
    if repo_id:
        name = f'hf-hub:{repo_id}'
    else:
        name = f'local-dir:{Path(local_dir).as_posix()}' if local_dir is not None else arch_tag
    lines += ['', '## Usage', '', '```python', 'import timm', 'import torch',
              'import bam_models  # registers the BAM/CBAM architectures with timm', '',
              f"model = timm.create_model('{name}', pretrained=True).eval()",
              'config = timm.data.resolve_data_config({}, model=model)',
              'transform = timm.data.create_transform(**config)',
              'with torch.no_grad():',
              '    probabilities = model(transform(image).unsqueeze(0)).softmax(-1)  # image: a PIL image',
              '```', '', '## Citation', '']
    for citation in _CITATIONS:
        lines += ['```bibtex', citation, '```']
    return '\n'.join(lines) + '\n'


def model_from_checkpoint(model_name: str, checkpoint: Union[str, Path], **model_kwargs) -> nn.Module:
    """`model_name` built without downloads, with a local checkpoint loaded strictly.

    The file is read by `bam_models.checkpoint.read_state_dict` (no pickled code runs), the size of its
    classifier sets `num_classes`, and a checkpoint of another architecture raises a `CheckpointError` that
    counts and names missing and unexpected keys.
    """
    state_dict = read_state_dict(checkpoint)
    classifier = timm.create_model(model_name, device='meta', **model_kwargs).pretrained_cfg.get('classifier')
    classes = head_classes(state_dict, classifier)
    if classes is not None:
        model_kwargs = dict(model_kwargs, num_classes=classes)
    model = timm.create_model(model_name, pretrained=False, **model_kwargs)
    return load_strict(model, state_dict, f'checkpoint {checkpoint}', 'pass the architecture it was trained as')


def save_pretrained(
        model: nn.Module,
        out_dir: Union[str, Path],
        *,
        arch_tag: Optional[str] = None,
        repo_id: Optional[str] = None,
        metrics: Sequence[Dict[str, Any]] = (),
        license: str = 'mit',
        description: str = '',
        state_dict: Optional[Dict[str, torch.Tensor]] = None,
        data_config: Optional[Dict[str, Any]] = None,
        model_config: Optional[Dict[str, Any]] = None,
        base_weights: Optional[str] = None,
) -> Dict[str, Any]:
    """Write a Hub repo folder: model.safetensors, config.json (timm's format, so `hf-hub:` and `local-dir:`
    names work) and a model card README.md.

    `state_dict` replaces `model.state_dict()` in the weights file (a trunk-only conversion writes only what
    it converted); config.json always describes `model`, with `data_config` (the preprocessing the weights were
    trained and evaluated with) and `model_config` (e.g. label_names) as in timm's `save_for_hf`. The model card
    shows how to load the folder (`hf-hub:REPO_ID`, else `local-dir:OUT_DIR`) and, with `base_weights` (what a
    training run started from), that the model was fine-tuned from it.
    Returns sha256, size, num_params, the paths and `files`, the names of every file written.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    architecture = model.pretrained_cfg.get('architecture')
    if arch_tag is None:
        tag = model.pretrained_cfg.get('tag')
        arch_tag = f'{architecture}.{tag}' if tag else architecture
    if state_dict is None:
        save_for_hf(model, out_dir, model_config=model_config, safe_serialization=True, data_config=data_config)
    else:
        safetensors.torch.save_file(
            {k: v.contiguous() for k, v in state_dict.items()}, out_dir / HUB_FILENAME, metadata={'format': 'pt'})
        save_config_for_hf(model, out_dir / 'config.json', model_config=model_config, data_config=data_config)
    weights = out_dir / HUB_FILENAME
    num_params = sum(p.numel() for p in model.parameters())
    (out_dir / 'README.md').write_text(model_card(
        arch_tag, repo_id=repo_id, metrics=metrics, license=license, description=description,
        num_params=num_params, base_weights=base_weights, local_dir=out_dir), encoding='utf-8')
    return {
        'files': [HUB_FILENAME, 'config.json', 'README.md'],
        'sha256': file_sha256(weights),
        'size': weights.stat().st_size,
        'num_params': num_params,
        'weights': str(weights),
        'config': str(out_dir / 'config.json'),
        'readme': str(out_dir / 'README.md'),
    }

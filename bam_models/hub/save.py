""" Saving: the Hub folder writer (`save_pretrained`, with its model card), the one "new or empty folder" rule
(`new_or_empty_folder`), publishing one weights-manifest entry (`publish`, `push_files`) and writing a timm CNN
with attention inserted (`insert_into_folder`).

`publish` writes an entry's Hub folder from a checkpoint, optionally uploads exactly the files written, and
records sha256, size, parameter count (and, once pushed, the pinned commit) in the manifest.
"""
import os
import tempfile
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Union

import safetensors.torch
import timm
import torch
import torch.nn as nn
from timm.models import split_model_name_tag

from bam_models._compat import save_config_for_hf
from bam_models.checkpoint import create_sized_model, load_strict, read_state_dict
from bam_models.errors import OutputExistsError, UsageError
from bam_models.insert.inserted import ARCHITECTURE as WITH_ATTENTION
from bam_models.runs import atomic_write
from bam_models.weights import HUB_FILENAME, file_sha256
from bam_models.weights.manifest import entry_pretrained_cfg, load_manifest, manifest_path, update_manifest_entry

__all__ = ['insert_into_folder', 'model_card', 'new_or_empty_folder', 'publish', 'push_files', 'save_pretrained']

PathLike = Union[str, Path]


def new_or_empty_folder(path: PathLike, label: str, why: str) -> Path:
    """`path` as a Path; an `OutputExistsError` if it exists and holds anything (or is a file).

    Every command that writes a fresh folder calls this before any work: whatever else the folder held would
    be mistaken for part of what was written (`why` says how, for the message; `label` names the argument).
    Nothing is created here, so a command that fails later leaves no folder behind."""
    folder = Path(path)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise OutputExistsError(f"{label} {folder} is not an empty folder; {why}: pass a new or empty folder")
    blocking = next((parent for parent in folder.absolute().parents if parent.exists()), None)
    if blocking is not None and not blocking.is_dir():
        raise UsageError(f"{label} {folder} lies under {blocking}, which is a file, so no folder can be "
                                f"made there; pass a new or empty folder elsewhere")
    return folder


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
    architecture = split_model_name_tag(arch_tag)[0]
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
    # what timm's save_for_hf writes, the weights through the one atomic writer (ordinary permissions, no part file)
    tensors = {k: v.contiguous() for k, v in (model.state_dict() if state_dict is None else state_dict).items()}
    weights = out_dir / HUB_FILENAME
    atomic_write(weights, lambda tmp: safetensors.torch.save_file(tensors, tmp, metadata={'format': 'pt'}),
                 then='write the folder again')
    save_config_for_hf(model, out_dir / 'config.json', model_config=model_config, data_config=data_config)
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


def push_files(repo_id: str, folder: Path, files, message: str) -> str:
    """Upload exactly `files` (names in `folder`) to `repo_id` in one commit; returns the commit hash."""
    from huggingface_hub import CommitOperationAdd, HfApi
    api = HfApi(token=os.environ.get('HF_TOKEN'))
    api.create_repo(repo_id, exist_ok=True)
    operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(folder / name)) for name in files]
    return api.create_commit(repo_id, operations=operations, commit_message=message).oid


def publish(
        arch_tag: str,
        checkpoint: PathLike,
        out_dir: Optional[PathLike] = None,
        push: bool = False,
        manifest: Optional[PathLike] = None,
) -> Dict[str, Any]:
    """Write the Hub folder of manifest entry `arch_tag` from `checkpoint` (a complete bam_models state dict)
    into `out_dir` (new or empty; a temporary folder when only pushing), and update the entry (sha256, size,
    num_params; with `push` also the commit as pinned revision and published=true).

    Returns save_pretrained's result (`files`: the names written, and uploaded with `push`), plus `revision`
    when pushed."""
    fix = 'pass --manifest the path of a valid weights manifest (JSON)' if manifest else None
    manifest = Path(manifest or manifest_path())
    entries = load_manifest(manifest, fix)['weights']
    if arch_tag not in entries:
        raise UsageError(f"{arch_tag} has no entry in {manifest}; add one first (copy resnet50_bam.official_in1k's "
                         f"and edit it)")
    entry = entries[arch_tag]
    if not out_dir and not push:
        raise UsageError("nothing to do; give --out DIR to write the folder, and/or --push to upload it")
    if entry['kind'] == 'trunk':
        raise UsageError(f"{arch_tag} is a third-party trunk entry ({entry['hf_hub_id']}); only full bam_models "
                         f"checkpoints are published: pick a full entry")
    folder = new_or_empty_folder(
        out_dir, '--out', 'publish writes only into a new or empty folder so that nothing else (stale weights, '
        'notes) is published with it') if out_dir else None
    state_dict = read_state_dict(checkpoint)
    # the entry's cfg, not timm's registry: an entry added to a --manifest after import is not registered
    model = create_sized_model(entry['architecture'], state_dict,
                               pretrained_cfg_overlay=dict(entry_pretrained_cfg(entry), tag=entry['tag']))
    load_strict(model, state_dict, f'checkpoint {checkpoint}', f'pass a complete {entry["architecture"]} checkpoint')
    with tempfile.TemporaryDirectory() as tmp:
        folder = folder or Path(tmp)
        info = save_pretrained(
            model, folder, arch_tag=arch_tag, repo_id=entry['hf_hub_id'], metrics=entry['metrics'],
            license=entry['license'], description=entry['source']['description'])
        fields = dict(sha256=info['sha256'], size=info['size'], num_params=info['num_params'])
        if push:
            info['revision'] = push_files(entry['hf_hub_id'], folder, info['files'], f'Add {arch_tag} weights')
            fields.update(revision=info['revision'], published=True)
    update_manifest_entry(arch_tag, manifest, **fields)
    return info


def insert_into_folder(
        base_model: str,
        attention: str,
        out_dir: PathLike,
        pretrained: bool = False,
        replace_existing: bool = False,
        attention_args: Optional[Dict[str, Any]] = None,
) -> Dict[str, Any]:
    """Write `base_model` + attention as a Hub folder that `timm.create_model('local-dir:OUT', pretrained=True)`
    rebuilds with these weights; `out_dir` must be new or empty (`OutputExistsError`)."""
    out_dir = new_or_empty_folder(out_dir, 'OUT', 'insert writes a Hub folder that is loaded as a whole')
    model_args = dict(base_model=base_model, attention=attention)
    if attention_args:
        model_args['attention_args'] = attention_args
    if replace_existing:
        model_args['replace_existing'] = True
    model = timm.create_model(WITH_ATTENTION, pretrained=pretrained, **model_args)
    trunk = 'its timm pretrained trunk' if pretrained else 'random initialisation'
    return save_pretrained(
        model, out_dir, arch_tag=f'local-dir:{out_dir.name}',
        description=f"timm's `{base_model}` with {attention.upper()} inserted by `bam-models insert`, from {trunk}; "
                    f"the {attention.upper()} modules are freshly initialised, fine-tune before use.",
    )

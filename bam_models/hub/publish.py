""" Publishing one weights-manifest entry: write its Hub folder from a checkpoint, optionally upload exactly
the files written, and record sha256, size, parameter count (and, once pushed, the pinned commit). """
import os
import tempfile
from pathlib import Path
from typing import Any, Dict, Optional, Union

import timm

from bam_models.checkpoint import head_classes, load_strict, read_state_dict
from bam_models.errors import UsageError
from bam_models.hub.manifest import entry_pretrained_cfg, load_manifest, manifest_path, update_manifest_entry
from bam_models.hub.pretrained import save_pretrained

__all__ = ['publish', 'push_files']

PathLike = Union[str, Path]


def _fresh_folder(out_dir: PathLike) -> Path:
    """`out_dir`, which must be new or empty: whatever else it held would be uploaded as part of the weights."""
    folder = Path(out_dir)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise UsageError(f"--out {folder} is not an empty folder; publish writes only into a new or empty folder "
                         f"so that nothing else (stale weights, notes) is published with it: pass a new folder")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


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
    manifest = Path(manifest or manifest_path())
    entries = load_manifest(manifest)['weights']
    if arch_tag not in entries:
        raise UsageError(f"{arch_tag} has no entry in {manifest}; add one first (copy resnet50_bam.official_in1k's "
                         f"and edit it)")
    entry = entries[arch_tag]
    if not out_dir and not push:
        raise UsageError("nothing to do; give --out DIR to write the folder, and/or --push to upload it")
    if entry['kind'] == 'trunk':
        raise UsageError(f"{arch_tag} is a third-party trunk entry ({entry['hf_hub_id']}); only full bam_models "
                         f"checkpoints are published: pick a full entry")
    folder = _fresh_folder(out_dir) if out_dir else None
    state_dict = read_state_dict(checkpoint)
    architecture = entry['architecture']
    classes = head_classes(state_dict, timm.models.get_pretrained_cfg(architecture).classifier) or 0
    # the entry's cfg, not timm's registry: an entry added to a --manifest after import is not registered
    model = timm.create_model(architecture, num_classes=classes,
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

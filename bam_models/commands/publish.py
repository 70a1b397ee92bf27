""" `bam-models publish`: write (and optionally push) the Hub folder of one manifest entry, and record it. """
import argparse
import os
import tempfile
from pathlib import Path

import timm
from timm.models import get_pretrained_cfg

from bam_models.hub.convert import ConversionError, read_checkpoint
from bam_models.hub import save_pretrained
from bam_models.hub.manifest import load_manifest, manifest_path, update_manifest_entry


def publish(arch_tag: str, checkpoint: str, out_dir=None, push: bool = False, manifest=None) -> dict:
    """Write the Hub folder of `arch_tag` from `checkpoint` (a bam_models state dict), update the manifest entry
    (sha256, size, num_params; with `push` also the commit as pinned revision and published=true)."""
    manifest = Path(manifest or manifest_path())
    entries = load_manifest(manifest)['weights']
    if arch_tag not in entries:
        raise SystemExit(f"bam-models publish: {arch_tag} has no entry in {manifest}; add one first "
                         f"(copy resnet50_bam.official_in1k's and edit it).")
    entry = entries[arch_tag]
    if not out_dir and not push:
        raise SystemExit("bam-models publish: give --out DIR to write the folder, and/or --push to upload it.")
    if entry['kind'] == 'trunk':
        raise SystemExit(f"bam-models publish: {arch_tag} is a third-party trunk entry ({entry['hf_hub_id']}); "
                         f"only full bam_models checkpoints are published.")
    try:
        state_dict = read_checkpoint(checkpoint)
    except ConversionError as e:
        raise SystemExit(f"bam-models publish: {e}")
    head = f"{get_pretrained_cfg(arch_tag).classifier}.weight"
    num_classes = state_dict[head].shape[0] if head in state_dict else 0
    model = timm.create_model(arch_tag, num_classes=num_classes)
    result = model.load_state_dict(state_dict, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise SystemExit(
            f"bam-models publish: {checkpoint} is not a complete {entry['architecture']} checkpoint. Missing keys: "
            f"{result.missing_keys or 'none'}; unexpected keys: {result.unexpected_keys or 'none'}.")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(out_dir) if out_dir else Path(tmp)
        info = save_pretrained(
            model, folder, arch_tag=arch_tag, repo_id=entry['hf_hub_id'], metrics=entry['metrics'],
            license=entry['license'], description=entry['source']['description'])
        fields = dict(sha256=info['sha256'], size=info['size'], num_params=info['num_params'])
        if push:
            from huggingface_hub import HfApi
            api = HfApi(token=os.environ.get('HF_TOKEN'))
            api.create_repo(entry['hf_hub_id'], exist_ok=True)
            commit = api.upload_folder(repo_id=entry['hf_hub_id'], folder_path=str(folder),
                                       commit_message=f'Add {arch_tag} weights')
            fields.update(revision=commit.oid, published=True)
            info['revision'] = commit.oid
    update_manifest_entry(arch_tag, manifest, **fields)
    return info


def run(args: argparse.Namespace) -> int:
    info = publish(args.arch_tag, args.checkpoint, args.out, args.push, args.manifest)
    print(f"sha256 {info['sha256']}")
    print(f"size {info['size']} bytes")
    if 'revision' in info:
        print(f"pushed, revision {info['revision']}")
    print(f"manifest entry {args.arch_tag} updated in {args.manifest or manifest_path()}")
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        'publish', help='write/push the Hub folder of a manifest entry',
        description='Write model.safetensors, config.json (timm format) and a model card README.md for ARCH.TAG '
                    'from a bam_models checkpoint, print sha256 and size and record them in the weights manifest. '
                    '--push uploads the folder (token from HF_TOKEN) and pins the resulting commit.')
    parser.add_argument('arch_tag', metavar='ARCH.TAG', help='manifest entry, e.g. resnet50_bam.official_in1k')
    parser.add_argument('--checkpoint', required=True, help='bam_models state dict (.safetensors or .pth)')
    parser.add_argument('--out', default=None, help='folder to write (default: a temporary one, with --push)')
    parser.add_argument('--push', action='store_true', help='upload to the Hub repo of the entry')
    parser.add_argument('--manifest', default=None, help='manifest to update (default: the active one)')
    parser.set_defaults(func=run)

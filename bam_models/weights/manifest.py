""" The weights manifest: the single source of truth about every pretrained weight file of the zoo.

`weights_manifest.json` holds one entry per `architecture.tag`: Hub repo, pinned revision, file name, sha256,
size, parameter count, source, licence, metrics (with who measured them), recipe and publication state. Every
zoo model's timm `default_cfgs` are generated from it (`manifest_default_cfgs`), and the verified build
(`bam_models.weights.build`) reads it again at load time to pin and verify downloads.

`BAM_MODELS_MANIFEST=/path/to/manifest.json` selects another manifest (private mirrors, forks, tests).
The file's format is `weights_manifest.schema.json` next to this module.
"""
import json
import os
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple, Union

from bam_models.errors import ManifestError

__all__ = [
    'MANIFEST_ENV', 'ManifestError', 'manifest_path', 'load_manifest', 'manifest_entry', 'manifest_entry_for_repo',
    'manifest_default_cfgs', 'update_manifest_entry',
]

MANIFEST_ENV = 'BAM_MODELS_MANIFEST'
PACKAGED_MANIFEST = Path(__file__).parent.parent.joinpath('weights_manifest.json')
SCHEMA_PATH = Path(__file__).parent.parent.joinpath('weights_manifest.schema.json')

# manifest `pretrained_cfg` keys that are tuples in timm's PretrainedCfg
_TUPLE_KEYS = ('input_size', 'test_input_size', 'min_input_size', 'mean', 'std', 'pool_size', 'test_pool_size')


def manifest_path() -> Path:
    """The active manifest: `$BAM_MODELS_MANIFEST` if set, else the one shipped with the package."""
    return Path(os.environ.get(MANIFEST_ENV) or PACKAGED_MANIFEST)


def load_manifest(path: Optional[Union[str, Path]] = None, fix: Optional[str] = None) -> Dict[str, Any]:
    """Read (never cache: tests and `publish` rewrite it) and sanity-check a manifest; `ManifestError` if it
    cannot be used, ending in `fix` (default: how to set the active manifest)."""
    path = Path(path) if path is not None else manifest_path()
    fix = fix or f"unset {MANIFEST_ENV} to use the packaged manifest, or point it at a valid manifest file"
    try:
        manifest = json.loads(path.read_text(encoding='utf-8'))
    except OSError as e:
        raise ManifestError(f"weights manifest {path} cannot be read ({type(e).__name__}); {fix}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ManifestError(f"weights manifest {path} is not valid JSON ({e}); {fix}") from None
    weights = manifest.get('weights') if isinstance(manifest, dict) else None
    if not isinstance(weights, dict):
        raise ManifestError(f"weights manifest {path} has no 'weights' object; {fix}")
    required = _required_fields()
    for key, entry in weights.items():
        _check_entry(path, key, entry, required)
    return manifest


def _required_fields() -> List[str]:
    return json.loads(SCHEMA_PATH.read_text(encoding='utf-8'))['$defs']['entry']['required']


def _check_entry(path: Path, key: str, entry: Any, required: List[str]) -> None:
    """What the loaders read without a guard: every required field, and a key that matches its entry."""
    if not isinstance(entry, dict):
        raise ManifestError(f"weights manifest {path}: entry {key!r} is not an object; see {SCHEMA_PATH.name}")
    missing = [field for field in required if field not in entry]
    if missing:
        raise ManifestError(f"weights manifest {path}: entry {key!r} lacks {', '.join(missing)}; add them as "
                            f"{SCHEMA_PATH.name} describes")
    expected = f"{entry['architecture']}.{entry['tag']}"
    if key != expected:
        raise ManifestError(
            f"weights manifest {path}: entry {key!r} describes {expected!r}; keys must be 'architecture.tag'")


def manifest_entry(architecture: str, tag: Optional[str], manifest: Optional[Dict[str, Any]] = None):
    """The entry of `architecture.tag`, or None."""
    manifest = manifest if manifest is not None else load_manifest()
    return manifest['weights'].get(f'{architecture}.{tag}') if tag else None


def manifest_entry_for_repo(repo_id: str, manifest: Optional[Dict[str, Any]] = None):
    """The entry published in Hub repo `repo_id`, or None."""
    manifest = manifest if manifest is not None else load_manifest()
    for entry in manifest['weights'].values():
        if entry['hf_hub_id'] == repo_id:
            return entry
    return None


def _entries_of(architecture: str, manifest: Dict[str, Any]) -> List[Tuple[str, Dict[str, Any]]]:
    return [(e['tag'], e) for e in manifest['weights'].values() if e['architecture'] == architecture]


def entry_pretrained_cfg(entry: Dict[str, Any]) -> Dict[str, Any]:
    """timm pretrained-cfg fields of one entry: its data config, licence and (only once published) its Hub
    location, so `timm.list_pretrained()` never lists an unpublished file."""
    cfg = {k: tuple(v) if k in _TUPLE_KEYS else v for k, v in entry['pretrained_cfg'].items()}
    cfg['license'] = entry['license']
    cfg['description'] = entry['source']['description']
    if entry['source'].get('origin_url'):
        cfg['origin_url'] = entry['source']['origin_url']
    if entry['published']:
        revision = f"@{entry['revision']}" if entry['revision'] else ''
        cfg['hf_hub_id'] = entry['hf_hub_id'] + revision
        cfg['hf_hub_filename'] = entry['filename']
    return cfg


def manifest_default_cfgs(
        architectures: Iterable[str],
        make_cfg: Callable[..., Dict[str, Any]],
        manifest: Optional[Dict[str, Any]] = None,
) -> Dict[str, Dict[str, Any]]:
    """`arch.tag` -> pretrained cfg for timm's `generate_default_cfgs`, one per manifest entry.

    `make_cfg(**fields)` is the model file's `_cfg` (architecture-level fields such as first_conv), which the
    entry's fields override. The manifest's default entry becomes the default tag. An architecture without one
    gets an untagged default without weights, so `pretrained=True` never silently loads a trunk-only tag: those
    load only when named (`resnet18_bam.tv_in1k`).
    """
    manifest = manifest if manifest is not None else _manifest_at_import()
    cfgs = {}
    for arch in architectures:
        entries = _entries_of(arch, manifest)
        defaults = [tag for tag, entry in entries if entry['default']]
        if len(defaults) > 1:
            raise ManifestError(f"the weights manifest marks several default tags for {arch} ({', '.join(defaults)}); "
                                f"set default=true on one of them only")
        for tag, entry in entries:
            if not entry['default']:
                cfgs[f'{arch}.{tag}'] = make_cfg(**entry_pretrained_cfg(entry))
        # a trailing '*' makes the last-added cfg timm's default tag even when it has no weights
        if defaults:
            default_entry = manifest['weights'][f'{arch}.{defaults[0]}']
            cfgs[f'{arch}.{defaults[0]}*'] = make_cfg(**entry_pretrained_cfg(default_entry))
        else:
            cfgs[f'{arch}.*'] = make_cfg()
    return cfgs


def _manifest_at_import() -> Dict[str, Any]:
    """The active manifest, or none while `import bam_models` registers the zoo.

    An unusable manifest (a bad BAM_MODELS_MANIFEST) must not fail the import itself: nothing could report it
    as one line then, not even the CLI, which imports the package before it runs. The zoo is registered
    without tags, and every load of weights (and every CLI command, first thing) reads the manifest again and
    raises its `ManifestError` there."""
    try:
        return load_manifest()
    except ManifestError:
        return {'weights': {}}


def update_manifest_entry(arch_tag: str, path: Optional[Union[str, Path]] = None, **fields) -> Dict[str, Any]:
    """Set `fields` of entry `arch_tag` in the manifest file and write it back; returns the new entry."""
    path = Path(path) if path is not None else manifest_path()
    manifest = load_manifest(path)
    if arch_tag not in manifest['weights']:
        raise ManifestError(
            f"{arch_tag} has no entry in the weights manifest {path}; add one (see the existing entries) first")
    entry = manifest['weights'][arch_tag]
    entry.update(fields)
    if entry.get('sha256'):
        entry.pop('unverified_reason', None)
    path.write_text(json.dumps(manifest, indent=2) + '\n', encoding='utf-8')
    return entry

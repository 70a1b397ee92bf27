""" An image-folder dataset (train/ and val/ splits of class folders, as timm's folder reader finds them) as
webdataset tar shards with the `_info.json` timm's webdataset reader (`wds/NAME`) reads.

Each sample is `KEY.jpg` / `KEY.png` / `KEY.webp` (the image file's own bytes, not re-encoded), `KEY.cls` (the
label index, as text) and `KEY.json` (the image's path in the folder and its class name). Samples are shuffled
with `seed` before they are cut into shards, so a shard holds mixed classes. `_info.json` has, as timm parses
it, per split its `name`, `num_samples`, `filenames` and `shard_lengths`, plus the brace `pattern` of its files,
and the dataset's `name`, `num_classes` and `label_names` (class names in label order, which `bam-models train`
puts in the model card). The folder is written next to OUT and renamed into place when complete.
"""
import json
import math
import os
import random
import shutil
from pathlib import Path
from typing import Dict, List, Tuple

from timm.data.readers.reader_image_folder import find_images_and_targets

from bam_models._compat import search_split
from bam_models.errors import OutputExistsError, UsageError, count
from bam_models.runs import check_output_folder
from bam_models.train.data import folder_class_to_idx
from bam_models.train.readers import READER_PACKAGES, import_optional

__all__ = ['write_shards']

# the split names written; each split's folder is found as timm's folder reader finds it (val/ for validation)
SPLITS = ('train', 'validation')
# image file extension -> member extension timm's webdataset reader looks for ('jpg;png;webp')
MEMBER_EXTENSIONS = {'.jpg': 'jpg', '.jpeg': 'jpg', '.png': 'png', '.webp': 'webp'}
INFO = '_info.json'

Sample = Tuple[str, int]  # image path, label


def _split_folders(root: Path) -> Dict[str, Path]:
    """The split folders of `root` that exist: {'train': root/train, 'validation': root/val, ...}."""
    found = {}
    for split in SPLITS:
        folder = Path(search_split(str(root), split))  # `root` itself when no folder of the split's names exists
        if folder != root and folder.is_dir():
            found[split] = folder
    if 'train' not in found:
        raise UsageError(f"{root} has no train/ folder; expected {root}/train/CLASS/IMAGE (and {root}/val/CLASS/"
                         f"IMAGE), the layout timm's folder reader reads")
    return found


def _split_samples(root: Path, folder: Path, class_to_idx: Dict[str, int]) -> List[Sample]:
    classes = folder_class_to_idx(str(root), folder.name)
    if not classes:
        raise UsageError(f"split folder {folder} has no images in class sub-folders (expected {folder}/CLASS/IMAGE, "
                         f"{', '.join(sorted(MEMBER_EXTENSIONS))}); put the split's images in class folders, or "
                         f"remove the empty split folder")
    unknown = sorted(set(classes) - set(class_to_idx))
    if unknown:
        raise UsageError(f"{folder} has classes the train split lacks ({', '.join(unknown[:5])}), and every "
                         f"validation class needs training images; add training images of those classes, or remove "
                         f"them from {folder}")
    samples, _ = find_images_and_targets(str(folder), class_to_idx=class_to_idx)
    odd = [path for path, _ in samples if os.path.splitext(path)[1].lower() not in MEMBER_EXTENSIONS]
    if odd:
        raise UsageError(f"{odd[0]} (and {count(len(odd) - 1, 'other')}) is not a .jpg, .png or .webp image, the "
                         f"kinds timm's webdataset reader decodes; convert those images first")
    return samples


def _webdataset():
    return import_optional(*READER_PACKAGES['wds'], 'bam-models shards', error=UsageError)


def _write_split(out: Path, split: str, samples: List[Sample], names: List[str], root: Path,
                 shard_size: int) -> dict:
    wds = _webdataset()
    shards = math.ceil(len(samples) / shard_size)
    filenames, lengths = [], []
    for shard in range(shards):
        filename = f'{split}-{shard:06d}.tar'
        part = samples[shard * shard_size:(shard + 1) * shard_size]
        with wds.TarWriter(str(out / filename), encoder=False, mtime=0) as writer:  # mtime 0: reproducible
            for index, (path, label) in enumerate(part, start=shard * shard_size):
                meta = dict(filename=os.path.relpath(path, root), label_name=names[label])
                writer.write({'__key__': f'{index:08d}', 'cls': str(label).encode(),
                              'json': json.dumps(meta).encode(),
                              MEMBER_EXTENSIONS[os.path.splitext(path)[1].lower()]: Path(path).read_bytes()})
        filenames.append(filename)
        lengths.append(len(part))
    return dict(name=split, num_samples=len(samples), filenames=filenames, shard_lengths=lengths,
                pattern=f'{split}-{{000000..{shards - 1:06d}}}.tar')


def _check_out(out: Path, overwrite: bool) -> None:
    check_output_folder(out)  # a file, or under one
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise OutputExistsError(f"--out {out} already holds files; pass --overwrite to replace it, or a new folder")


def write_shards(root, out, shard_size: int, *, seed: int = 0, overwrite: bool = False) -> dict:
    """Writes the image folder `root` as shards of `shard_size` samples in `out`; returns the `_info.json`."""
    root, out = Path(root), Path(out)
    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
        raise UsageError(f"--shard-size must be a whole number of samples, at least 1, got {shard_size}; pass the "
                         f"samples per shard, e.g. --shard-size 1000")
    if not root.is_dir():
        raise UsageError(f"image folder {root} does not exist; pass a folder with train/ and val/ sub-folders of "
                         f"class folders")
    _check_out(out, overwrite)
    _webdataset()
    folders = _split_folders(root)
    class_to_idx = folder_class_to_idx(str(root), folders['train'].name)
    names = sorted(class_to_idx, key=class_to_idx.get)
    samples = {split: _split_samples(root, folder, class_to_idx) for split, folder in folders.items()}
    tmp = out.with_name(f'.{out.name}.tmp-{os.getpid()}')
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        info = dict(name=root.resolve().name, num_classes=len(names), label_names=names, splits={})
        for split, split_samples in samples.items():
            random.Random(seed).shuffle(split_samples)  # mixed classes in every shard, the same for a seed
            info['splits'][split] = _write_split(tmp, split, split_samples, names, root, shard_size)
        (tmp / INFO).write_text(json.dumps(info, indent=2) + '\n')
        _replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return info


def _replace(tmp: Path, out: Path) -> None:
    """Puts the finished folder `tmp` at `out`; an earlier `out` is removed only once the new one is there."""
    old = out.with_name(f'.{out.name}.old-{os.getpid()}')
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)

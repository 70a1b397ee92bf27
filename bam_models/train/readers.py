""" Sharded and streaming datasets, read by timm's own readers: `wds/NAME` (webdataset tar shards with an
`_info.json`), `hfds/NAME` (a Hugging Face dataset, random access), `hfids/NAME` (the same, streamed) and
`tfds/NAME` (TensorFlow Datasets, where installed). `data.root` is timm's `--data-dir`.

timm's iterable readers split the shards by process and loader worker and give every worker the same number
of samples (a multiple of the batch size, repeating samples of a worker whose shards run out first). On top of
that an epoch here is `samples // (batch size x processes)` steps on every process, whatever the number of
workers, so no process waits at the last batch and a run's schedule does not depend on `data.workers`.
A sharded validation split is read once: each process reads whole shards (shard i goes to process i mod N;
a process left without one scores nothing) and the scores are summed, so every sample counts once.
"""
import dataclasses
import importlib
import itertools
import json
import os
import tarfile
from typing import Dict, List, Optional

import torch
from timm.data import create_dataset

from bam_models.errors import ConfigError, count
from bam_models.train.config import reader_prefix

# reader prefix (config.READER_PREFIXES) -> (module it needs, how to install it)
READER_PACKAGES = {
    'wds': ('webdataset', "pip install 'bam-models[scale]'"),
    'hfds': ('datasets', "pip install 'bam-models[scale]'"),
    'hfids': ('datasets', "pip install 'bam-models[scale]'"),
    'tfds': ('tensorflow_datasets', 'pip install tensorflow-datasets'),
}
INFO_FILES = ('_info.json', 'info.json')  # what timm's webdataset reader looks for in data.root
# timm's names of a validation split, as for folders (val/, valid/, ...)
EVAL_SYNONYMS = ('validation', 'val', 'valid', 'eval', 'evaluation', 'test')


def import_optional(module: str, install: str, needed_by: str, error: type = ConfigError):
    """`module`, imported; if it is missing, one line saying what needs it and how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise error(f"{needed_by} needs the {module.replace('_', '-')} package; {install}") from None


def check_reader_package(dataset: str) -> None:
    """A one-line error naming the extra when the package the dataset's reader needs is missing."""
    import_optional(*READER_PACKAGES[reader_prefix(dataset)], f'data.dataset {dataset}')


def is_iterable(dataset) -> bool:
    return isinstance(dataset, torch.utils.data.IterableDataset)


# ---------------------------------------------------------------------------------------------- split names

def _load_wds_info(root: str) -> Dict:
    for name in INFO_FILES:
        path = os.path.join(root, name)
        if os.path.isfile(path):
            try:
                with open(path) as f:
                    return json.load(f)
            except (OSError, ValueError) as e:
                raise ConfigError(f"{path} is not readable JSON ({str(e).splitlines()[0]}); write it again with "
                                  f"`bam-models shards`") from None
    return {}


def _is_pattern(split: str) -> bool:
    """timm's test for a split given as shard file names (a brace pattern, optionally `|NUM_SAMPLES`)."""
    return 'tar' in split or '..' in split


def wds_split(root: str, split: str, key: str) -> str:
    """The split name timm's webdataset reader is given: `split` if `_info.json` has it or it is a brace pattern
    of shards; a validation synonym the info has ('val' for 'validation'); else a one-line error."""
    if _is_pattern(split):
        return split
    info = _load_wds_info(root)
    if not info:
        raise ConfigError(f"data.root {root} has no _info.json, which timm's webdataset reader needs to find split "
                          f"'{split}'; write the shards with `bam-models shards`, or set {key} to a brace pattern "
                          f"with a sample count, e.g. 'train-{{000000..000009}}.tar|12800'")
    splits = info.get('splits') or {}
    if split in splits:
        return split
    if split in EVAL_SYNONYMS:
        synonym = next((name for name in EVAL_SYNONYMS if name in splits), None)
        if synonym:
            return synonym
    raise ConfigError(f"{key} is '{split}' but the _info.json of {root} has the splits "
                      f"{', '.join(sorted(splits)) or '(none)'}; set {key} to one of them")


# ---------------------------------------------------------------------------------------------- datasets

def _num_samples(cfg_data, is_training: bool) -> Optional[int]:
    return cfg_data.train_num_samples if is_training else cfg_data.val_num_samples


def reader_dataset(cfg_data, is_training: bool, *, seed: int = 0):
    """The training (`is_training`) or validation split of a wds/hfds/hfids/tfds dataset, as timm's
    `create_dataset` builds it. Images are decoded without conversion: the transform makes them RGB
    (`data.decode_as_rgb`), so 16-bit images are scaled, not clipped."""
    check_reader_package(cfg_data.dataset)
    key = 'data.train_split' if is_training else 'data.val_split'
    split = cfg_data.train_split if is_training else cfg_data.val_split
    if reader_prefix(cfg_data.dataset) == 'wds':
        split = wds_split(cfg_data.root, split, key)
    try:
        dataset = create_dataset(
            cfg_data.dataset, root=cfg_data.root, split=split, is_training=is_training,
            batch_size=cfg_data.batch_size if is_training else (cfg_data.eval_batch_size or cfg_data.batch_size),
            num_samples=_num_samples(cfg_data, is_training), seed=seed, repeats=0, input_img_mode=None)
    except ConfigError:
        raise
    except Exception as e:  # the readers' own errors: a missing dataset or split, an unknown length
        raise ConfigError(f"timm could not open {key} '{split}' of data.dataset {cfg_data.dataset} (data.root "
                          f"{cfg_data.root}): {_first_line(e)}; {_fix_for(e, is_training)}") from None
    _check_sample_count(dataset, cfg_data, is_training)
    if reader_prefix(cfg_data.dataset) == 'wds':
        check_shard_files(dataset.reader, key)
    return dataset


def check_shard_files(reader, key: str) -> None:
    """Every shard of a local webdataset split exists and starts as a tar (one header read per shard): timm's
    reader would skip an unreadable shard with a warning and fill the epoch with repeats of the others. A
    shard cut short inside is still found only while reading (the same warning)."""
    for name in reader.split_info.filenames:
        path = os.path.join(reader.root, name)
        if '://' in path or path.startswith('pipe:'):  # a remote shard list: read as it streams
            return
        if not os.path.isfile(path):
            raise ConfigError(f"{key}: shard {path} does not exist; write the shards again (bam-models shards) "
                              f"or fix the split's file names")
        if not tarfile.is_tarfile(path):
            raise ConfigError(f"{key}: shard {path} is not a tar file (damaged?); write the shards again")


def _first_line(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return (text[0] if text else type(error).__name__)[:300]


def _fix_for(error: Exception, is_training: bool) -> str:
    if 'num_samples' in str(error) or 'length is unknown' in str(error):
        return f"set data.{'train' if is_training else 'val'}_num_samples to the number of samples of the split"
    return "check data.dataset, data.root and the split names"


def _check_sample_count(dataset, cfg_data, is_training: bool) -> None:
    """data.train_num_samples / val_num_samples may shorten an epoch, never lengthen it past the split (timm's
    reader would repeat samples to fill it)."""
    wanted = _num_samples(cfg_data, is_training)
    if not is_iterable(dataset) or wanted is None:
        return
    known = getattr(getattr(dataset.reader, 'split_info', None), 'num_samples', None)  # webdataset's info
    if known and wanted > known:
        key = f"data.{'train' if is_training else 'val'}_num_samples"
        raise ConfigError(f"{key} is {wanted} but the split holds {count(known, 'sample')}; set {key} to at most "
                          f"{known} (or leave it null)")


# ---------------------------------------------------------------------------------------------- class names

def reader_classes(dataset) -> List[str]:
    """Class names in label order: the dataset's own metadata (a ClassLabel feature, `label_names` of a
    webdataset `_info.json`), else one name per label found in the split ('0', '1', ...)."""
    reader = dataset.reader
    class_to_idx = getattr(reader, 'class_to_idx', None) or {}
    if class_to_idx:
        return sorted(class_to_idx, key=class_to_idx.get)
    names = (getattr(reader, 'info', None) or {}).get('label_names')
    if names:
        return [str(name) for name in names]
    labels = _split_labels(reader)
    if not labels:
        raise ConfigError(f"the training split of {getattr(reader, 'root', None) or 'the dataset'} has no labels "
                          f"(no ClassLabel feature, no label_names, no label in its samples); label the data")
    return [str(label) for label in range(max(labels) + 1)]


def _split_labels(reader) -> set:
    """Every label of the split, read without the images: `.cls` members of webdataset shards, the label
    column of a Hugging Face dataset."""
    if hasattr(reader, 'iter_targets'):
        return set(int(label) for label in reader.iter_targets())
    if hasattr(reader, 'split_info'):
        labels = set()
        for name in reader.split_info.filenames:
            with tarfile.open(os.path.join(reader.root, name)) as tar:
                for member in tar:
                    if member.name.endswith('.cls'):
                        labels.add(int(tar.extractfile(member).read()))
        return labels
    raise ConfigError("the dataset names no classes (no ClassLabel feature) and its labels cannot be read "
                      "before training; set model.num_classes")


# ---------------------------------------------------------------------------------------------- loaders

def place_reader(dataset, rank: int, world: int, is_training: bool) -> None:
    """Tells an iterable dataset's reader which of `world` processes reads it (timm's readers otherwise ask
    torch.distributed). A webdataset validation split gets whole shards of its own, read once, instead."""
    reader = dataset.reader
    if not hasattr(reader, 'dist_rank'):
        return
    reader.dist_rank, reader.dist_num_replicas = rank, world
    if world > 1 and not is_training and hasattr(reader, 'split_info') and reader.split_info.filenames:
        info = reader.split_info
        lengths = info.shard_lengths[rank::world] if info.shard_lengths else ()
        reader.split_info = dataclasses.replace(
            info, filenames=info.filenames[rank::world], shard_lengths=lengths, num_samples=sum(lengths))
        reader.dist_rank, reader.dist_num_replicas = 0, 1


def check_train_shards(dataset, world: int, workers: int) -> None:
    """Every process and loader worker needs a shard of its own: a webdataset worker without one yields nothing
    and its process would run short of the epoch's steps."""
    reader = dataset.reader
    shards = len(getattr(getattr(reader, 'split_info', None), 'filenames', ()) or ())
    readers = world * max(1, workers)
    if shards and shards < readers:
        raise ConfigError(f"the training split has {count(shards, 'shard')} but {world} process(es) x "
                          f"{max(1, workers)} loader worker(s) read it, and each needs a shard of its own; lower "
                          f"data.workers, or write smaller shards (bam-models shards --shard-size)")


class EpochLoader:
    """An iterable dataset's training loader cut to `steps` batches an epoch, the same on every process; fails
    in one line if the data runs out first (an unreadable shard, which timm's reader skips with a warning, or
    shards that hold fewer samples than the info says)."""

    def __init__(self, loader: torch.utils.data.DataLoader, steps: int):
        self.loader, self.steps = loader, steps
        self.dataset = loader.dataset

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)  # timm's readers shuffle shards with (seed + epoch)

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        done = 0
        for batch in itertools.islice(self.loader, self.steps):
            done += 1
            yield batch
        if done < self.steps:
            raise ConfigError(f"the training split gave {done} of the {self.steps} batches of an epoch: a shard is "
                              f"unreadable (see the warnings above) or holds fewer samples than its info says; "
                              f"write the shards again or lower data.train_num_samples")


def create_iterable_loaders(train_set, val_set, cfg_data, *, num_replicas: int, rank: int, pin_memory: bool):
    """Loaders for the iterable training and validation datasets (timm's IterableImageDataset, transforms set) of
    an hfids/wds/tfds dataset; see the module docstring."""
    for dataset, is_training in ((train_set, True), (val_set, False)):
        place_reader(dataset, rank, num_replicas, is_training)
        dataset.set_loader_cfg(num_workers=cfg_data.workers)
    check_train_shards(train_set, num_replicas, cfg_data.workers)
    common = dict(num_workers=cfg_data.workers, pin_memory=pin_memory, persistent_workers=False)
    train_loader = torch.utils.data.DataLoader(train_set, batch_size=cfg_data.batch_size, drop_last=True, **common)
    # the reader's sample count: the split's, or data.train_num_samples
    steps = train_set.reader.num_samples // (cfg_data.batch_size * num_replicas)
    # a process left without a validation shard (fewer shards than processes) scores nothing and adds zeros to the
    # sums; webdataset cannot open an empty shard list
    val_set = val_set if _has_shards(val_set) else []
    val_loader = torch.utils.data.DataLoader(
        val_set, batch_size=cfg_data.eval_batch_size or cfg_data.batch_size, drop_last=False, **common)
    return EpochLoader(train_loader, steps), val_loader


def _has_shards(dataset) -> bool:
    info = getattr(dataset.reader, 'split_info', None)
    return info is None or bool(info.filenames)

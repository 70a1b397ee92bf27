""" Datasets and loaders for training: any folder dataset timm reads, CIFAR-10/100 as distributed, and
scikit-learn's bundled digits.

CIFAR-10/100 are the extracted archives of https://www.cs.toronto.edu/~kriz/cifar.html (`cifar-10-batches-py` /
`cifar-100-python`), read by torchvision's dataset classes with `download=False`; torchvision checks every
file's md5 against the official release before unpickling it, so only those files are read.

The digits set (1,797 real 8x8 grey images of handwritten digits, 10 classes, shipped inside scikit-learn, so
nothing is downloaded) is split once, stratified by class with `random_state=0`: 1,437 training and 360 test
images; 300 of the training images are held out as the validation split that selects the best epoch, so
the test images are scored only once, at the end (1,137 train / 300 val / 360 test). Images are served as
RGB PIL images so that timm's transforms upsample them to the model input size.
"""
import os
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch
from PIL import Image
from timm.data import create_dataset, create_transform
from timm.data.readers.reader_image_folder import ReaderImageFolder, find_images_and_targets
from torchvision import transforms
from torchvision.datasets import CIFAR10, CIFAR100

from bam_models._compat import search_split
from bam_models.errors import ConfigError
from bam_models.train.config import reader_prefix
from bam_models.train.readers import create_iterable_loaders, is_iterable, reader_classes

DIGITS = 'digits'
DIGITS_TEST_SIZE = 360
DIGITS_VAL_SIZE = 300
DIGITS_SPLIT_SEED = 0


class DigitsDataset(torch.utils.data.Dataset):
    """scikit-learn's handwritten digits as 8x8 RGB PIL images; `split` is 'train' (1,137), 'val' (300, carved
    from the training images) or 'test' (360)."""

    def __init__(self, split: str = 'train', transform=None):
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        if split not in ('train', 'val', 'test'):
            raise ValueError(f"digits split must be 'train', 'val' or 'test', got {split!r}")
        digits = load_digits()
        indices = np.arange(len(digits.target))
        train_idx, test_idx = train_test_split(
            indices, test_size=DIGITS_TEST_SIZE, stratify=digits.target, random_state=DIGITS_SPLIT_SEED)
        fit_idx, val_idx = train_test_split(
            train_idx, test_size=DIGITS_VAL_SIZE, stratify=digits.target[train_idx], random_state=DIGITS_SPLIT_SEED)
        chosen = np.sort(dict(train=fit_idx, val=val_idx, test=test_idx)[split])
        # pixel values are 0..16
        self.images = (digits.images[chosen] * (255.0 / 16.0)).round().astype(np.uint8)
        self.targets = digits.target[chosen].astype(np.int64)
        self.classes = [str(c) for c in range(10)]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        image = Image.fromarray(self.images[index], mode='L').convert('RGB')
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.targets[index])


# Pillow's modes of single-channel images deeper than 8 bits, which `convert('RGB')` clips to 0..255 instead of
# scaling (a 16-bit PNG turns almost white)
_DEEP_GREY_MODES = ('I', 'I;16', 'I;16B', 'I;16L', 'I;16N')


def image_as_rgb(image: Image.Image) -> Image.Image:
    """`image` as 8-bit RGB, as the image means it: 16-bit grey (and 32-bit integer grey holding 16-bit values,
    as Pillow opens some 16-bit PNGs) scaled by 255 / 65535 rather than clipped; anything else by Pillow."""
    if image.mode in _DEEP_GREY_MODES:
        values = np.asarray(image, dtype=np.float64)
        scaled = np.clip(values * (255.0 / 65535.0), 0, 255).round().astype(np.uint8)
        return Image.fromarray(scaled, mode='L').convert('RGB')
    return image.convert('RGB')


def decode_as_rgb(dataset) -> None:
    """Makes a timm dataset decode its images with `image_as_rgb` before its transform (set the transform
    first), instead of its own `convert('RGB')`, which clips 16-bit images. The iterable readers are created
    converting nothing (`readers.reader_dataset`)."""
    if getattr(dataset, 'input_img_mode', None) or is_iterable(dataset):
        dataset.input_img_mode = None
        dataset.transform = transforms.Compose([transforms.Lambda(image_as_rgb), dataset.transform])


def check_no_symlink_loop(root: str) -> None:
    """Refuses a data folder in which a folder link points back at a folder that holds it: timm's reader
    follows links, and a loop would list every image below it many times over."""
    for folder, subfolders, _ in os.walk(root):
        for name in subfolders:
            path = os.path.join(folder, name)
            if os.path.islink(path):
                target = os.path.realpath(path)
                if os.path.realpath(folder) == target or os.path.realpath(folder).startswith(target + os.sep):
                    raise ConfigError(f"data folder {root} has a link {path} -> {target}, a folder above it, so its "
                                      f"images would be read again and again; remove the link")


def folder_class_to_idx(root: str, split: str) -> Dict[str, int]:
    """The class -> index mapping timm's folder reader builds for a split: only folders that hold images, in
    natural order ('1', '2', '10'). Reads file names only, no image."""
    split_dir = search_split(root, split)
    if os.path.normpath(split_dir) == os.path.normpath(root) or not os.path.isdir(split_dir):
        raise FileNotFoundError(os.path.join(root, split))
    check_no_symlink_loop(split_dir)
    return find_images_and_targets(split_dir)[1]


def shared_class_to_idx(root: str, train_split: str, val_split: str) -> Dict[str, int]:
    """The training split's mapping, which the validation split must use too (it may lack classes, but a
    validation class unknown to training has no output to be scored on). Each split is scanned once."""
    maps = {}
    for split in (train_split, val_split):
        try:
            maps[split] = folder_class_to_idx(root, split)
        except FileNotFoundError:
            maps[split] = {}
        if not maps[split]:
            raise ConfigError(f"data folder {root} has no '{split}' split with class sub-folders of images; "
                              f"expected {root}/{split}/CLASS/IMAGE")
    unknown = sorted(set(maps[val_split]) - set(maps[train_split]))
    if unknown:
        raise ConfigError(f"the {val_split} split of {root} has classes the {train_split} split lacks "
                          f"({', '.join(unknown[:5])}); every validation class needs training images")
    return maps[train_split]


# the folder each torchvision class reads, as the archives extract
CIFAR_FOLDERS = {CIFAR100.base_folder: CIFAR100, CIFAR10.base_folder: CIFAR10}


def cifar_folder(path: str) -> Optional[Tuple[str, type]]:
    """(root, torchvision class) if `path` is an extracted CIFAR folder or the folder that holds one, else None."""
    path = os.path.normpath(path)
    if os.path.basename(path) in CIFAR_FOLDERS and os.path.isdir(path):
        return os.path.dirname(path) or '.', CIFAR_FOLDERS[os.path.basename(path)]
    for folder, cls in CIFAR_FOLDERS.items():
        if os.path.isdir(os.path.join(path, folder)):
            return path, cls
    return None


def cifar_dataset(path: str, split: str) -> CIFAR10:
    """The 'train' (50,000 images) or test split of the CIFAR folder at `path`, as PIL images."""
    root, cls = cifar_folder(path)
    try:
        return cls(root, train=split == 'train', download=False)
    except RuntimeError as e:  # torchvision: a file is missing or its md5 is not the official one
        raise ConfigError(
            f"{os.path.join(root, cls.base_folder)} is not a complete, unmodified {cls.__name__} folder ({e}); "
            f"extract the official archive from https://www.cs.toronto.edu/~kriz/cifar.html there") from None


def cifar_classes(path: str) -> List[str]:
    """Class names of the CIFAR folder at `path`, in label order (from the smaller test split)."""
    return list(cifar_dataset(path, 'test').classes)


def pad_crop_transform(data_config: dict, padding: int, hflip: float) -> transforms.Compose:
    """CIFAR's standard training augmentation: a random crop of the input size from the image zero-padded by
    `padding` pixels, a horizontal flip with probability `hflip`, normalisation."""
    size = data_config['input_size'][-1]
    return transforms.Compose([
        transforms.Resize(size),  # a no-op at the native 32 px
        transforms.RandomCrop(size, padding=padding),
        transforms.RandomHorizontalFlip(hflip),
        transforms.ToTensor(),
        transforms.Normalize(data_config['mean'], data_config['std']),
    ])


def dataset_name(dataset: str) -> str:
    """What a model card calls the data: 'digits', the folder's own name (never the path on this machine), or
    the NAME of wds/NAME, hfds/NAME (a Hub id as it is, a local folder by its own name)."""
    if dataset == DIGITS:
        return dataset
    if reader_prefix(dataset):
        name = dataset.partition('/')[2]
        return os.path.basename(os.path.normpath(name)) if os.path.isdir(name) else name
    return os.path.basename(os.path.normpath(dataset))


def build_dataset(dataset: str, split: str, train_split: str = 'train', val_split: str = 'validation',
                  class_to_idx: Optional[Dict[str, int]] = None):
    """`dataset` is 'digits', a CIFAR folder, or a folder with train/val sub-folders in ImageFolder layout;
    `class_to_idx` numbers a folder's classes (give the training split's to the validation split)."""
    if dataset == DIGITS:
        if split == 'train':
            return DigitsDataset('train')
        return DigitsDataset('test' if val_split == 'test' else 'val')
    if cifar_folder(dataset):  # the official splits: 'train' and test, whatever the split names say
        return cifar_dataset(dataset, 'train' if split == 'train' else 'test')
    split_name = train_split if split == 'train' else val_split
    check_no_symlink_loop(search_split(dataset, split_name))  # validate reads a split no class scan has seen
    return create_dataset('', root=dataset, split=split_name, is_training=split == 'train', class_map=class_to_idx)


def dataset_classes(dataset) -> List[str]:
    """Class names in index order, from the reader that labels the data."""
    if isinstance(dataset, (DigitsDataset, CIFAR10)):  # CIFAR100 subclasses CIFAR10; `classes` in label order
        return list(dataset.classes)
    if is_iterable(dataset) or not isinstance(dataset.reader, ReaderImageFolder):
        return reader_classes(dataset)  # wds/hfds/hfids/tfds
    class_to_idx = dataset.reader.class_to_idx
    return sorted(class_to_idx, key=class_to_idx.get)


class EpochShuffleSampler(torch.utils.data.Sampler):
    """A shuffle that depends only on (seed, epoch), split across `num_replicas` processes by striding.

    With one process it yields the whole permutation; with N processes, process r takes every N-th index
    from r, so the N local batches of one step together hold exactly the samples of the single-process
    batch of N times the size. Training on 1 or N processes therefore sees the same global batches.
    `skip` drops the first samples of this process's share (resuming in the middle of an epoch).
    """

    def __init__(self, length: int, num_replicas: int = 1, rank: int = 0, seed: int = 0, shuffle: bool = True):
        self.length = length
        self.num_replicas = num_replicas
        self.rank = rank
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.skip = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _indices(self) -> List[int]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.length, generator=generator).tolist()
        else:
            order = list(range(self.length))
        if self.shuffle:  # equal shares so every process runs the same number of steps
            order = order[:self.length - self.length % self.num_replicas]
        return order[self.rank::self.num_replicas]

    def __iter__(self) -> Iterator[int]:
        return iter(self._indices()[self.skip:])

    def __len__(self) -> int:
        return max(0, len(self._indices()) - self.skip)


def train_sample_count(dataset) -> int:
    """The samples of a training epoch: the dataset's, or its reader's count (an iterable dataset's length is
    padded to whole batches per loader worker)."""
    return dataset.reader.num_samples if is_iterable(dataset) else len(dataset)


def start_epoch(loader, epoch: int, skip_samples: int) -> None:
    """Sets the shuffle of the training loader's epoch; `skip_samples` of this process's share are skipped
    (resuming mid-epoch; iterable datasets always start an epoch at its first step)."""
    if is_iterable(loader.dataset):
        loader.set_epoch(epoch)
        return
    loader.sampler.set_epoch(epoch)
    loader.sampler.skip = skip_samples


def create_train_eval_loaders(
        train_set, val_set, data_config: dict, cfg_data, *, num_replicas: int, rank: int, seed: int,
        pin_memory: bool) -> Tuple[torch.utils.data.DataLoader, torch.utils.data.DataLoader]:
    """Loaders with timm's transforms (a padded random crop for `cfg_data.pad_crop` > 0); the train loader's
    sampler is an EpochShuffleSampler, or for an iterable dataset the loader is a `readers.EpochLoader`."""
    if cfg_data.pad_crop:
        train_set.transform = pad_crop_transform(data_config, cfg_data.pad_crop, cfg_data.hflip)
    else:
        train_set.transform = create_transform(
            data_config['input_size'], is_training=True, scale=tuple(cfg_data.scale), ratio=tuple(cfg_data.ratio),
            hflip=cfg_data.hflip, color_jitter=cfg_data.color_jitter, auto_augment=cfg_data.auto_augment,
            re_prob=cfg_data.re_prob, interpolation=data_config['interpolation'], mean=data_config['mean'],
            std=data_config['std'])
    val_set.transform = create_transform(
        data_config['input_size'], is_training=False, interpolation=data_config['interpolation'],
        mean=data_config['mean'], std=data_config['std'], crop_pct=data_config['crop_pct'],
        crop_mode=data_config.get('crop_mode'))
    decode_as_rgb(train_set)
    decode_as_rgb(val_set)
    if is_iterable(train_set):
        return create_iterable_loaders(train_set, val_set, cfg_data, num_replicas=num_replicas, rank=rank,
                                       pin_memory=pin_memory)
    common = dict(num_workers=cfg_data.workers, pin_memory=pin_memory,
                  # workers restart every epoch so their seeds derive from the epoch's seed (exact resume)
                  persistent_workers=False)
    train_loader = torch.utils.data.DataLoader(
        train_set, batch_size=cfg_data.batch_size, drop_last=True,
        sampler=EpochShuffleSampler(len(train_set), num_replicas, rank, seed, shuffle=True), **common)
    val_loader = torch.utils.data.DataLoader(
        val_set, batch_size=cfg_data.eval_batch_size or cfg_data.batch_size, drop_last=False,
        sampler=EpochShuffleSampler(len(val_set), num_replicas, rank, seed, shuffle=False), **common)
    return train_loader, val_loader

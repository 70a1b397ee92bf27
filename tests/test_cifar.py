""" CIFAR-10/100 as distributed: a small folder written here in the exact on-disk format of the official archives
(Python pickles of uint8 rows and label lists), read through torchvision, trained through `bam-models train`. """
import hashlib
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.datasets import CIFAR10, CIFAR100

from bam_models.cli import main
from bam_models.train.config import ConfigError, load_config
from bam_models.train.data import build_dataset, cifar_classes, pad_crop_transform

ROOT = Path(__file__).resolve().parents[1]
FINE_NAMES = [f'fine{i:02d}' for i in range(100)]


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _write_batch(path: Path, images: np.ndarray, labels, label_key: str, **extra) -> None:
    """One batch file as the archives hold it: `data` rows of 3072 uint8 (1024 R, 1024 G, 1024 B), labels."""
    batch = {'batch_label': path.name, 'data': images.reshape(len(images), -1), label_key: list(labels),
             'filenames': [f'img{i}.png' for i in range(len(images))], **extra}
    with open(path, 'wb') as f:
        pickle.dump(batch, f, protocol=2)


def _images(count: int, labels, seed: int) -> np.ndarray:
    """Images whose red channel's mean encodes the class, so the labels are learnable."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 64, size=(count, 3, 32, 32), dtype=np.uint8)
    images[:, 0] += (np.asarray(labels, dtype=np.uint8) * 2)[:, None, None]
    return images


@pytest.fixture
def cifar100(tmp_path, monkeypatch):
    """tmp/cifar-100-python/{train,test,meta}, 40 train and 20 test images of classes 0-3, with torchvision's
    official-release checksums pointed at these files (the test's files cannot have the real md5s)."""
    folder = tmp_path / 'cifar-100-python'
    folder.mkdir()
    train_labels, test_labels = [i % 4 for i in range(40)], [i % 4 for i in range(20)]
    _write_batch(folder / 'train', _images(40, train_labels, 0), train_labels, 'fine_labels',
                 coarse_labels=[0] * 40)
    _write_batch(folder / 'test', _images(20, test_labels, 1), test_labels, 'fine_labels', coarse_labels=[0] * 20)
    with open(folder / 'meta', 'wb') as f:
        pickle.dump({'fine_label_names': FINE_NAMES, 'coarse_label_names': [f'c{i}' for i in range(20)]}, f,
                    protocol=2)
    monkeypatch.setattr(CIFAR100, 'train_list', [['train', _md5(folder / 'train')]])
    monkeypatch.setattr(CIFAR100, 'test_list', [['test', _md5(folder / 'test')]])
    monkeypatch.setattr(CIFAR100, 'meta', dict(CIFAR100.meta, md5=_md5(folder / 'meta')))
    return tmp_path


def test_cifar_folder_reads_through_torchvision(cifar100):
    train = build_dataset(str(cifar100), 'train')
    test = build_dataset(str(cifar100 / 'cifar-100-python'), 'validation')  # the folder itself works too
    assert isinstance(train, CIFAR100) and (len(train), len(test)) == (40, 20)
    image, label = train[5]
    assert image.size == (32, 32) and label == 1
    assert cifar_classes(str(cifar100)) == FINE_NAMES


def test_a_modified_cifar_file_is_refused_before_it_is_unpickled(cifar100):
    with open(cifar100 / 'cifar-100-python' / 'test', 'ab') as f:
        f.write(b'\0')
    with pytest.raises(ConfigError, match='not a complete, unmodified CIFAR100 folder'):
        cifar_classes(str(cifar100))


def test_pad_crop_is_the_standard_cifar_augmentation():
    transform = pad_crop_transform({'input_size': (3, 32, 32), 'mean': (0.5,) * 3, 'std': (0.5,) * 3}, 4, 1.0)
    from PIL import Image
    image = Image.fromarray(np.full((32, 32, 3), 255, dtype=np.uint8))
    torch.manual_seed(3)
    crops = torch.stack([transform(image) for _ in range(16)])
    assert crops.shape == (16, 3, 32, 32)
    # padding is zeros (-1 after normalisation): some crops show up to 4 rows/columns of it, never more
    padded = (crops[:, 0] == -1).all(dim=1)  # whole padded rows
    assert padded.any() and padded.sum(dim=1).max() <= 4
    assert torch.equal(crops.amax(), torch.tensor(1.0))


def test_bam_models_train_runs_one_epoch_on_cifar_format_data(cifar100, tmp_path, capsys):
    output = tmp_path / 'run'
    # 16 px (the images are resized first) keeps the epoch to seconds; the CIFAR ResNet takes 8 px and up
    sets = ['model.name=resnet18_cifar_bam', f'data.dataset={cifar100}', 'data.input_size=16',
            'data.batch_size=10', 'data.pad_crop=4',
            'schedule.epochs=1', 'schedule.warmup_epochs=0', 'optim.lr=0.05', 'train.progress=false',
            f'train.output={output}']
    assert main(['train', *[a for s in sets for a in ('--set', s)]]) == 0, capsys.readouterr().err
    log = [json.loads(line) for line in (output / 'log.jsonl').read_text().splitlines()]
    assert log and all(np.isfinite(row['train_loss']) for row in log if 'train_loss' in row)
    config = json.loads((output / 'hub' / 'config.json').read_text())
    assert config['num_classes'] == 100 and config['label_names'][:2] == FINE_NAMES[:2]
    assert config['pretrained_cfg']['input_size'] == [3, 16, 16]


@pytest.mark.parametrize('name', sorted(p.name for p in (ROOT / 'configs').glob('*cifar*.yaml')))
def test_cifar_configs_state_their_recipe_and_use_the_real_networks(name):
    cfg = load_config(str(ROOT / 'configs' / name))
    text = (ROOT / 'configs' / name).read_text()
    assert '_cifar' in cfg.model.name and cfg.data.input_size == 32 and cfg.data.pad_crop == 4
    assert 'source' in text.lower() and cfg.data.dataset.endswith(('cifar-100-python', 'cifar100'))


def test_cifar10_folder_is_recognised(tmp_path, monkeypatch):
    folder = tmp_path / 'cifar-10-batches-py'
    folder.mkdir()
    labels = [i % 10 for i in range(20)]
    _write_batch(folder / 'data_batch_1', _images(20, labels, 2), labels, 'labels')
    _write_batch(folder / 'test_batch', _images(20, labels, 3), labels, 'labels')
    with open(folder / 'batches.meta', 'wb') as f:
        pickle.dump({'label_names': [f'name{i}' for i in range(10)], 'num_cases_per_batch': 20}, f, protocol=2)
    monkeypatch.setattr(CIFAR10, 'train_list', [['data_batch_1', _md5(folder / 'data_batch_1')]])
    monkeypatch.setattr(CIFAR10, 'test_list', [['test_batch', _md5(folder / 'test_batch')]])
    monkeypatch.setattr(CIFAR10, 'meta', dict(CIFAR10.meta, md5=_md5(folder / 'batches.meta')))
    dataset = build_dataset(str(tmp_path), 'train')
    assert isinstance(dataset, CIFAR10) and not isinstance(dataset, CIFAR100) and len(dataset) == 20
    assert cifar_classes(str(folder)) == [f'name{i}' for i in range(10)]

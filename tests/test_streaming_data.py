""" Training from timm's readers: webdataset shards written by `bam-models shards` train like the image folder
they came from, a local Hugging Face dataset trains through `hfds/`, and a missing package names the extra. """
import json
import sys

import pytest

from bam_models.cli import main
from bam_models.errors import ConfigError
from bam_models.train import load_config, train

from _assertions import assert_one_error_line
from train_helpers import TINY_SETTINGS

pytest.importorskip('webdataset')


def _digits_folder(root):
    """The digits' whole train (1,137) and val (300) splits as an image folder."""
    from bam_models.train.data import DigitsDataset
    for split in ('train', 'val'):
        dataset = DigitsDataset(split)
        for index in range(len(dataset)):
            image, label = dataset[index]
            folder = root / split / str(label)
            folder.mkdir(parents=True, exist_ok=True)
            image.save(folder / f'{index}.png')
    return root


def _train(tmp_path, name, *sets):
    cfg = load_config(None, [*TINY_SETTINGS, 'schedule.epochs=1', 'data.batch_size=32', 'optim.lr=0.1',
                             f'train.output={tmp_path / name}', *sets])
    train(cfg)
    (record,) = [json.loads(line) for line in (tmp_path / name / 'log.jsonl').read_text().splitlines()]
    return record


@pytest.mark.slow  # two training runs on the whole digits
def test_shards_train_like_the_folder_they_were_written_from(tmp_path):
    folder = _digits_folder(tmp_path / 'digits')
    assert main(['shards', str(folder), '--out', str(tmp_path / 'shards'), '--shard-size', '200']) == 0
    from_folder = _train(tmp_path, 'folder', f'data.dataset={folder}')
    from_shards = _train(tmp_path, 'shards_run', 'data.dataset=wds/digits', f'data.root={tmp_path / "shards"}')
    for record in (from_folder, from_shards):  # 35 full batches of 32 of the 1,137 images, 300 scored
        assert round(record['img_per_s'] * record['epoch_time_s']) == 35 * 32
        assert record['val_images'] == 300
    # the same samples in another order: one epoch from scratch lands within a few points of the folder's
    assert from_folder['val_top1'] > 50 and abs(from_shards['val_top1'] - from_folder['val_top1']) < 15, (
        from_folder, from_shards)
    card = (tmp_path / 'shards_run' / 'hub' / 'README.md').read_text()
    assert 'datasets:\n- digits\n' in card  # the name of wds/digits, not data.root's path


def test_local_hugging_face_dataset_trains_with_its_class_names(tiny_data, tmp_path, monkeypatch):
    datasets = pytest.importorskip('datasets')
    from PIL import Image
    monkeypatch.setenv('HF_DATASETS_OFFLINE', '1')
    names = ['zero', 'one', 'two']
    for split, count in (('train', 24), ('validation', 9)):
        images = [Image.open(next((tiny_data / 'train' / str(i % 3)).glob('*.png'))).convert('RGB')
                  for i in range(count)]
        features = datasets.Features(image=datasets.Image(), label=datasets.ClassLabel(names=names))
        table = datasets.Dataset.from_dict(dict(image=images, label=[i % 3 for i in range(count)]), features=features)
        (tmp_path / 'hf').mkdir(exist_ok=True)
        table.to_parquet(str(tmp_path / 'hf' / f'{split}.parquet'))
    (tmp_path / 'cache').mkdir()
    record = _train(tmp_path, 'run', f'data.dataset=hfds/{tmp_path / "hf"}', f'data.root={tmp_path / "cache"}',
                    'data.batch_size=8')
    assert record['val_images'] == 9
    config = json.loads((tmp_path / 'run' / 'hub' / 'config.json').read_text())
    assert config['label_names'] == names


def test_missing_reader_package_names_the_extra(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, 'webdataset', None)  # import fails as if not installed
    (tmp_path / 'root').mkdir()
    sets = ['model.name=resnet18_bam', 'data.dataset=wds/x', f'data.root={tmp_path / "root"}',
            f'train.output={tmp_path / "out"}']
    code = main(['train', *[arg for s in sets for arg in ('--set', s)]])
    assert_one_error_line(code, capsys.readouterr().err,
                          r"needs the webdataset package; pip install 'bam-models\[scale\]'")


@pytest.mark.parametrize('sets, message', [
    (['data.dataset=wds/x'], 'needs data.root'),
    (['data.dataset=digits', 'data.root=.'], "remove data.root"),
    (['data.dataset=wds/x', 'data.root=/nonexistent-folder'], 'is not a folder'),
])
def test_reader_config_mistakes_are_one_line(sets, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, sets)

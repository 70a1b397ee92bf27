""" `bam-models shards`: an image folder as webdataset shards whose `_info.json` timm's own webdataset reader
parses, images kept as their own bytes, samples shuffled by seed, written atomically, one-line errors. """
import json
import re
import sys
import tarfile
from collections import Counter
from pathlib import Path

import pytest

pytest.importorskip('webdataset')
from timm.data.readers.reader_wds import ReaderWds  # noqa: E402

from bam_models.cli import main  # noqa: E402
from bam_models.shards import write_shards  # noqa: E402

from _assertions import assert_one_error_line  # noqa: E402


def _folder_labels(root: Path, split: str) -> Counter:
    return Counter(int(path.parent.name) for path in (root / split).glob('*/*.png'))


def _members(tar_path: Path) -> dict:
    with tarfile.open(tar_path) as tar:
        return {member.name: tar.extractfile(member).read() for member in tar}


def test_timms_reader_reads_every_sample_once_with_its_own_bytes(tiny_data, tmp_path, capsys):
    out = tmp_path / 'shards'
    assert main(['shards', str(tiny_data), '--out', str(out), '--shard-size', '16']) == 0
    assert 'train: 40 samples in 3 shards train-{000000..000002}.tar' in capsys.readouterr().out
    info = json.loads((out / '_info.json').read_text())
    assert info['label_names'] == [str(c) for c in range(10)] and info['num_classes'] == 10
    train = ReaderWds(str(out), split='train', is_training=True, batch_size=8)
    assert (train.num_samples, train.split_info.shard_lengths) == (40, (16, 16, 8))
    val = ReaderWds(str(out), split='validation')  # evaluation: every shard once, in order
    assert Counter(target for _, target in val) == _folder_labels(tiny_data, 'val')
    members = _members(out / 'train-000000.tar')
    meta = json.loads(members['00000000.json'])
    assert members['00000000.png'] == (tiny_data / meta['filename']).read_bytes()  # not re-encoded
    assert int(members['00000000.cls']) == int(meta['label_name'])
    labels = [int(v) for k, v in members.items() if k.endswith('.cls')]
    assert len(set(labels)) >= 5  # shuffled: a shard of 16 holds many classes, not one or two


def test_the_same_seed_writes_the_same_shards_another_seed_another_order(tiny_data, tmp_path):
    write_shards(tiny_data, tmp_path / 'a', 16, seed=1)
    write_shards(tiny_data, tmp_path / 'b', 16, seed=1)
    write_shards(tiny_data, tmp_path / 'c', 16, seed=2)
    first = (tmp_path / 'a' / 'train-000000.tar').read_bytes()
    assert first == (tmp_path / 'b' / 'train-000000.tar').read_bytes()
    assert first != (tmp_path / 'c' / 'train-000000.tar').read_bytes()


def test_a_second_run_is_refused_unless_overwrite_which_replaces_the_folder(tiny_data, tmp_path, capsys):
    out = tmp_path / 'shards'
    write_shards(tiny_data, out, 100)
    (out / 'stale.txt').write_text('from before')
    args = ['shards', str(tiny_data), '--out', str(out), '--shard-size', '8']
    assert_one_error_line(main(args), capsys.readouterr().err, 'already holds files; pass --overwrite')
    assert len(json.loads((out / '_info.json').read_text())['splits']['train']['filenames']) == 1
    assert main(args + ['--overwrite']) == 0
    assert not (out / 'stale.txt').exists()
    assert len(json.loads((out / '_info.json').read_text())['splits']['train']['filenames']) == 5
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith('.')] == []  # no temporary folder left


def test_a_failed_write_leaves_no_folder(tiny_data, tmp_path, monkeypatch):
    import bam_models.shards as shards
    real = shards._write_split

    def fail_on_validation(out, split, *args):
        if split == 'validation':
            raise OSError(28, 'No space left on device')
        return real(out, split, *args)

    monkeypatch.setattr(shards, '_write_split', fail_on_validation)
    with pytest.raises(OSError):
        write_shards(tiny_data, tmp_path / 'shards', 16)
    assert list(tmp_path.iterdir()) == []


def _image_less_val(tmp_path: Path) -> Path:
    root = tmp_path / 'no_val_images'
    (root / 'train' / 'a').mkdir(parents=True)
    (root / 'val' / 'a').mkdir(parents=True)
    from PIL import Image
    Image.new('RGB', (8, 8)).save(root / 'train' / 'a' / 'x.png')
    return root


@pytest.mark.parametrize('case, pattern', [
    ('missing', 'does not exist'),
    ('empty', 'has no train/ folder'),
    ('image_less', 'has no images in class sub-folders'),
    ('size_zero', '--shard-size must be a whole number of samples, at least 1'),
    ('size_text', '--shard-size must be a whole number'),
    ('no_webdataset', "needs the webdataset package; pip install 'bam-models[scale]'"),
    ('out_is_file', 'is a file; choose another output folder'),
    ('out_under_file', 'is a file; choose another output folder'),
])
def test_mistakes_are_one_line(case, pattern, tiny_data, tmp_path, monkeypatch, capsys):
    root, size = tiny_data, '8'
    if case == 'missing':
        root = tmp_path / 'nowhere'
    elif case == 'empty':
        root = tmp_path / 'empty'
        root.mkdir()
    elif case == 'image_less':
        root = _image_less_val(tmp_path)
    elif case.startswith('size'):
        size = '0' if case == 'size_zero' else 'ten'
    elif case == 'no_webdataset':
        monkeypatch.setitem(sys.modules, 'webdataset', None)  # `import webdataset` fails as if not installed
    out, a_file = tmp_path / 'out', tmp_path / 'a_file'
    if case.startswith('out_'):
        a_file.write_text('not a folder')
        out = a_file if case == 'out_is_file' else a_file / 'shards'
    assert_one_error_line(main(['shards', str(root), '--out', str(out), '--shard-size', size]),
                          capsys.readouterr().err, re.escape(pattern))
    if case.startswith('out_'):
        assert a_file.read_text() == 'not a folder' and sorted(p.name for p in tmp_path.iterdir()) == ['a_file']
    else:
        assert not out.exists()

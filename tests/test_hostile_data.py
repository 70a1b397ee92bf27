""" Odd but ordinary data read right, and user mistakes about data and output folders as one line: symlink
loops, 16-bit images, decompression bombs, a local-dir weights file that leaves its folder, an output under a
file, and model cards that name the dataset, not a path of this machine. """
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

import bam_models  # noqa: F401
from bam_models.cli import main
from bam_models.errors import PretrainedWeightsError, UsageError
from bam_models.hub import create_model_from_name, save_pretrained
from bam_models.train.data import build_dataset, dataset_name, decode_as_rgb, image_as_rgb
from bam_models.visualize import load_images

sys.path.insert(0, str(Path(__file__).parent))
from train_helpers import TINY_SETTINGS, make_digits_folder  # noqa: E402


def _train(data, output, *extra):
    args = ['train', *[a for s in TINY_SETTINGS for a in ('--set', s)], '--set', f'data.dataset={data}',
            '--set', f'train.output={output}', '--set', 'schedule.epochs=1', *extra]
    return main([str(a) for a in args])


def _one_line(capsys):
    err = capsys.readouterr().err.strip()
    assert err.startswith('error: ') and '\n' not in err and 'Traceback' not in err, err
    return err


def _png16(path: Path, value: int, size=(6, 5)) -> Path:
    Image.fromarray(np.full(size[::-1], value, dtype=np.uint16)).save(path)
    return path


def test_a_symlink_loop_in_the_data_is_refused_in_one_line(tmp_path, capsys):
    data = make_digits_folder(tmp_path / 'data')
    os.symlink('..', data / 'train' / '3' / 'again')  # train/3/again -> train/
    assert _train(data, tmp_path / 'out') == 2
    assert 'link' in _one_line(capsys) and not (tmp_path / 'out').exists()


def test_validate_refuses_a_symlink_loop_in_the_split_it_scores(tmp_path, capsys):
    data = make_digits_folder(tmp_path / 'data')
    os.symlink('..', data / 'val' / '3' / 'again')  # val/3/again -> val/: every val image 40 times over
    checkpoint = tmp_path / 'weights.pth'
    torch.save(timm.create_model('resnet18_bam', num_classes=10).state_dict(), checkpoint)
    assert main(['validate', '--model', 'resnet18_bam', '--checkpoint', str(checkpoint), '--data', str(data),
                 '--img-size', '32']) == 2
    assert f"has a link {data / 'val' / '3' / 'again'} -> {data / 'val'}, a folder above it" in _one_line(capsys)


def test_16_bit_grey_images_are_scaled_not_saturated(tmp_path):
    path = _png16(tmp_path / 'grey16.png', 32768)
    with Image.open(path) as image:
        assert image.mode in ('I;16', 'I')
        assert np.asarray(image.convert('RGB')).max() == 255  # what Pillow's own conversion makes of it
        rgb = np.asarray(image_as_rgb(image))
    assert rgb.shape == (5, 6, 3) and np.all(rgb == 128)  # 32768 / 65535 of full scale
    with Image.open(_png16(tmp_path / 'low.png', 1000)) as image:
        assert np.all(np.asarray(image_as_rgb(image)) == 4)


def test_folder_datasets_decode_16_bit_images_as_they_mean(tmp_path):
    for split in ('train', 'val'):
        (tmp_path / split / 'a').mkdir(parents=True)
        _png16(tmp_path / split / 'a' / 'x.png', 16384)
    dataset = build_dataset(str(tmp_path), 'val', val_split='val')
    dataset.transform = np.asarray
    decode_as_rgb(dataset)
    image, label = dataset[0]
    assert label == 0 and np.all(image == 64)


def test_a_decompression_bomb_is_one_line_in_visualize_and_training(tmp_path, capsys, monkeypatch):
    data = make_digits_folder(tmp_path / 'data')
    monkeypatch.setattr(Image, 'MAX_IMAGE_PIXELS', 20)  # 8x8 digits pass; a 2x larger image is a "bomb"
    Image.fromarray(np.zeros((64, 64), dtype=np.uint8)).save(data / 'train' / '0' / 'big.png')
    model = timm.create_model('resnet18_bam', num_classes=10)
    with pytest.raises(UsageError, match='decompression-bomb limit'):
        load_images(model, [str(data / 'train' / '0' / 'big.png')], img_size=32)
    assert _train(data, tmp_path / 'out', '--set', 'data.batch_size=40') == 2
    assert 'decompression-bomb limit' in _one_line(capsys)


def test_a_local_dir_weights_file_linking_outside_the_folder_is_refused(tmp_path):
    folder = tmp_path / 'hub'
    save_pretrained(timm.create_model('resnet18_bam', num_classes=3), folder)
    outside = tmp_path / 'elsewhere.safetensors'
    (folder / 'model.safetensors').rename(outside)
    os.symlink(outside, folder / 'model.safetensors')
    with pytest.raises(PretrainedWeightsError, match='outside the folder'):
        create_model_from_name(f'local-dir:{folder}')


@pytest.mark.parametrize('where', ['file', 'under_file'])
def test_an_output_that_is_or_lies_under_a_file_is_one_line(where, tmp_path, capsys):
    data = make_digits_folder(tmp_path / 'data')
    blocker = tmp_path / 'taken'
    blocker.write_text('not a folder')
    output = blocker if where == 'file' else blocker / 'run'
    assert _train(data, output) == 2
    assert 'is a file' in _one_line(capsys) and blocker.read_text() == 'not a folder'


def test_model_cards_name_the_dataset_not_a_path_of_this_machine(tmp_path):
    assert dataset_name(str(tmp_path / 'flowers')) == 'flowers'
    assert dataset_name(str(tmp_path / 'flowers') + '/') == 'flowers'
    assert dataset_name('digits') == 'digits'
    data = make_digits_folder(tmp_path / 'my_digits')
    assert _train(data, tmp_path / 'out') == 0
    card = (tmp_path / 'out' / 'hub' / 'README.md').read_text()
    dataset_lines = [line for line in card.splitlines() if 'my_digits' in line]
    assert '- my_digits' in dataset_lines and any(line.startswith('| my_digits |') for line in dataset_lines)
    assert not any(str(data) in line for line in dataset_lines)  # the path of this machine is not the dataset

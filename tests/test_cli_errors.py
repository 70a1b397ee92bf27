""" Ordinary mistakes with validate, visualize, export and detect-train end in one line
`error: <what was wrong>; <what to do>` on stderr and exit status 2, never in a traceback; every command takes
the same model names; a checkpoint's stored preprocessing is used by every command. """
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file

import bam_models  # noqa: F401  (registers the zoo)
from bam_models.cli import main
from bam_models.errors import ManifestError, PretrainedWeightsError, UsageError
from bam_models.export import load_exported, trace_size
from bam_models.hub.load import create_model_from_name
from bam_models.visualize import load_images

from _assertions import assert_one_error_line

ARCH = 'resnet18_bam'
_ZERO_KIND = re.compile(r'\b0 (missing|unexpected|mismatched)|\(e\.g\. \[\]\)')


def _one_error(capsys, argv, *patterns) -> str:
    """Runs the CLI; asserts exit 2 and exactly one `error: ...; ...` line matching every pattern."""
    code = main([str(a) for a in argv])
    line = assert_one_error_line(code, capsys.readouterr().err, *patterns)
    assert not _ZERO_KIND.search(line), line
    return line


@pytest.fixture(scope='module')
def files(tmp_path_factory):
    """A valid 10-class checkpoint and every kind of bad weight file, an image and a non-image."""
    folder = tmp_path_factory.mktemp('files')
    state_dict = timm.create_model(ARCH, num_classes=10).state_dict()
    save_file(state_dict, str(folder / 'good.safetensors'))
    data = (folder / 'good.safetensors').read_bytes()
    (folder / 'truncated.safetensors').write_bytes(data[:len(data) // 2])
    (folder / 'random.pth').write_bytes(np.random.default_rng(0).bytes(4096))
    torch.save({'state_dict': state_dict, 'payload': _NotATensor()}, folder / 'pickle.pth')
    save_file(timm.create_model('resnet18_cbam', num_classes=10).state_dict(), str(folder / 'cbam.safetensors'))
    pixels = (np.random.default_rng(0).random((40, 48, 3)) * 255).astype(np.uint8)
    Image.fromarray(pixels).save(folder / 'image.png')
    (folder / 'text.png').write_text('not an image')
    return folder


class _NotATensor:
    """A pickled class: weights_only=True must refuse the file rather than run its code."""


BAD_FILES = {
    'missing.pth': r'does not exist',
    'random.pth': r'could not be read as weights',
    'truncated.safetensors': r'could not be read as weights',
    'pickle.pth': r'could not be read as weights.*weights_only',
    'cbam.safetensors': r'does not fit resnet18_bam: \d+ missing keys.*\d+ unexpected keys',
}


def _command(name, files, tmp_path, *extra):
    if name == 'validate':
        return ['validate', '--model', ARCH, '--data', 'digits', *extra]
    if name == 'visualize':
        return ['visualize', '--model', ARCH, '--image', files / 'image.png', '--out', tmp_path / 'maps.png', *extra]
    return ['export', ARCH, tmp_path / 'model.onnx', *extra]


@pytest.mark.parametrize('command', ['validate', 'visualize', 'export'])
def test_no_weights_names_what_to_pass(capsys, files, tmp_path, command):
    _one_error(capsys, _command(command, files, tmp_path), r'resnet18_bam has no pretrained weights', '--checkpoint')


@pytest.mark.parametrize('command', ['validate', 'visualize', 'export'])
@pytest.mark.parametrize('bad', sorted(BAD_FILES))
def test_bad_weight_files(capsys, files, tmp_path, command, bad):
    line = _one_error(capsys, _command(command, files, tmp_path, '--checkpoint', files / bad), BAD_FILES[bad])
    assert str(files / bad) in line
    assert not (tmp_path / 'model.onnx').exists() and not (tmp_path / 'maps.png').exists()


@pytest.mark.parametrize('command', ['validate', 'visualize', 'export'])
def test_model_name_typos(capsys, files, tmp_path, command):
    argv = _command(command, files, tmp_path)
    argv[argv.index(ARCH)] = 'resnt18_bam'
    _one_error(capsys, argv, r"unknown model 'resnt18_bam'; did you mean resnet18_bam")
    argv[argv.index('resnt18_bam')] = 'resnet18_bam.in1k'
    _one_error(capsys, argv, r"model 'resnet18_bam' has no tag 'in1k'; its tags: tv_in1k$")
    argv[argv.index('resnet18_bam.in1k')] = f'local-dir:{tmp_path / "nothing"}'
    _one_error(capsys, argv, r'nothing: no such folder')
    for text, pattern in (('not json', r'config\.json is not valid JSON'),
                          ('{}', r'config\.json names no architecture'),
                          ('{"architecture": "resnet18_bamm"}',
                           r"unknown model 'resnet18_bamm' .*named in .*config\.json")):
        (tmp_path / 'nothing').mkdir(exist_ok=True)
        (tmp_path / 'nothing' / 'config.json').write_text(text)
        _one_error(capsys, argv, pattern)


@pytest.mark.parametrize('argv,pattern', [
    (['--image', 'missing.png'], r'image .*missing\.png is not an existing file'),
    (['--image', 'text.png'], r'text\.png could not be read as an image'),
    (['--out', 'no_folder/maps.png'], r'the folder of .*no_folder/maps\.png does not exist'),
    (['--out', 'maps.figure'], r'no image suffix matplotlib writes'),
    (['--target-layer', 'layer5'], r"no module 'layer5' \(did you mean layer4"),
    (['--img-size', '-1'], r'--img-size must be a positive number'),
])
def test_visualize_inputs(capsys, files, tmp_path, argv, pattern):
    args = {'--image': files / 'image.png', '--out': tmp_path / 'maps.png'}
    option, value = argv
    args[option] = files / value if option == '--image' else (tmp_path / value if option == '--out' else value)
    _one_error(capsys, ['visualize', '--model', ARCH, '--random-init', *[x for kv in args.items() for x in kv]],
               pattern)
    assert not (tmp_path / 'maps.png').exists()


def test_visualize_a_model_without_attention(capsys, files, tmp_path):
    _one_error(capsys, ['visualize', '--model', 'resnet18', '--random-init', '--image', files / 'image.png',
                        '--out', tmp_path / 'maps.png'], r'found no BAM or CBAM module in ResNet')


def test_empty_image_batch():
    with pytest.raises(UsageError, match='no images given'):
        load_images(timm.create_model(ARCH, num_classes=2), [])


@pytest.mark.parametrize('extra,pattern', [
    (['--img-size', '0'], r'--img-size must be a positive number, got 0'),
    (['--batch-size', '0'], r'--batch-size must be a positive number'),
])
def test_validate_numbers(capsys, files, extra, pattern):
    _one_error(capsys, ['validate', '--model', ARCH, '--checkpoint', files / 'good.safetensors', '--data', 'digits',
                        *extra], pattern)


def test_validate_folders(capsys, files, tmp_path):
    checkpoint = ['--model', ARCH, '--checkpoint', files / 'good.safetensors']
    _one_error(capsys, ['validate', *checkpoint, '--data', tmp_path / 'none'], r"is neither 'digits' nor a folder")
    # a folder with only a train split: timm's reader would silently score the whole folder, train/ as a class
    (tmp_path / 'train' / 'a').mkdir(parents=True)
    Image.new('RGB', (8, 8)).save(tmp_path / 'train' / 'a' / '0.png')
    _one_error(capsys, ['validate', *checkpoint, '--data', tmp_path],
               r'has no validation split \(looked for validation/, val/')
    (tmp_path / 'val').mkdir()
    _one_error(capsys, ['validate', *checkpoint, '--data', tmp_path], r'holds no images')


def test_validate_more_classes_than_outputs(capsys, files, tmp_path):
    save_file(timm.create_model(ARCH, num_classes=3).state_dict(), str(tmp_path / 'three.safetensors'))
    _one_error(capsys, ['validate', '--model', ARCH, '--checkpoint', tmp_path / 'three.safetensors',
                        '--data', 'digits'],
               r'digits has 10 classes but resnet18_bam predicts 3')


@pytest.mark.parametrize('argv,pattern', [
    (['--input-size', '0', '0'], r'--img-size 0 0 is too small for resnet18_bam: H and W must be at least 33'),
    (['--img-size', '32'], r'--img-size 32 32 is too small for resnet18_bam: .*; pass e.g. --img-size 224$'),
    (['--format', 'torchscript', '--out-is-folder'], r'is a folder; pass the path of the file to write'),
])
def test_export_inputs(capsys, files, tmp_path, argv, pattern):
    out = tmp_path / 'model.onnx'
    if '--out-is-folder' in argv:
        argv, out = argv[:-1], tmp_path
    _one_error(capsys, ['export', ARCH, out, '--checkpoint', files / 'good.safetensors', *argv], pattern)


def test_detect_train_missing_inputs(capsys, files, tmp_path):
    base = ['detect-train', '--out', tmp_path / 'run', '--backbone', ARCH]
    _one_error(capsys, [*base, '--images', files, '--annotations', tmp_path / 'instances.json'],
               r'--annotations .*instances\.json is not an existing file; pass the COCO instances JSON')
    _one_error(capsys, [*base, '--images', tmp_path / 'none', '--annotations', files / 'image.png'],
               r'--images .* is not an existing folder')
    _one_error(capsys, [*base, '--images', files, '--annotations', files / 'image.png', '--val-images', files],
               r'--val-images and --val-annotations go together')
    assert not (tmp_path / 'run').exists()


def test_export_takes_local_dir_names(capsys, tmp_path):
    """`export local-dir:PATH` refused ("has no pretrained cfg registered") what validate and visualize took."""
    model = timm.create_model('mobilenetv1_100_bam', num_classes=3).eval()
    timm.models.save_for_hf(model, str(tmp_path / 'hub'))
    out = tmp_path / 'model.pt'
    assert main(['export', f'local-dir:{tmp_path / "hub"}', str(out), '--format', 'torchscript',
                 '--input-size', '64', '64', '--no-check']) == 0
    assert f'wrote {out}' in capsys.readouterr().out
    x = torch.randn(2, 3, 64, 80)
    with torch.no_grad():
        torch.testing.assert_close(load_exported(out, 'torchscript')(x), model(x), atol=1e-4, rtol=0)


def _trained_checkpoints(tmp_path):
    """A best.pth (resolved data_config) and a last.pth (only the run config) of a 32 px run."""
    state_dict = timm.create_model(ARCH, num_classes=10).state_dict()
    data_config = dict(input_size=(3, 32, 32), interpolation='bilinear', mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25),
                       crop_pct=1.0, crop_mode='center')
    torch.save(dict(state_dict=state_dict, epoch=0, data_config=data_config), tmp_path / 'best.pth')
    torch.save(dict(state_dict=state_dict, epoch=1, config=dict(data=dict(input_size=32, crop_pct=1.0, mean=[0.5] * 3,
                                                                        std=[0.25] * 3))), tmp_path / 'last.pth')
    return tmp_path / 'best.pth', tmp_path / 'last.pth'


def test_checkpoint_preprocessing_reaches_every_command(capsys, files, tmp_path):
    best, last = _trained_checkpoints(tmp_path)
    for checkpoint in (best, last):
        model = create_model_from_name(ARCH, str(checkpoint))
        assert model.pretrained_cfg['input_size'] == (3, 32, 32)
        assert tuple(model.pretrained_cfg['mean']) == (0.5, 0.5, 0.5) and model.pretrained_cfg['crop_pct'] == 1.0
        assert trace_size(model) == (33, 33)  # export traces at the training size, raised to its smallest side
    assert main(['visualize', '--model', ARCH, '--checkpoint', str(best), '--image', str(files / 'image.png'),
                 '--out', str(tmp_path / 'maps.png')]) == 0
    assert 'layer1: 1 BAM, 8x8' in capsys.readouterr().out  # 32 px / 4, not 224 px / 4 = 56
    for name in ('a', 'b'):
        (tmp_path / 'data' / 'val' / name).mkdir(parents=True)
        Image.open(files / 'image.png').save(tmp_path / 'data' / 'val' / name / 'image.png')
    assert main(['validate', '--model', ARCH, '--checkpoint', str(last), '--data', str(tmp_path / 'data')]) == 0
    assert '(2 images at 32px)' in capsys.readouterr().out


def test_unreachable_pretrained_weights_of_a_timm_model(tmp_path, monkeypatch):
    from huggingface_hub import constants
    monkeypatch.setattr(constants, 'HF_HUB_OFFLINE', True)
    monkeypatch.setattr(constants, 'HF_HUB_CACHE', str(tmp_path))
    with pytest.raises(PretrainedWeightsError, match='resnet18: HF_HUB_OFFLINE is set and the file is not in the'):
        create_model_from_name('resnet18')


# ------------------------------------------------------ settings read at import, insert: through a real process

def _cli_process(args, tmp_path, **env):
    """`python -m bam_models.cli ARGS` in a fresh interpreter, so that import-time settings are read again."""
    environment = {**os.environ, 'PYTHONPATH': str(Path(__file__).parents[1]), **env}
    return subprocess.run([sys.executable, '-m', 'bam_models.cli', *map(str, args)], env=environment, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)


def _one_error_line(proc, *patterns) -> str:
    return assert_one_error_line(proc.returncode, proc.stderr, *patterns, alone=True)


@pytest.mark.parametrize('env, pattern', [
    (dict(BAM_MODELS_FUSED_GATING='yes'), r"BAM_MODELS_FUSED_GATING='yes' is not a valid setting; set it to 1"),
    (dict(BAM_MODELS_GATING_AUTOTUNE='2'), r"BAM_MODELS_GATING_AUTOTUNE='2' is not a valid setting; set it to 1"),
    (dict(BAM_MODELS_MANIFEST='/nope/manifest.json'),
     r'weights manifest /nope/manifest\.json cannot be read \(FileNotFoundError\); unset BAM_MODELS_MANIFEST'),
    (dict(BAM_MODELS_MANIFEST='{tmp}/broken.json'), r'broken\.json is not valid JSON'),
    (dict(BAM_MODELS_MANIFEST='{tmp}/partial.json'), r"entry 'resnet18_bam\.tv_in1k' lacks kind, published"),
])
@pytest.mark.slow  # a subprocess or torch.compile
def test_bad_settings_read_at_import_are_one_error_line(tmp_path, env, pattern):
    (tmp_path / 'broken.json').write_text('{"weights": ')
    (tmp_path / 'partial.json').write_text(json.dumps(
        {'schema_version': 1, 'weights': {'resnet18_bam.tv_in1k': {'architecture': 'resnet18_bam', 'tag': 'tv_in1k',
                                                                   'default': False}}}))
    proc = _cli_process(['list'], tmp_path, **{k: v.format(tmp=tmp_path) for k, v in env.items()})
    _one_error_line(proc, pattern)


def test_a_bad_manifest_fails_as_manifest_error_where_weights_are_read(tmp_path, monkeypatch):
    monkeypatch.setenv('BAM_MODELS_MANIFEST', str(tmp_path / 'absent.json'))
    with pytest.raises(ManifestError, match='absent.json cannot be read'):
        timm.create_model('resnet18_bam.tv_in1k', pretrained=True)


@pytest.mark.slow  # a subprocess or torch.compile
def test_insert_errors_are_one_line_from_the_cli(tmp_path):
    (tmp_path / 'full').mkdir()
    (tmp_path / 'full' / 'notes.txt').write_text('keep me')
    _one_error_line(_cli_process(['insert', 'mobilenetv3_small_050', tmp_path / 'full'], tmp_path),
                    r'OUT .*full is not an empty folder; .*pass a new or empty folder')
    assert (tmp_path / 'full' / 'notes.txt').read_text() == 'keep me'
    _one_error_line(_cli_process(['insert', 'convnext_tinyy', tmp_path / 'new'], tmp_path),
                    r"unknown model 'convnext_tinyy'; did you mean convnext_tiny")
    assert not (tmp_path / 'new').exists()
    # a model the attention does not fit: refused before anything is written, no folder left behind
    _one_error_line(_cli_process(['insert', 'convnext_atto', tmp_path / 'new', '--attention', 'cbam'], tmp_path),
                    r'none of its blocks has an attention slot')
    assert not (tmp_path / 'new').exists()

""" One CLI vocabulary: the same flag for the same thing in every command (`--model`, `--out`, `--img-size`,
`--device`, `--batch-size`), the spellings of the last release still accepted for one release. """
import pytest
import timm

import bam_models  # noqa: F401
from bam_models.cli import build_parser, main
from bam_models.commands.options import img_size, settle_options

from _assertions import assert_one_error_line

NEW_FLAGS = {
    'export': ['--model', '--out', '--img-size'],
    'insert': ['--model', '--out'],
    'convert': ['--model', '--out'],
    'detect-train': ['--model', '--out', '--batch-size', '--device'],
    'demo': ['--out'],
    'validate': ['--model', '--img-size', '--batch-size', '--device'],
    'visualize': ['--model', '--out', '--img-size'],
    'benchmark': ['--img-size', '--batch-size'],
    'publish': ['--out'],
}


def _parse(argv):
    return settle_options(*build_parser().parse_known_args(argv))


@pytest.mark.parametrize('command, flags', list(NEW_FLAGS.items()))
def test_every_command_spells_the_shared_flags_alike(command, flags, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, '--help'])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert [flag for flag in flags if flag not in text] == []


@pytest.mark.parametrize('old, new', [
    (['export', 'resnet18_bam', 'm.onnx'], dict(model='resnet18_bam', out='m.onnx')),
    (['export', 'resnet18_bam', '--format', 'onnx', '--input-size', '64', '96', 'm.onnx'],
     dict(model='resnet18_bam', out='m.onnx')),
    (['insert', 'resnet18', 'folder'], dict(model='resnet18', out='folder')),
    (['convert', '--from', 'official', '--arch', 'resnet50_bam', 'in.pth', 'folder'],
     dict(model='resnet50_bam', out='folder', input='in.pth')),
    (['detect-train', '--images', 'i', '--annotations', 'a.json', '--out', 'o', '--backbone', 'resnet18_cbam'],
     dict(backbone='resnet18_cbam')),
    (['demo', '--output', 'runs/x'], dict(out='runs/x')),
])
def test_the_old_spellings_still_work(old, new):
    args = _parse(old)
    assert {key: getattr(args, key) for key in new} == new


def test_new_and_old_size_spellings_give_the_same_size():
    square = _parse(['export', '--model', 'resnet18_bam', '--out', 'm.onnx', '--img-size', '64'])
    pair = _parse(['export', '--model', 'resnet18_bam', '--out', 'm.onnx', '--img-size', '64', '96'])
    old = _parse(['export', 'resnet18_bam', 'm.onnx', '--input-size', '64', '96'])
    assert img_size(square) == (64, 64) and img_size(pair) == img_size(old) == (64, 96)


@pytest.mark.parametrize('argv, pattern', [
    (['export', 'resnet18_bam', '--model', 'resnet50_bam', '--out', 'm.onnx'], 'MODEL given twice'),
    (['insert', '--model', 'resnet18'], 'insert needs --out'),
    (['export', '--model', 'resnet18_bam', '--out', 'm.onnx', '--img-size', '1', '2', '3'], 'one size N or two'),
    (['validate', '--model', 'resnet18_bam', '--data', 'digits', '--device', 'gpu0'], 'is not a device'),
    (['list', 'x', 'y'], 'unrecognized arguments y'),
])
def test_contradictions_and_mistakes_are_one_line(argv, pattern, capsys):
    assert_one_error_line(main(argv), capsys.readouterr().err, pattern, alone=True)


def test_insert_with_the_new_flags_writes_a_folder_timm_reloads(tmp_path, capsys):
    out = tmp_path / 'inserted'
    assert main(['insert', '--model', 'resnet18', '--out', str(out)]) == 0
    assert "pretrained=True" in capsys.readouterr().out
    model = timm.create_model(f'local-dir:{out}', pretrained=True)
    assert sum(isinstance(m, bam_models.BAM) for m in model.modules()) == 3

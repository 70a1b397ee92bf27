""" Export to ONNX (onnxruntime), TorchScript and torch.export: outputs match PyTorch at other input sizes. """
from pathlib import Path

import onnx
import pytest
import timm
import torch

import bam_models  # noqa: F401  (registers the zoo)
from bam_models.cli import main
from bam_models.export import compare_with_pytorch, create_model_for_export, export_model, export_onnx

from _weights import with_nontrivial_norms

TOLERANCE = 1e-4
# two batch sizes and two non-square sizes, none of them the traced 2x3x64x96
SHAPES = ((1, 3, 96, 64), (3, 3, 64, 128))
SUFFIX = {'onnx': '.onnx', 'torchscript': '.pt', 'exported': '.pt2'}


def _onnx_dynamic_axes(path) -> list:
    dims = onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim
    return [i for i, dim in enumerate(dims) if dim.dim_param]


def test_cli_exports_a_checkpoint_in_every_format(tmp_path, capsys):
    model = with_nontrivial_norms(timm.create_model('resnet18_bam', num_classes=7))
    checkpoint = tmp_path / 'finetuned.pth'
    torch.save(model.state_dict(), checkpoint)
    for fmt in ('onnx', 'torchscript', 'exported'):
        out = tmp_path / fmt / f'resnet18_bam{SUFFIX[fmt]}'
        assert main(['export', 'resnet18_bam', '--format', fmt, '--checkpoint', str(checkpoint),
                     '--input-size', '64', '96', str(out)]) == 0
        printed = capsys.readouterr().out
        assert 'max abs diff vs PyTorch' in printed
        # every file written is named (the ONNX exporter puts the weights into a .onnx.data file), no other
        named = {Path(line.split()[1]) for line in printed.splitlines() if line.startswith('wrote ')}
        assert named == set(out.parent.iterdir()), (printed, list(out.parent.iterdir()))
        if fmt == 'onnx':  # the files named besides the graph are exactly those its initializers point to
            graph = onnx.load(str(out), load_external_data=False).graph
            locations = {entry.value for init in graph.initializer for entry in init.external_data
                         if entry.key == 'location'}
            assert {p.name for p in named if p != out} == locations
        # checked again here against the model the checkpoint came from, not the one the command rebuilt
        diffs = compare_with_pytorch(model, out, fmt, SHAPES)
        assert max(diffs) <= TOLERANCE, (fmt, diffs)
        if fmt == 'onnx':
            assert _onnx_dynamic_axes(out) == [0, 2, 3]


def test_cli_refuses_to_export_random_weights_silently(tmp_path, capsys):
    assert main(['export', 'resnet18_bam', str(tmp_path / 'x.onnx')]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith('error: resnet18_bam has no pretrained weights') and '--random-init' in error
    assert '\n' not in error and not (tmp_path / 'x.onnx').exists()


def test_checkpoint_sets_num_classes_and_must_fit(tmp_path):
    source = timm.create_model('mobilenetv1_100_bam', num_classes=5)
    checkpoint = tmp_path / 'ckpt.pth'
    torch.save({'state_dict': {f'module.{k}': v for k, v in source.state_dict().items()}}, checkpoint)
    model = create_model_for_export('mobilenetv1_100_bam', checkpoint=str(checkpoint))
    assert model.num_classes == 5
    torch.testing.assert_close(model.state_dict(), source.state_dict())
    with pytest.raises(ValueError, match='does not fit resnet18_bam'):
        create_model_for_export('resnet18_bam', checkpoint=str(checkpoint))


@pytest.mark.parametrize('name,formats', [
    ('resnet18_cbam', ('onnx',)),
    ('mobilenetv1_100_bam', ('onnx',)),
    ('resnext50_32x4d_bam', ('torchscript',)),
])
def test_every_family_exports(tmp_path, name, formats):
    model = with_nontrivial_norms(timm.create_model(name, num_classes=10))
    for fmt in formats:
        out = tmp_path / f'{name}{SUFFIX[fmt]}'
        export_model(model, out, fmt, input_size=(64, 96))
        diffs = compare_with_pytorch(model, out, fmt, SHAPES)
        assert max(diffs) <= TOLERANCE, (fmt, diffs)


def test_onnx_falls_back_to_the_torchscript_exporter(tmp_path, monkeypatch):
    real_export = torch.onnx.export

    def dynamo_unavailable(*args, dynamo=True, **kwargs):
        if dynamo:
            raise RuntimeError('dynamo exporter unavailable')
        return real_export(*args, dynamo=False, **kwargs)

    monkeypatch.setattr(torch.onnx, 'export', dynamo_unavailable)
    model = with_nontrivial_norms(timm.create_model('resnet18_bam', num_classes=10))
    out = tmp_path / 'fallback.onnx'
    with pytest.warns(UserWarning, match='falling back'):
        assert export_onnx(model, out, torch.randn(2, 3, 64, 96)) == 'torchscript'
    assert _onnx_dynamic_axes(out) == [0, 2, 3]
    assert max(compare_with_pytorch(model, out, 'onnx', SHAPES)) <= TOLERANCE

""" A non-editable wheel carries every subpackage, the package data and the console script. """
import subprocess
import sys
import zipfile

import pytest


@pytest.fixture(scope='module')
def wheel(tmp_path_factory, request):
    out = tmp_path_factory.mktemp('wheel')
    root = request.config.rootpath
    subprocess.run([sys.executable, '-m', 'pip', 'wheel', '--no-deps', '--no-build-isolation', '-q',
                    '-w', str(out), str(root)], check=True)
    (path,) = out.glob('bam_models-*.whl')
    return path


def test_wheel_contents(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    for module in ('bam_models/__init__.py', 'bam_models/layers/bam.py', 'bam_models/layers/cbam.py',
                   'bam_models/models/attention_resnet.py', 'bam_models/models/bam_mobilenetv1.py',
                   'bam_models/commands/list_models.py', 'bam_models/cli.py',
                   'bam_models/weights_manifest.json', 'bam_models/weights_manifest.schema.json'):
        assert module in names, module
    entry_points = next(n for n in names if n.endswith('entry_points.txt'))
    assert 'bam-models = bam_models.cli:main' in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_wheel_installs_and_registers_models(wheel, tmp_path):
    target = tmp_path / 'site'
    subprocess.run([sys.executable, '-m', 'pip', 'install', '--no-deps', '-q', '--target', str(target), str(wheel)],
                   check=True)
    code = ("import bam_models, timm; from bam_models.hub.manifest import load_manifest, manifest_path; "
            "assert bam_models.__file__.startswith(%r), bam_models.__file__; "
            "assert str(manifest_path()).startswith(%r); load_manifest(); "
            "print(len(timm.list_models('*_bam')), len(timm.list_models('*_cbam')), "
            "len(timm.list_pretrained('resnet50_bam.*')))" % (str(target), str(target)))
    result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                            env={'PYTHONPATH': str(target), 'PATH': ''}, cwd=tmp_path, check=True)
    assert result.stdout.split() == ['12', '8', '1']  # the trunk tag; unpublished tags list no weights

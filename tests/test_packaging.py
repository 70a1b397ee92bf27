""" A non-editable wheel carries every subpackage, the package data and the console script; the licence and
citation files say what pyproject declares. """
import subprocess
import sys
import zipfile

import pytest
import yaml

import bam_models


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


@pytest.mark.slow  # a subprocess or torch.compile
def test_wheel_installs_and_registers_models(wheel, tmp_path):
    target = tmp_path / 'site'
    subprocess.run([sys.executable, '-m', 'pip', 'install', '--no-deps', '-q', '--target', str(target), str(wheel)],
                   check=True)
    code = ("import bam_models, timm; from bam_models.weights.manifest import load_manifest, manifest_path; "
            "assert bam_models.__file__.startswith(%r), bam_models.__file__; "
            "assert str(manifest_path()).startswith(%r); load_manifest(); "
            "print(len(timm.list_models('*_bam')), len(timm.list_models('*_cbam')), "
            "len(timm.list_pretrained('resnet50_bam.*')))" % (str(target), str(target)))
    result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                            env={'PYTHONPATH': str(target), 'PATH': ''}, cwd=tmp_path, check=True)
    zoo = bam_models.list_zoo_models()
    expected = [str(sum(n.endswith('_bam') for n in zoo)), str(sum(n.endswith('_cbam') for n in zoo)), '1']
    assert result.stdout.split() == expected  # every zoo model; the trunk tag (unpublished tags list no weights)


def test_license_file_matches_pyproject(request):
    tomllib = pytest.importorskip('tomllib')  # Python 3.11+
    root = request.config.rootpath
    declared = tomllib.loads((root / 'pyproject.toml').read_text())['project']['license']
    license_text = (root / 'LICENSE').read_text()
    assert declared == 'MIT'
    assert license_text.startswith('MIT License\n')
    assert 'Permission is hereby granted, free of charge' in license_text


def _paper(entry):
    return entry['title'], [(a['given-names'], a['family-names']) for a in entry['authors']], entry['year']


def test_citation_cites_both_papers(request):
    citation = yaml.safe_load((request.config.rootpath / 'CITATION.cff').read_text())
    assert citation['cff-version'] == '1.2.0'
    assert citation['license'] == 'MIT'
    bam = ('BAM: Bottleneck Attention Module',
           [('Jongchan', 'Park'), ('Sanghyun', 'Woo'), ('Joon-Young', 'Lee'), ('In So', 'Kweon')], 2018)
    cbam = ('CBAM: Convolutional Block Attention Module',
            [('Sanghyun', 'Woo'), ('Jongchan', 'Park'), ('Joon-Young', 'Lee'), ('In So', 'Kweon')], 2018)
    assert _paper(citation['preferred-citation']) == bam
    assert 'BMVC' in citation['preferred-citation']['conference']['name']
    references = {entry['title']: entry for entry in citation['references']}
    assert [_paper(references[paper[0]]) for paper in (bam, cbam)] == [bam, cbam]
    assert 'ECCV' in references[cbam[0]]['conference']['name']

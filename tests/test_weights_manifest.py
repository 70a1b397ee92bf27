""" The weights manifest: schema, packaging, and the timm cfgs generated from it. """
import copy
import json
from pathlib import Path

import jsonschema
import pytest
import timm
from timm.models import get_pretrained_cfg

import bam_models
from bam_models.weights.manifest import PACKAGED_MANIFEST, SCHEMA_PATH, load_manifest, manifest_default_cfgs
from bam_models.benchmark import count_params

ROOT_MANIFEST = Path(__file__).parents[1] / 'weights_manifest.json'


@pytest.fixture(scope='module')
def manifest():
    return load_manifest(PACKAGED_MANIFEST)


@pytest.fixture(scope='module')
def validator():
    return jsonschema.Draft202012Validator(json.loads(SCHEMA_PATH.read_text()))


def test_manifest_matches_schema_and_is_packaged(manifest, validator):
    validator.validate(manifest)
    # the package ships the repo-root manifest itself (a symlink, whose content setuptools copies into wheels)
    assert PACKAGED_MANIFEST.read_bytes() == ROOT_MANIFEST.read_bytes()


@pytest.mark.parametrize('breakage', [
    lambda e: e.update(sha256=None, size=None) or e.pop('unverified_reason'),  # unknown hash must say why
    lambda e: e.update(sha256='ab' * 32, size=10),  # a known hash must not carry an unverified reason
    lambda e: e.update(revision='main'),  # pins are commits
    lambda e: e.update(filename='pytorch_model.bin'),  # safetensors only
    lambda e: e['metrics'].append({'dataset': 'imagenet-1k', 'top1': 77.0, 'reference': 'x'}),  # who measured?
    lambda e: e.update(default=True, kind='trunk', source=dict(e['source'], trunk_of='resnet50.tv_in1k')),
])
def test_schema_rejects_broken_entries(manifest, validator, breakage):
    broken = copy.deepcopy(manifest)
    breakage(broken['weights']['resnet50_bam.official_in1k'])
    with pytest.raises(jsonschema.ValidationError):
        validator.validate(broken)


# networks with no ImageNet weights of their plain trunk anywhere: the CIFAR family and the papers' WideResNet-18
WITHOUT_TRUNK_WEIGHTS = ('_cifar', 'wide_resnet18_')


def test_every_zoo_model_has_a_trunk_tag_whose_cfg_follows_the_weights(manifest):
    for arch in bam_models.list_zoo_models():
        trunks = [e for e in manifest['weights'].values() if e['architecture'] == arch and e['kind'] == 'trunk']
        if any(marker in arch for marker in WITHOUT_TRUNK_WEIGHTS):
            assert not trunks, arch
            continue
        assert len(trunks) == 1, arch
        entry = trunks[0]
        timm_cfg = get_pretrained_cfg(entry['source']['trunk_of']).to_dict()
        assert entry['hf_hub_id'] == timm_cfg['hf_hub_id']
        for key, value in entry['pretrained_cfg'].items():
            assert timm_cfg[key] == (tuple(value) if isinstance(value, list) else value), (arch, key)
        assert entry['num_params'] == count_params(timm.create_model(timm_cfg['architecture'], device='meta'))
        # the registered cfg is the manifest's, e.g. the inception mean/std of mobilenetv1's ra4 weights
        registered = get_pretrained_cfg(f"{arch}.{entry['tag']}")
        assert registered.mean == timm_cfg['mean'] and registered.hf_hub_id == entry['hf_hub_id']


def test_default_tags(manifest):
    assert get_pretrained_cfg('resnet50_bam').tag == 'official_in1k'
    assert get_pretrained_cfg('resnet50_cbam').tag == 'official_in1k'
    for name in ('resnet50_bam', 'resnet50_cbam'):
        entry = manifest['weights'][f'{name}.official_in1k']
        assert entry['num_params'] == count_params(timm.create_model(name, device='meta'))
        # unpublished: not advertised as pretrained until the file and its hash exist
        assert not entry['published'] and get_pretrained_cfg(name).hf_hub_id is None
    for name in bam_models.list_zoo_models():
        if name not in ('resnet50_bam', 'resnet50_cbam'):
            assert get_pretrained_cfg(name).tag is None and not get_pretrained_cfg(name).has_weights, name


def test_generated_cfgs_follow_a_given_manifest(manifest):
    edited = copy.deepcopy(manifest)
    entry = edited['weights']['resnet50_bam.official_in1k']
    entry.update(published=True, revision='a' * 40)
    cfgs = manifest_default_cfgs(['resnet50_bam'], lambda **kw: kw, manifest=edited)
    assert cfgs['resnet50_bam.official_in1k*']['hf_hub_id'] == f"bam-models/resnet50_bam.official_in1k@{'a' * 40}"
    assert list(cfgs)[-1] == 'resnet50_bam.official_in1k*'

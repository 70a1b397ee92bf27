""" `create_model_from_name`: every command's way from a name (ARCH[.TAG], local-dir:PATH, hf-hub:ORG/NAME),
with or without a checkpoint, to a model, or to one BamModelsError line. """
import warnings

import pytest
import timm
import torch
from safetensors.torch import save_file

import bam_models  # noqa: F401
from bam_models.errors import CheckpointError, PretrainedWeightsError, UsageError
from bam_models.hub import UnverifiedWeightsWarning, create_model_from_name, save_pretrained

from test_hub import hub  # noqa: F401  the local Hub fixture


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    """A 6-class model, its Hub-format folder and a checkpoint of another 6-class model."""
    root = tmp_path_factory.mktemp('load')
    model = timm.create_model('resnet18_bam', num_classes=6).eval()
    save_pretrained(model, root / 'run')
    other = timm.create_model('resnet18_bam', num_classes=6).eval()
    save_file(other.state_dict(), root / 'other.safetensors')
    return model, root / 'run', other, root / 'other.safetensors'


def same(a, b) -> bool:
    return all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())


def test_every_name_form_with_and_without_checkpoint(trained, hub, tmp_path):  # noqa: F811
    model, folder, other, checkpoint = trained
    assert same(create_model_from_name(f'local-dir:{folder}'), model)
    assert same(create_model_from_name(f'local-dir:{folder}', checkpoint), other)
    assert same(create_model_from_name('resnet18_bam', checkpoint), other)
    assert same(create_model_from_name('resnet18_bam.tv_in1k', str(checkpoint)), other)
    random = create_model_from_name('resnet18_bam', pretrained=False, num_classes=3)
    assert random.fc.out_features == 3
    hub.commit('me/run', folder)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', UnverifiedWeightsWarning)
        assert same(create_model_from_name('hf-hub:me/run'), model)
        assert same(create_model_from_name('hf-hub:me/run', checkpoint), other)


@pytest.mark.parametrize('name, error, message', [
    ('resnet18_bma', UsageError, r"unknown model 'resnet18_bma'; did you mean resnet18_bam"),
    ('resnet18_bam.nope', UsageError, r"model 'resnet18_bam' has no tag 'nope'; its tags: .*tv_in1k"),
    ('resnet18_bam', PretrainedWeightsError, r'resnet18_bam has no pretrained weights .*resnet18_bam\.tv_in1k'),
    ('mobilenetv2_035', PretrainedWeightsError, r'mobilenetv2_035 has no pretrained weights .*pretrained=False'),
    ('local-dir:{tmp}/missing', UsageError, r'local-dir:.*missing: no such folder'),
    ('local-dir:{tmp}', UsageError, r'the folder has no config\.json'),
    ('hf-hub:me/absent', PretrainedWeightsError, r'hf-hub:me/absent: repository me/absent does not exist'),
])
def test_names_that_cannot_work_fail_in_one_line(hub, tmp_path, name, error, message):  # noqa: F811
    with pytest.raises(error, match=message) as raised:
        create_model_from_name(name.format(tmp=tmp_path))
    assert '\n' not in str(raised.value)


def test_bad_checkpoint_fails_in_one_line(trained, tmp_path):
    _, folder, _, _ = trained
    with pytest.raises(CheckpointError, match=r'checkpoint .*nothing\.pth does not exist'):
        create_model_from_name(f'local-dir:{folder}', tmp_path / 'nothing.pth')
    wrong = tmp_path / 'cbam.safetensors'
    save_file(timm.create_model('resnet18_cbam', num_classes=6).state_dict(), wrong)
    with pytest.raises(CheckpointError, match=r'does not fit resnet18_bam: \d+ missing keys \(e\.g\. '):
        create_model_from_name('resnet18_bam', wrong)

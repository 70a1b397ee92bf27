""" `create_model_from_name`: every command's way from a name (ARCH[.TAG], local-dir:PATH, hf-hub:ORG/NAME),
with or without a checkpoint, to a model, or to one BamModelsError line. """
import warnings

import pytest
import timm
import torch
from safetensors.torch import save_file

import bam_models  # noqa: F401
from bam_models.checkpoint import load_strict
from bam_models.cli import main as cli_main
from bam_models.errors import CheckpointError, ConfigError, PretrainedWeightsError, UsageError
from bam_models.hub import (
    UnverifiedWeightsWarning, check_model_name, create_model_from_name, insert_into_folder, model_from_checkpoint,
    save_pretrained)



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


def test_every_name_form_with_and_without_checkpoint(trained, hub, tmp_path):
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
def test_names_that_cannot_work_fail_in_one_line(hub, tmp_path, name, error, message):
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


# ------------------------------------------------------------------------- one name check, one tag rule

def test_a_registered_tag_without_published_weights_builds_random_and_refuses_pretrained():
    # the tag is in timm's registry (one cfg per manifest entry), so it names a valid architecture to build
    check_model_name('resnet50_bam.official_in1k')
    check_model_name('resnet50_bam.official_in1k', where=' in model.name', error=ConfigError)
    model = create_model_from_name('resnet50_bam.official_in1k', pretrained=False, device='meta')
    assert model.pretrained_cfg['tag'] == 'official_in1k'
    # with weights asked for, the manifest's status says why there are none and what to use instead
    for call in (lambda: check_model_name('resnet50_bam.official_in1k', pretrained=True),
                 lambda: create_model_from_name('resnet50_bam.official_in1k'),
                 lambda: create_model_from_name('resnet50_bam')):  # its default tag
        with pytest.raises(PretrainedWeightsError, match=r'not published yet \(manifest: published=false\); use '
                                                         r'pretrained=False, the trunk tag resnet50_bam\.tv_in1k'):
            call()


@pytest.mark.parametrize('name, error, message', [
    ('resnet18_bma', ConfigError, r"^unknown model 'resnet18_bma' in model\.name; did you mean resnet18_bam"),
    ('resnet18_bam.nope', ConfigError, r"^model 'resnet18_bam' has no tag 'nope'; its tags: tv_in1k$"),
    ('nosuch:thing', UsageError, r"Unknown model source 'nosuch'.*; names are ARCH\[\.TAG\]"),
])
def test_the_name_check_raises_the_callers_error(name, error, message):
    where = ' in model.name' if error is ConfigError else ''
    with pytest.raises(error, match=message):
        check_model_name(name, where=where, error=error)


def test_hub_names_keep_the_dots_of_their_repo(hub, tmp_path):
    # `hf-hub:ORG/NAME.TAG` is a repo name, not ARCH.TAG: nothing may cut it at the dot
    plain = timm.create_model('mobilenetv3_small_050', num_classes=4).eval()
    timm.models.save_for_hf(plain, tmp_path / 'repo', safe_serialization=True)
    hub.commit('me/mnv3.tiny_in1k', tmp_path / 'repo')
    check_model_name('hf-hub:me/mnv3.tiny_in1k')
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', UnverifiedWeightsWarning)
        assert same(create_model_from_name('hf-hub:me/mnv3.tiny_in1k'), plain)
        info = insert_into_folder('hf-hub:me/mnv3.tiny_in1k', 'bam', tmp_path / 'inserted', pretrained=True)
    inserted = timm.create_model(f"local-dir:{tmp_path / 'inserted'}", pretrained=True)
    assert sum(p.numel() for p in inserted.parameters()) == info['num_params']
    torch.testing.assert_close(inserted.conv_stem.weight, plain.conv_stem.weight)
    assert cli_main(['insert', 'hf-hub:me/mnv3.tiny_in1k', str(tmp_path / 'from_cli')]) == 0


# ------------------------------------------------------------------- one checkpoint -> model path

def test_checkpoint_sizes_the_head_and_start_weights_keep_a_fresh_one(tmp_path):
    six = timm.create_model('resnet18_bam', num_classes=6).eval()
    built = model_from_checkpoint('resnet18_bam', _saved(six, tmp_path / 'six.safetensors'))
    assert built.fc.out_features == 6 and same(built, six)
    # fine-tuning on 10 classes from a 6-class file: every trunk tensor loads, the 10-class head stays fresh
    ten = timm.create_model('resnet18_bam', num_classes=10)
    head = ten.fc.weight.clone()
    load_strict(ten, six.state_dict(), 'six', 'pass weights of this architecture', keep_fresh_head=True)
    torch.testing.assert_close(ten.layer1[0].conv1.weight, six.layer1[0].conv1.weight)
    torch.testing.assert_close(ten.fc.weight, head)
    # without keep_fresh_head the head must fit, and the trunk must fit either way, in the caller's error type
    with pytest.raises(CheckpointError, match=r'six does not fit resnet18_bam: 2 mismatched tensors'):
        load_strict(timm.create_model('resnet18_bam', num_classes=10), six.state_dict(), 'six', 'pass another')
    cbam = timm.create_model('resnet18_cbam', num_classes=6).state_dict()
    with pytest.raises(ConfigError, match=r'^cbam does not fit resnet18_bam: \d+ missing keys'):
        load_strict(ten, cbam, 'cbam', 'pass weights of this architecture', keep_fresh_head=True, error=ConfigError)


def _saved(model, path):
    save_file(model.state_dict(), path)
    return path

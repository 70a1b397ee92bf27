""" What a downloaded or local config.json may not do (choose where the weights come from), and the values no
source may load (NaN/Inf, negative BatchNorm variances, integer/bool tensors where the model has floats). """
import json
import warnings
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

import bam_models  # noqa: F401
from bam_models.errors import CheckpointError
from bam_models.hub import PretrainedWeightsError, UnverifiedWeightsWarning, model_from_checkpoint


ARCH = 'resnet18_bam'


@pytest.fixture(scope='module')
def model_and_outsider():
    """A 10-class model whose folder is served, and another model's file that a config must not reach."""
    torch.manual_seed(1)
    return timm.create_model(ARCH, num_classes=10).eval(), timm.create_model(ARCH, num_classes=10).eval()


def write_folder(model, folder: Path, **cfg_fields) -> Path:
    """A Hub-format folder of `model` whose config.json's pretrained_cfg also carries `cfg_fields`."""
    timm.models.save_for_hf(model, folder, safe_serialization=True)
    config = json.loads((folder / 'config.json').read_text())
    config['pretrained_cfg'].update(cfg_fields)
    (folder / 'config.json').write_text(json.dumps(config))
    return folder


def same_weights(a, b) -> bool:
    return all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())


def outsider_fields(tmp_path: Path, outsider) -> dict:
    """Every field that could point a load elsewhere, each at the outsider's weights."""
    outside = tmp_path / 'outside.safetensors'
    save_file(outsider.state_dict(), outside)
    return dict(file=str(outside), url=outside.as_uri(), state_dict={'fc.bias': [0.0] * 10},
                hf_hub_filename='outside.safetensors', hf_hub_id='evil/outside')


@pytest.mark.parametrize('field', ['file', 'url', 'state_dict', 'hf_hub_filename'])
def test_hub_config_naming_a_weight_source_is_refused(hub, tmp_path, model_and_outsider, field):
    model, outsider = model_and_outsider
    fields = outsider_fields(tmp_path, outsider)
    folder = write_folder(model, tmp_path / 'repo', **{field: fields[field]})
    save_file(outsider.state_dict(), folder / 'outside.safetensors')  # a second file in the same repo
    hub.commit('org/repo', folder)
    with pytest.raises(PretrainedWeightsError, match=rf'config\.json of Hub repo org/repo names its own weight '
                                                     rf'source \({field}\)'):
        timm.create_model('hf-hub:org/repo', pretrained=True)
    assert not any('outside' in r for r in hub.requests)


def test_hub_config_hf_hub_id_and_source_are_ignored(hub, tmp_path, model_and_outsider):
    model, outsider = model_and_outsider
    hub.commit('evil/outside', write_folder(outsider, tmp_path / 'evil'))
    hub.commit('org/repo', write_folder(model, tmp_path / 'repo', hf_hub_id='evil/outside', source='local-dir'))
    with pytest.warns(UnverifiedWeightsWarning):
        loaded = timm.create_model('hf-hub:org/repo', pretrained=True)
    assert same_weights(loaded, model) and loaded.pretrained_cfg['hf_hub_id'] == 'org/repo'
    assert not any('evil' in r for r in hub.requests)


@pytest.mark.parametrize('field', ['url', 'state_dict', 'hf_hub_filename', 'hf_hub_id'])
def test_local_dir_config_naming_a_weight_source_is_refused(tmp_path, model_and_outsider, field):
    model, outsider = model_and_outsider
    folder = write_folder(model, tmp_path / 'run', **{field: outsider_fields(tmp_path, outsider)[field]})
    with pytest.raises(PretrainedWeightsError, match=rf'config\.json of folder .*run names its own weight source '
                                                     rf'\({field}\)'):
        timm.create_model(f'local-dir:{folder}', pretrained=True)


def test_local_dir_config_file_and_source_are_ignored(tmp_path, model_and_outsider):
    model, outsider = model_and_outsider
    fields = outsider_fields(tmp_path, outsider)
    folder = write_folder(model, tmp_path / 'run', file=fields['file'], source='hf-hub')
    loaded = timm.create_model(f'local-dir:{folder}', pretrained=True)
    assert same_weights(loaded, model) and loaded.pretrained_cfg['file'] == str(folder)
    # the caller's own overlay still chooses a file: that is the documented way to load one
    chosen = timm.create_model(ARCH, pretrained=True, num_classes=10, pretrained_cfg_overlay=dict(file=fields['file']))
    assert same_weights(chosen, outsider)


def damaged(model, kind: str):
    """The model's state dict with impossible values ('values') or integer/bool tensors ('dtypes')."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    if kind == 'values':
        state['layer1.0.conv1.weight'][0, 0, 0, 0] = float('nan')
        state['layer2.bam.channel_gate.fc1.bias'][0] = float('inf')
        state['layer1.0.bn1.running_var'][0] = -1.0
        return state, ('layer1.0.conv1.weight (NaN/Inf)', 'layer1.0.bn1.running_var (negative variance)',
                       'layer2.bam.channel_gate.fc1.bias (NaN/Inf)')
    state['layer2.0.conv1.weight'] = state['layer2.0.conv1.weight'].to(torch.int64)
    state['layer3.0.bn2.weight'] = state['layer3.0.bn2.weight'].bool()
    return state, ('layer2.0.conv1.weight: checkpoint torch.int64', 'layer3.0.bn2.weight: checkpoint torch.bool')


@pytest.mark.parametrize('kind', ['values', 'dtypes'])
def test_damaged_weights_are_refused_from_every_source(hub, tmp_path, model_and_outsider, kind):
    model, _ = model_and_outsider
    state, keys = damaged(model, kind)
    folder = tmp_path / 'run'
    timm.models.save_for_hf(model, folder, safe_serialization=True)
    save_file(state, folder / 'model.safetensors')
    hub.commit('org/damaged', folder)
    loads = {
        'overlay file': lambda: timm.create_model(ARCH, pretrained=True, num_classes=10, pretrained_cfg_overlay=dict(
            file=str(folder / 'model.safetensors'))),
        'local-dir': lambda: timm.create_model(f'local-dir:{folder}', pretrained=True),
        'hf-hub': lambda: timm.create_model('hf-hub:org/damaged', pretrained=True),
        'checkpoint': lambda: model_from_checkpoint(ARCH, folder / 'model.safetensors'),
    }
    for name, load in loads.items():
        error = CheckpointError if name == 'checkpoint' else PretrainedWeightsError
        with warnings.catch_warnings(), pytest.raises(error) as raised:
            warnings.simplefilter('ignore', UnverifiedWeightsWarning)
            load()
        for key in keys:
            assert key in str(raised.value), (name, str(raised.value))


def test_stem_conv_is_adapted_to_other_input_channels_but_checked_for_dtype(tmp_path, model_and_outsider):
    model, _ = model_and_outsider
    path = tmp_path / 'model.safetensors'
    save_file(model.state_dict(), path)
    gray = timm.create_model(ARCH, pretrained=True, num_classes=10, in_chans=1,
                             pretrained_cfg_overlay=dict(file=str(path)))
    assert torch.allclose(gray.conv1.weight[:, 0], model.conv1.weight.sum(1))  # timm's adapt_input_conv
    state = dict(model.state_dict(), **{'conv1.weight': model.conv1.weight.detach().to(torch.int32)})
    save_file(state, path)
    with pytest.raises(PretrainedWeightsError, match=r'1 mismatched tensor \(e\.g\. conv1\.weight: checkpoint '
                                                     r'torch\.int32, model torch\.float32\)'):
        timm.create_model(ARCH, pretrained=True, num_classes=10, in_chans=1,
                          pretrained_cfg_overlay=dict(file=str(path)))

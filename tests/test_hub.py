""" Pretrained weights end to end against a real local Hub server (nothing here touches the internet). """
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import huggingface_hub.constants as hf_constants
import pytest
import timm
import torch
from safetensors.torch import save_file

import bam_models  # noqa: F401
from bam_models.cli import main as cli_main
from bam_models.hub import PretrainedWeightsError, TrunkOnlyWeightsWarning, UnverifiedWeightsWarning, file_sha256
from bam_models.weights.manifest import load_manifest, update_manifest_entry

from _hub_server import LocalHub
from _weights import randomize_  # random BN statistics too; default-init nets also run slowly on CPU

OFFICIAL = 'resnet50_bam.official_in1k'
TRUNK = 'resnet18_bam.tv_in1k'


def publish_fake_timm_trunk(hub: LocalHub, tmp_path: Path, plain: str = 'resnet18',
                            repo: str = 'timm/resnet18.tv_in1k'):
    """A timm-style repo of a random plain model, as timm's own ImageNet repos are laid out."""
    model = randomize_(timm.create_model(plain))
    folder = tmp_path / 'trunk_src'
    timm.models.save_for_hf(model, folder, safe_serialization=True)
    return model, hub.commit(repo, folder)


def test_default_tag_end_to_end_with_publish(hub, tmp_path, caplog, capsys):
    # unpublished: one error naming model, repo, revision and file, before anything is built
    with pytest.raises(PretrainedWeightsError) as error:
        timm.create_model('resnet50_bam', pretrained=True)
    message = str(error.value)
    for part in (OFFICIAL, 'bam-models/resnet50_bam.official_in1k', 'revision none pinned', 'model.safetensors',
                 'not published', 'resnet50_bam.tv_in1k'):
        assert part in message

    source = randomize_(timm.create_model('resnet50_bam'))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = source(x)
    save_file(source.state_dict(), tmp_path / 'ckpt.safetensors')
    repo = 'bam-models/resnet50_bam.official_in1k'
    assert cli_main(['publish', OFFICIAL, '--checkpoint', str(tmp_path / 'ckpt.safetensors'),
                     '--out', str(hub.repo_dir(repo)), '--manifest', str(hub.manifest)]) == 0
    printed = capsys.readouterr().out
    entry = load_manifest(hub.manifest)['weights'][OFFICIAL]
    weights = hub.repo_dir(repo) / 'model.safetensors'
    assert entry['sha256'] == file_sha256(weights) and f"sha256 {entry['sha256']}" in printed
    assert entry['size'] == weights.stat().st_size and entry['num_params'] == 25_915_099
    assert 'unverified_reason' not in entry and not entry['published']
    card = (hub.repo_dir(repo) / 'README.md').read_text()
    for part in ('76.860', '93.416', '| authors |', 'license: mit', "timm.create_model('hf-hub:" + repo,
                 'park2018bam', 'woo2018cbam'):
        assert part in card
    config = json.loads((hub.repo_dir(repo) / 'config.json').read_text())
    assert config['architecture'] == 'resnet50_bam' and config['pretrained_cfg']['tag'] == 'official_in1k'

    update_manifest_entry(OFFICIAL, hub.manifest, revision=hub.commit(repo), published=True)
    model = timm.create_model('resnet50_bam', pretrained=True).eval()
    with torch.no_grad():
        assert torch.equal(model(x), expected)
    assert model.pretrained_cfg['tag'] == 'official_in1k'
    assert any(f"resolve/{entry_rev}/model.safetensors" in r
               for r in hub.requests for entry_rev in [load_manifest(hub.manifest)['weights'][OFFICIAL]['revision']])

    # another number of classes: timm's behaviour, the head is dropped (with its log line), the rest loads
    with caplog.at_level(logging.INFO):
        model10 = timm.create_model('resnet50_bam', pretrained=True, num_classes=10)
    assert model10.fc.out_features == 10 and 'fc.weight' in caplog.text
    assert torch.equal(model10.layer2.bam.spatial_gate.conv_dil1.weight,
                       source.layer2.bam.spatial_gate.conv_dil1.weight)

    # hf-hub: names resolve config.json and the verified weights through the same server
    via_hub = timm.create_model(f'hf-hub:{repo}', pretrained=True).eval()
    with torch.no_grad():
        assert torch.equal(via_hub(x), expected)

    # offline from the warm cache: no request reaches the server
    served = len(hub.requests)
    hf_constants.HF_HUB_OFFLINE = True
    offline = timm.create_model('resnet50_bam', pretrained=True, features_only=True, out_indices=(1,))
    assert len(hub.requests) == served
    assert torch.equal(offline.layer1.bam.channel_gate.fc1.weight, source.layer1.bam.channel_gate.fc1.weight)
    # offline with an empty cache: actionable error
    with pytest.raises(PretrainedWeightsError, match=r'HF_HUB_OFFLINE is set and the file is not in the cache'):
        timm.create_model('resnet50_bam', pretrained=True, cache_dir=tmp_path / 'empty_cache')


def test_trunk_tag_loads_timm_weights_and_warns(hub, tmp_path):
    plain, _ = publish_fake_timm_trunk(hub, tmp_path)
    with pytest.warns(UnverifiedWeightsWarning, match='third-party'), \
            pytest.warns(TrunkOnlyWeightsWarning, match=r'only the plain ImageNet trunk of resnet18\.tv_in1k'):
        model = timm.create_model(TRUNK, pretrained=True, num_classes=5)
    fresh = timm.create_model('resnet18_bam', num_classes=5)
    trunk_keys = [k for k in plain.state_dict() if not k.startswith('fc.')]
    state = model.state_dict()
    assert all(torch.equal(state[k], plain.state_dict()[k]) for k in trunk_keys)
    # attention keeps its init (BN weight one, biases zero), not someone else's tensors
    assert torch.equal(model.layer1.bam.spatial_gate.bn_reduce.weight, fresh.layer1.bam.spatial_gate.bn_reduce.weight)
    assert model.layer3.bam.channel_gate.fc1.bias.eq(0).all()
    # the default tag of a model without BAM weights never silently loads the trunk
    with pytest.raises(PretrainedWeightsError, match=r'resnet18_bam has no pretrained weights.*resnet18_bam\.tv_in1k'):
        timm.create_model('resnet18_bam', pretrained=True)


def test_failures_are_single_actionable_errors(hub, tmp_path):
    plain, commit = publish_fake_timm_trunk(hub, tmp_path)
    repo = 'timm/resnet18.tv_in1k'
    weights = hub.repo_dir(repo) / 'model.safetensors'
    good = weights.read_bytes()
    update_manifest_entry(TRUNK, hub.manifest, revision=commit, sha256=file_sha256(weights), size=len(good))

    def load():
        return timm.create_model(TRUNK, pretrained=True)

    # a tampered file on the Hub (same size, same pinned commit): refused, and the bad copy is not kept
    weights.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
    for _ in range(2):
        with pytest.raises(PretrainedWeightsError, match=rf'{TRUNK} \(repo {repo}, revision {commit}, '
                                                         r'file model\.safetensors\): .*tampered'):
            load()
    weights.write_bytes(good)
    with pytest.warns(TrunkOnlyWeightsWarning):
        load()  # downloaded again, verified
    # a truncated file in the cache: detected, evicted, fetched again on retry
    blob = next(Path(hf_constants.HF_HUB_CACHE).rglob('blobs/*'))
    blob.write_bytes(good[:1000])
    with pytest.raises(PretrainedWeightsError, match='removed from the cache'):
        load()
    with pytest.warns(TrunkOnlyWeightsWarning):
        load()

    update_manifest_entry(TRUNK, hub.manifest, revision='0' * 40)
    with pytest.raises(PretrainedWeightsError, match=f"revision {'0' * 40} does not exist in {repo}"):
        load()
    update_manifest_entry(TRUNK, hub.manifest, revision=None, hf_hub_id='timm/missing-repo')
    with pytest.raises(PretrainedWeightsError, match='repository timm/missing-repo does not exist'):
        load()
    # a repo with pickles only: nothing is unpickled, the error says what to do
    pickle_repo = hub.repo_dir('someone/pickles')
    pickle_repo.mkdir(parents=True)
    torch.save(plain.state_dict(), pickle_repo / 'pytorch_model.bin')
    hub.commit('someone/pickles')
    update_manifest_entry(TRUNK, hub.manifest, hf_hub_id='someone/pickles')
    with pytest.raises(PretrainedWeightsError, match=r'someone/pickles has no file model\.safetensors'):
        load()
    # a checkpoint of another architecture: missing and unexpected keys listed, nothing loaded
    other = timm.create_model('resnet34')
    timm.models.save_for_hf(other, tmp_path / 'r34', safe_serialization=True)
    hub.commit('someone/resnet34', tmp_path / 'r34')
    update_manifest_entry(TRUNK, hub.manifest, hf_hub_id='someone/resnet34', sha256=None, size=None,
                          unverified_reason='a test repo outside the manifest')
    expected = r'96 unexpected keys \(e\.g\. layer1\.2\.bn1\.bias, layer1\.2\.bn1\.num_batches_tracked, .*\(93 more\)\)'
    with pytest.warns(UnverifiedWeightsWarning), pytest.raises(PretrainedWeightsError, match=expected):
        load()


def test_local_files_with_other_class_counts(tmp_path):
    model = randomize_(timm.create_model('resnet18_bam', num_classes=10))
    save_file(model.state_dict(), tmp_path / 'ten.safetensors')
    # the checkpoint's head says 10 classes: loaded, not silently dropped for the registered 1000
    loaded = timm.create_model('resnet18_bam', pretrained=True, num_classes=10,
                               pretrained_cfg_overlay=dict(file=str(tmp_path / 'ten.safetensors'))).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    # a wrong architecture from disk is refused with its lists too
    expected = r'80 missing keys \(e\.g\. layer1\.0\.se\..*96 unexpected keys \(e\.g\. layer1\.bam\.'
    with pytest.raises(PretrainedWeightsError, match=expected):
        timm.create_model('resnet18_cbam', pretrained=True,
                          pretrained_cfg_overlay=dict(file=str(tmp_path / 'ten.safetensors')))


@pytest.mark.slow  # a subprocess or torch.compile
def test_environment_variables_select_endpoint_cache_and_manifest(hub, tmp_path):
    """HF_ENDPOINT, HF_HOME and BAM_MODELS_MANIFEST as a user sets them, read at import by a fresh process."""
    publish_fake_timm_trunk(hub, tmp_path)
    env = dict(os.environ, HF_ENDPOINT=hub.endpoint, HF_HOME=str(tmp_path / 'home'), HF_HUB_OFFLINE='0',
               BAM_MODELS_MANIFEST=str(hub.manifest), PYTHONPATH=str(Path(__file__).parents[1]))
    code = ("import warnings, timm, bam_models\n"
            "warnings.simplefilter('ignore')\n"
            f"m = timm.create_model('{TRUNK}', pretrained=True)\n"
            "print('loaded', m.pretrained_cfg['tag'])\n")
    out = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert 'loaded tv_in1k' in out.stdout
    assert list((tmp_path / 'home' / 'hub').glob('models--timm--resnet18.tv_in1k/snapshots/*/model.safetensors'))

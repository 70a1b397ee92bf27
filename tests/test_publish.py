""" `publish` writes only into a new or empty folder and uploads exactly the files it wrote; the model card
says how to load the folder it is written into and only calls fine-tuned what was. """
import json

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

import bam_models  # noqa: F401
import bam_models.hub.save as publishing
from bam_models.cli import main as cli_main
from bam_models.errors import CheckpointError, UsageError
from bam_models.hub import model_card, save_pretrained
from bam_models.weights.manifest import PACKAGED_MANIFEST, load_manifest


ENTRY = 'resnet18_bam.tv_in1k'  # a trunk entry, refused; the tests publish a full entry added to a copy
FULL = 'resnet18_bam.test_in1k'


@pytest.fixture
def manifest(tmp_path):
    data = json.loads(PACKAGED_MANIFEST.read_text())
    entry = dict(data['weights']['resnet50_bam.official_in1k'], architecture='resnet18_bam', tag='test_in1k',
                 hf_hub_id='bam-models/resnet18_bam.test_in1k', default=False)
    data['weights'][FULL] = entry
    path = tmp_path / 'manifest.json'
    path.write_text(json.dumps(data))
    return path


@pytest.fixture(scope='module')
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp('ckpt') / 'model.safetensors'
    save_file(timm.create_model('resnet18_bam', num_classes=7).state_dict(), path)
    return path


def test_publish_refuses_a_non_empty_folder(tmp_path, manifest, checkpoint, capsys):
    out = tmp_path / 'out'
    out.mkdir()
    (out / 'notes.txt').write_text('private')
    before = manifest.read_text()
    assert cli_main(['publish', FULL, '--checkpoint', str(checkpoint), '--out', str(out),
                     '--manifest', str(manifest)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f'error: --out {out} is not an empty folder') and '\n' not in err
    assert sorted(p.name for p in out.iterdir()) == ['notes.txt'] and manifest.read_text() == before
    with pytest.raises(UsageError, match='third-party trunk entry'):
        publishing.publish(ENTRY, checkpoint, tmp_path / 'fresh', manifest=manifest)
    with pytest.raises(UsageError, match='give --out DIR'):
        publishing.publish(FULL, checkpoint, manifest=manifest)
    cbam = tmp_path / 'cbam.safetensors'
    save_file(timm.create_model('resnet18_cbam', num_classes=7).state_dict(), cbam)
    with pytest.raises(CheckpointError, match=r'does not fit resnet18_bam: \d+ missing keys'):
        publishing.publish(FULL, cbam, tmp_path / 'fresh', manifest=manifest)


def test_model_card_usage_loads_the_folder_and_fine_tuned_only_when_it_was(tmp_path):
    model = timm.create_model('resnet18_bam', num_classes=4)
    scratch = tmp_path / 'scratch'
    info = save_pretrained(model, scratch)
    card = (scratch / 'README.md').read_text()
    assert f"timm.create_model('local-dir:{scratch.as_posix()}', pretrained=True)" in card
    assert "create_model('resnet18_bam'" not in card and 'fine-tuned' not in card.lower()
    loaded = timm.create_model(f'local-dir:{scratch}', pretrained=True)  # the usage shown works
    assert torch.equal(loaded.fc.weight, model.fc.weight) and sorted(info['files']) == sorted(
        p.name for p in scratch.iterdir())

    tuned = tmp_path / 'tuned'
    save_pretrained(model, tuned, base_weights='resnet18_bam.tv_in1k')
    card = (tuned / 'README.md').read_text()
    assert 'fine-tuned from `resnet18_bam.tv_in1k`' in card and '**Fine-tuned from:** `resnet18_bam.tv_in1k`' in card
    hub_card = model_card('resnet18_bam', repo_id='me/mine', base_weights='runs/a/best.pth')
    assert "timm.create_model('hf-hub:me/mine', pretrained=True)" in hub_card and 'runs/a/best.pth' in hub_card


def test_push_uploads_exactly_the_written_files_and_pins_the_commit(hub, tmp_path, checkpoint, capsys):
    data = json.loads(hub.manifest.read_text())
    data['weights'][FULL] = dict(data['weights']['resnet50_bam.official_in1k'], architecture='resnet18_bam',
                                 tag='test_in1k', hf_hub_id='bam-models/resnet18_bam.test_in1k', default=False)
    hub.manifest.write_text(json.dumps(data))
    repo = 'bam-models/resnet18_bam.test_in1k'
    out = tmp_path / 'out'
    assert cli_main(['publish', FULL, '--checkpoint', str(checkpoint), '--out', str(out), '--push',
                     '--manifest', str(hub.manifest)]) == 0
    # without --out: a temporary folder, which also holds only what publish wrote
    assert cli_main(['publish', FULL, '--checkpoint', str(checkpoint), '--push', '--manifest', str(hub.manifest)]) == 0
    printed = capsys.readouterr().out
    assert hub.pushed[repo] == [['model.safetensors', 'config.json', 'README.md']] * 2
    assert sorted(p.name for p in out.iterdir()) == sorted(hub.pushed[repo][0])
    assert all(f'wrote {out}/{name}' in printed for name in hub.pushed[repo][0])
    entry = load_manifest(hub.manifest)['weights'][FULL]
    assert entry['published'] and entry['revision'] == hub.commits[repo] and f"revision {entry['revision']}" in printed
    # what was pushed loads, pinned and verified against the sha256 publish recorded
    loaded = timm.create_model(f'hf-hub:{repo}', pretrained=True)
    assert torch.equal(loaded.fc.weight, load_file(checkpoint)['fc.weight'])
    assert any(f'resolve/{entry["revision"]}/model.safetensors' in r for r in hub.requests)

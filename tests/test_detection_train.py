""" `bam-models detect-train` on the synthetic set written as COCO JSON: trains, checkpoints, resumes, evaluates. """
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import bam_models.detection.train as detection_train
from bam_models.cli import main
from bam_models.detection import fasterrcnn_fpn
from synthetic_detection import make_dataset, write_coco

ROOT = Path(__file__).resolve().parents[1]


def _common(tmp_path):
    images, annotations = write_coco(make_dataset(4, seed=5), tmp_path / 'coco')
    out = tmp_path / 'run'
    return images, annotations, out, [
        'detect-train', '--images', str(images), '--annotations', str(annotations), '--out', str(out),
        '--backbone', 'resnet18_bam', '--fpn-channels', '64', '--min-size', '128', '--max-size', '160',
        '--batch-size', '2', '--workers', '0', '--lr', '0.01', '--device', 'cpu']


def _crash_in_epoch(monkeypatch, crash_epoch: int) -> None:
    """The run dies in `crash_epoch` (0-based), as a killed process would: last.pth holds the epoch before."""
    real = detection_train._train_epoch

    def train_epoch(config, objects, loader, device, epoch, checkpointer):
        if epoch == crash_epoch:
            raise RuntimeError('killed')
        return real(config, objects, loader, device, epoch, checkpointer)

    monkeypatch.setattr(detection_train, '_train_epoch', train_epoch)


def test_detect_train_checkpoints_resumes_and_scores(tmp_path, capsys, monkeypatch):
    images, annotations, out, common = _common(tmp_path)
    with monkeypatch.context() as patch:
        _crash_in_epoch(patch, 1)
        with pytest.raises(RuntimeError, match='killed'):
            # 'auto' with no OUT/last.pth yet starts the run
            main(common + ['--epochs', '2', '--amp', '--resume', 'auto'])
    state = torch.load(out / 'last.pth', weights_only=True)
    assert state['epoch'] == 1 and state['num_classes'] == 4  # category ids 1-3 plus background
    capsys.readouterr()
    # where the validation set is and how many loader processes may change on resume; what is trained may not
    # 'auto' continues OUT/last.pth, as an elastic restart needs
    assert main(common + ['--epochs', '2', '--amp', '--resume', 'auto',
                          '--val-images', str(images), '--val-annotations', str(annotations)]) == 0
    printed = capsys.readouterr().out
    assert f"resumed from {out / 'last.pth'}" in printed and 'epoch 2/2' in printed and 'epoch 1/2' not in printed
    assert 'validation: box AP' in printed

    state = torch.load(out / 'last.pth', weights_only=True)
    assert state['epoch'] == 2
    # the checkpoint is a plain state dict of the builder's model
    model = fasterrcnn_fpn('resnet18_bam', num_classes=4, out_channels=64)
    model.load_state_dict(state['model'])


def test_resume_with_changed_arguments_is_refused_listing_them(tmp_path, capsys):
    """The classification policy: a run continues only with the arguments it was written with."""
    _, _, out, common = _common(tmp_path)
    assert main(common + ['--epochs', '1', '--amp']) == 0
    before = (out / 'last.pth').read_bytes()
    capsys.readouterr()
    assert main(common + ['--epochs', '2', '--resume', str(out / 'last.pth')]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith('error: ')
    assert 'was written with another config, 2 keys differ (epochs: 1 -> 2; amp: True -> False)' in err
    assert (out / 'last.pth').read_bytes() == before


@pytest.mark.parametrize('flag, value, message', [
    ('--lr', '-1', "--lr is -1.0 but must be above 0; pass --lr VALUE"),
    ('--trainable-stages', '6', "--trainable-stages is 6 but must be"),
    ('--batch-size', '0', "--batch-size is 0 but must be"),
])
def test_arguments_are_checked_with_the_training_configs_rules(tmp_path, capsys, flag, value, message):
    _, _, out, common = _common(tmp_path)
    assert main(common + ['--epochs', '1', flag, value]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and message in err
    assert not (out / 'last.pth').exists()


@pytest.mark.slow  # a subprocess or torch.compile
def test_script_wrapper_shows_the_command_help():
    result = subprocess.run(
        [sys.executable, str(ROOT / 'scripts' / 'train_detection.py'), '--help'],
        capture_output=True, text=True, env={'PYTHONPATH': str(ROOT), 'PATH': '/usr/bin:/bin'})
    assert result.returncode == 0, result.stderr
    assert '--annotations' in result.stdout and 'COCO' in result.stdout

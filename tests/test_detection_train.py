""" `bam-models detect-train` on the synthetic set written as COCO JSON: trains, checkpoints, resumes, evaluates. """
import subprocess
import sys
from pathlib import Path

import torch

from bam_models.cli import main
from bam_models.tasks.detection import fasterrcnn_fpn
from synthetic_detection import make_dataset, write_coco

ROOT = Path(__file__).resolve().parents[1]


def test_detect_train_checkpoints_resumes_and_scores(tmp_path, capsys):
    images, annotations = write_coco(make_dataset(4, seed=5), tmp_path / 'coco')
    out = tmp_path / 'run'
    common = ['detect-train', '--images', str(images), '--annotations', str(annotations), '--out', str(out),
              '--backbone', 'resnet18_bam', '--fpn-channels', '64', '--min-size', '128', '--max-size', '160',
              '--batch-size', '2', '--workers', '0', '--lr', '0.01', '--device', 'cpu']
    assert main(common + ['--epochs', '1', '--amp']) == 0
    state = torch.load(out / 'last.pth', weights_only=True)
    assert state['epoch'] == 1 and state['num_classes'] == 4  # category ids 1-3 plus background
    assert main(common + ['--epochs', '2', '--resume', str(out / 'last.pth'),
                          '--val-images', str(images), '--val-annotations', str(annotations)]) == 0
    printed = capsys.readouterr().out
    assert 'resumed from' in printed and 'epoch 2/2' in printed and 'epoch 1/2' not in printed
    assert 'changed since: epochs: 1 -> 2; amp: True -> False' in printed  # the arguments given now apply
    assert 'validation: box AP' in printed

    state = torch.load(out / 'last.pth', weights_only=True)
    assert state['epoch'] == 2
    # the checkpoint is a plain state dict of the builder's model
    model = fasterrcnn_fpn('resnet18_bam', num_classes=4, out_channels=64)
    model.load_state_dict(state['model'])


def test_script_wrapper_shows_the_command_help():
    result = subprocess.run(
        [sys.executable, str(ROOT / 'scripts' / 'train_detection.py'), '--help'],
        capture_output=True, text=True, env={'PYTHONPATH': str(ROOT), 'PATH': '/usr/bin:/bin'})
    assert result.returncode == 0, result.stderr
    assert '--annotations' in result.stdout and 'COCO' in result.stdout

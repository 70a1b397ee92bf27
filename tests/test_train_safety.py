""" Training's failure paths: an earlier run is never overwritten by accident, two runs never share a folder,
a resume continues exactly the run it names (or says in one line why not), a failed write leaves the previous
checkpoint intact, class names come from the reader that labels the data, and nothing pickled is executed. """
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import timm
import torch

import bam_models.runs as runs_module
from bam_models.cli import main
from bam_models.errors import CheckpointError, UsageError
from bam_models.hub.save import insert_into_folder
from bam_models.runs import RunFolderLock, atomic_save, atomic_write, check_model_fits
from bam_models.train.config import load_config
from bam_models.train.data import DigitsDataset, build_dataset, shared_class_to_idx
from bam_models.train.build import base_weights, check_config
from bam_models.train.loop import NonFiniteLossError, train

sys.path.insert(0, str(Path(__file__).parent))
from train_helpers import TINY_SETTINGS  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ONE_EPOCH = [*TINY_SETTINGS, 'schedule.epochs=1']


def _args(data, output, *extra):
    return ['train', *[a for s in [*ONE_EPOCH, f'data.dataset={data}', f'train.output={output}', *extra]
                       for a in ('--set', s)]]


def _error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith('error: ') and '\n' not in err, err
    return err


@pytest.fixture(scope='module')
def finished_run(tiny_data, tmp_path_factory):
    output = tmp_path_factory.mktemp('finished')
    assert main(_args(tiny_data, output)) == 0
    return output


@pytest.fixture
def run_copy(finished_run, tmp_path):
    return Path(shutil.copytree(finished_run, tmp_path / 'run'))


# ------------------------------------------------------------------------------------------- run folders

def test_a_folder_with_a_run_is_refused_and_left_as_it_was(finished_run, tiny_data, capsys):
    before = {p.name: p.read_bytes() for p in finished_run.iterdir() if p.is_file()}
    err = _error(capsys, _args(tiny_data, finished_run))
    assert f'{finished_run} already holds a run' in err and '--resume auto' in err and '--overwrite' in err
    assert {p.name: p.read_bytes() for p in finished_run.iterdir() if p.is_file()} == before


def test_overwrite_replaces_the_earlier_run(run_copy, tiny_data, capsys):
    (run_copy / 'hub' / 'stale.txt').write_text('from the earlier run')
    assert main(_args(tiny_data, run_copy, 'optim.lr=0.02') + ['--overwrite']) == 0
    assert [json.loads(line)['epoch'] for line in (run_copy / 'log.jsonl').read_text().splitlines()] == [1]
    assert not (run_copy / 'hub' / 'stale.txt').exists()
    assert torch.load(run_copy / 'last.pth', weights_only=True)['config']['optim']['lr'] == 0.02
    assert sorted(p.name for p in run_copy.iterdir()) == ['best.pth', 'hub', 'last.pth', 'log.jsonl', 'summary.json']


@pytest.mark.slow  # a subprocess or torch.compile
def test_a_second_run_stops_at_once_naming_the_first_runs_pid(tiny_data, tmp_path, capsys):
    output = tmp_path / 'busy'
    holder = subprocess.Popen(
        [sys.executable, '-c', 'import time; from bam_models.runs import RunFolderLock; '
                               f'RunFolderLock({str(output)!r}).acquire(); print("locked", flush=True); '
                               'time.sleep(60)'],
        stdout=subprocess.PIPE, text=True, env={'PYTHONPATH': str(ROOT), 'PATH': '/usr/bin:/bin'})
    try:
        assert holder.stdout.readline().strip() == 'locked'
        err = _error(capsys, _args(tiny_data, output))
        assert f'is in use by another run (pid {holder.pid}' in err
        assert sorted(p.name for p in output.iterdir()) == ['.lock']  # nothing of the second run written
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.slow  # a subprocess or torch.compile
def test_a_stale_lock_of_a_dead_process_is_taken_over(tmp_path):
    dead = subprocess.Popen([sys.executable, '-c', 'pass'])
    dead.wait()
    (tmp_path / '.lock').write_text(f'{dead.pid}\n')
    with RunFolderLock(tmp_path) as lock:
        assert (tmp_path / '.lock').read_text().strip() == str(__import__('os').getpid()) and lock.held
        with pytest.raises(UsageError, match=r'pid \d+'):  # held by this live process now
            RunFolderLock(tmp_path).acquire()
    assert not (tmp_path / '.lock').exists()


# ------------------------------------------------------------------------------------------- resume

def test_autocast_for_is_the_one_precision_switch():
    from bam_models.runs import autocast_for
    x = torch.randn(4, 4)
    with autocast_for('cpu', 'bf16'):
        assert (x @ x).dtype == torch.bfloat16
    with autocast_for(torch.device('cpu'), 'auto'):  # bfloat16 off CUDA
        assert (x @ x).dtype == torch.bfloat16
    with autocast_for('cpu', 'none'):
        assert (x @ x).dtype == torch.float32
    with pytest.raises(UsageError, match="amp must be one of none, bf16, fp16, auto, got 'fp8'"):
        autocast_for('cpu', 'fp8')


def test_read_resume_refuses_a_changed_config_but_lets_free_keys_differ(tmp_path):
    from bam_models.errors import ConfigError
    from bam_models.runs import read_resume
    saved = {'optim': {'lr': 0.1}, 'train': {'output': 'a', 'device': 'cpu'}}
    atomic_save(dict(epoch=1, config=saved), tmp_path / 'last.pth')
    moved = {'optim': {'lr': 0.1}, 'train': {'output': 'b', 'device': 'cuda'}}
    state = read_resume(tmp_path / 'last.pth', ['epoch'], moved, ['train.output', 'train.device'], 'start again')
    assert state['epoch'] == 1
    changed = {'optim': {'lr': 0.2}, 'train': {'output': 'b', 'device': 'cpu'}}
    with pytest.raises(ConfigError, match=r"1 key differs \(optim.lr: 0.1 -> 0.2\); .* or start again"):
        read_resume(tmp_path / 'last.pth', ['epoch'], changed, ['train.output'], 'start again')


def test_resume_with_a_changed_config_lists_the_differing_keys(run_copy, tiny_data, capsys):
    err = _error(capsys, _args(tiny_data, run_copy, 'optim.lr=0.1', 'schedule.epochs=2') + ['--resume', 'auto'])
    assert 'was written with another config, 2 keys differ' in err
    assert 'optim.lr: 0.05 -> 0.1' in err and 'schedule.epochs: 1 -> 2' in err


def test_resume_auto_starts_the_run_in_a_folder_without_last_pth(tiny_data, tmp_path, capsys):
    output = tmp_path / 'run'
    output.mkdir()
    (output / 'log.jsonl').touch()  # all a run killed in its first epoch leaves: the restart starts afresh
    assert main(_args(tiny_data, output) + ['--resume', 'auto']) == 0
    out = capsys.readouterr().out
    assert 'plan: ' in out and 'resuming' not in out
    assert [json.loads(line)['epoch'] for line in (output / 'log.jsonl').read_text().splitlines()] == [1]


def test_resume_auto_refuses_a_finished_run_without_last_pth(run_copy, tiny_data, capsys):
    (run_copy / 'last.pth').unlink()  # nothing to continue from, results to keep
    err = _error(capsys, _args(tiny_data, run_copy) + ['--resume', 'auto'])
    assert 'already holds a run' in err and 'it has no last.pth to continue from' in err and '--overwrite' in err
    assert (run_copy / 'summary.json').exists()


def test_resume_from_best_pth_says_what_the_file_is(run_copy, tiny_data, capsys):
    err = _error(capsys, _args(tiny_data, run_copy) + ['--resume', str(run_copy / 'best.pth')])
    assert 'is a best-model file' in err and 'last.pth' in err and 'model.checkpoint=' in err


def test_resume_from_a_truncated_checkpoint_is_one_line(run_copy, tiny_data, capsys):
    last = run_copy / 'last.pth'
    last.write_bytes(last.read_bytes()[:4096])  # what a write cut short by a full disk leaves
    err = _error(capsys, _args(tiny_data, run_copy) + ['--resume', 'auto'])
    assert 'could not be read' in err and 'truncated' in err


def test_resume_of_another_architecture_is_one_line(run_copy, tiny_data, capsys):
    err = _error(capsys, _args(tiny_data, run_copy, 'model.name=resnet18_cbam') + ['--resume', 'auto'])
    assert "model.name: 'resnet18_bam' -> 'resnet18_cbam'" in err
    state = torch.load(run_copy / 'last.pth', weights_only=True)
    with pytest.raises(CheckpointError, match=r'written for another model than resnet18_cbam: \d+ missing keys'):
        check_model_fits(state['state_dict'], timm.create_model('resnet18_cbam', num_classes=10), 'last.pth')


@pytest.mark.parametrize('where', ['optimizer', 'state_dict_ema', 'scheduler'])
def test_resume_state_claiming_more_than_its_storage_is_refused_unread(run_copy, tiny_data, capsys, where):
    last = run_copy / 'last.pth'
    state = torch.load(last, weights_only=True)
    claims_4_tb = torch.zeros(1).expand(10 ** 6, 10 ** 6)  # 4 bytes on disk
    if where == 'optimizer':
        state['optimizer']['state'][0]['momentum_buffer'] = claims_4_tb
        key = 'optimizer.state.0.momentum_buffer'
    elif where == 'state_dict_ema':
        state['state_dict_ema'] = {'conv1.weight': claims_4_tb}
        key = 'state_dict_ema.conv1.weight'
    else:
        state['scheduler']['base_values'][1] = claims_4_tb
        key = 'scheduler.base_values.1'
    torch.save(state, last)
    assert last.stat().st_size < 100_000_000
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    err = _error(capsys, _args(tiny_data, run_copy) + ['--resume', 'auto'])
    assert f'{key} ((1000000, 1000000), 4,000,000,000,000 bytes from 4 stored)' in err, err
    assert 'whose shape claims more data than the file holds' in err and 'resume from an intact last.pth' in err
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss < 300 * 1024  # KiB: nothing materialised


def test_a_resume_config_of_shared_references_is_refused_before_it_is_compared(tmp_path):
    from bam_models.runs import read_resume
    laughs = {'lr': 0.1}
    for _ in range(40):  # 2**40 values spelled out, a few hundred bytes pickled
        laughs = {'a': laughs, 'b': laughs}
    deep = {'lr': 0.1}
    for _ in range(100):  # deeper than any config
        deep = {'a': deep}
    for config in (dict(optim=laughs), dict(optim=deep)):
        torch.save(dict(epoch=1, config=config), tmp_path / 'last.pth')
        assert (tmp_path / 'last.pth').stat().st_size < 200_000
        with pytest.raises(CheckpointError, match=r'holds a config of more than 10,000 values or 16 levels'):
            read_resume(tmp_path / 'last.pth', ['epoch'], {'optim': {'lr': 0.1}}, [], 'start again')


def test_written_files_get_the_permissions_of_any_new_file(tiny_data, tmp_path):
    """safetensors writes through a private (0600) temporary file; the one atomic writer gives every file the
    mode a new file gets under the umask."""
    previous = os.umask(0o022)
    try:
        assert main(_args(tiny_data, tmp_path / 'run')) == 0
        insert_into_folder('resnet18', 'cbam', tmp_path / 'inserted')
        os.replace(_private_file(tmp_path), tmp_path / 'private.bin.tmp')  # left by a killed write
        atomic_write(tmp_path / 'private.bin', lambda tmp: os.replace(_private_file(tmp_path), tmp))
    finally:
        os.umask(previous)
    names = ['last.pth', 'best.pth', 'log.jsonl', 'summary.json', 'hub/model.safetensors', 'hub/config.json',
             'hub/README.md']
    written = [tmp_path / 'run' / name for name in names] + [tmp_path / 'private.bin']
    written += [tmp_path / 'inserted' / name for name in ('model.safetensors', 'config.json')]
    modes = {str(path.relative_to(tmp_path)): oct(path.stat().st_mode & 0o777) for path in written}
    assert set(modes.values()) == {'0o644'}, modes


def _private_file(folder: Path) -> Path:
    fd, name = tempfile.mkstemp(dir=folder)  # 0600, as safetensors' own temporary file
    os.write(fd, b'data')
    os.close(fd)
    return Path(name)


def test_a_failed_write_leaves_no_tmp_and_the_previous_file_intact(tmp_path, monkeypatch):
    path = tmp_path / 'last.pth'
    atomic_save({'epoch': 1}, path)
    before = path.read_bytes()

    def disk_full(obj, f):
        f.write(b'partial')
        raise OSError(28, 'No space left on device')

    monkeypatch.setattr(runs_module.torch, 'save', disk_full)
    with pytest.raises(CheckpointError, match=r'\(the disk is full\); .*last.pth still holds the previous checkpoint'):
        atomic_save({'epoch': 2}, path)
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ['last.pth']


def test_non_finite_loss_before_any_checkpoint_does_not_claim_one(tiny_data, tmp_path, monkeypatch):
    import bam_models.train.build as build

    class NanLoss(build.LabelSmoothingCrossEntropy):
        def forward(self, x, target):
            return super().forward(x, target) * float('nan')

    monkeypatch.setattr(build, 'LabelSmoothingCrossEntropy', NanLoss)
    cfg = load_config(None, [*ONE_EPOCH, f'data.dataset={tiny_data}', f'train.output={tmp_path / "run"}'])
    with pytest.raises(NonFiniteLossError) as info:
        train(cfg)
    assert 'no checkpoint was written yet' in str(info.value) and 'last.pth' not in str(info.value)
    assert not (tmp_path / 'run' / 'last.pth').exists()


# ------------------------------------------------------------------------------------------- classes

def _class_tree(root: Path, train_classes, val_classes, empty=()) -> Path:
    images = DigitsDataset('train')
    for split, classes in (('train', train_classes), ('val', val_classes)):
        for i, name in enumerate(classes):
            (root / split / name).mkdir(parents=True)
            for j in range(4 if split == 'train' else 2):
                images[10 * i + j][0].save(root / split / name / f'{j}.png')
    for name in empty:
        (root / 'train' / name).mkdir(parents=True)
    return root


def test_class_names_and_labels_come_from_the_reader_and_val_shares_the_mapping(tmp_path):
    # natural order (1, 2, 10), an empty class folder is no class, val lacks class 2
    data = _class_tree(tmp_path, ['1', '2', '10'], ['1', '10'], empty=['05'])
    classes = check_config(load_config(None, [*ONE_EPOCH, f'data.dataset={data}']))
    assert classes == ['1', '2', '10']
    mapping = shared_class_to_idx(str(data), 'train', 'validation')
    val = build_dataset(str(data), 'val', class_to_idx=mapping)
    labels = {Path(path).parent.name: target for path, target in val.reader.samples}
    assert labels == {'1': 0, '10': 2}  # not shifted to 1 by the missing class


def test_exported_label_names_follow_the_model_outputs(tmp_path):
    data = _class_tree(tmp_path / 'data', ['1', '2', '10'], ['1', '2', '10'], empty=['05'])
    output = tmp_path / 'run'
    assert main(_args(data, output, 'data.batch_size=4')) == 0
    config = json.loads((output / 'hub' / 'config.json').read_text())
    assert config['label_names'] == ['1', '2', '10'] and config['num_classes'] == 3
    assert torch.load(output / 'best.pth', weights_only=True)['classes'] == ['1', '2', '10']
    card = (output / 'hub' / 'README.md').read_text()
    assert 'trained from scratch' in card and 'fine-tuned' not in card


def test_a_validation_class_unknown_to_training_is_refused(tmp_path, capsys):
    data = _class_tree(tmp_path / 'data', ['1', '2'], ['1', '2', '7'])
    err = _error(capsys, _args(data, tmp_path / 'run'))
    assert 'has classes the train split lacks (7)' in err


# ------------------------------------------------------------------------------------------- weights read

def test_start_weights_are_read_without_running_pickled_code(tmp_path, capsys, tiny_data):
    marker = tmp_path / 'pickled_code_ran'

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    path = tmp_path / 'evil.pth'
    torch.save({'state_dict': {'fc.weight': torch.zeros(10, 512)}, 'payload': Payload()}, path)
    err = _error(capsys, _args(tiny_data, tmp_path / 'run', f'model.checkpoint={path}'))
    assert 'could not be read as weights' in err and not marker.exists()


def test_base_weights_says_what_a_run_started_from():
    assert base_weights(load_config(None, [])) is None
    assert base_weights(load_config(None, ['model.name=resnet18', 'model.pretrained=true'])) == 'resnet18.a1_in1k'
    assert base_weights(load_config(None, ['model.name=resnet18.tv_in1k', 'model.pretrained=true'])) == \
        'resnet18.tv_in1k'
    assert base_weights(load_config(None, ['model.pretrained=true', 'model.checkpoint=runs/a/best.pth'])) == \
        'runs/a/best.pth'

""" Training past one process over webdataset shards, under torchrun: two single-process "nodes" meeting at a c10d
rendezvous on 127.0.0.1 (Gloo) write one run folder and keep equal weights; two processes score the whole
validation split, also when it has fewer shards than processes; an elastic restart (`--max-restarts 1`, a worker
killed mid-run) continues from last.pth with `--resume auto`. """
import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import timm
import torch

from bam_models.cli import main

from train_helpers import TINY_SETTINGS

pytest.importorskip('webdataset')
pytestmark = pytest.mark.slow  # every test starts torchrun

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 110
RUN_FILES = ['best.pth', 'hub', 'last.pth', 'log.jsonl', 'summary.json']


@pytest.fixture(scope='module')
def shards(tiny_data, tmp_path_factory):
    """The tiny digits as shards of 8: train 40 samples in 5 shards, validation 20 in 3 (8, 8 and 4)."""
    out = tmp_path_factory.mktemp('shards') / 'digits'
    assert main(['shards', str(tiny_data), '--out', str(out), '--shard-size', '8']) == 0
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _train_args(root: Path, output: Path, *sets: str):
    sets = [*TINY_SETTINGS, 'data.dataset=wds/digits', f'data.root={root}', f'train.output={output}', *sets]
    return ['-m', 'bam_models.cli', 'train', *[a for s in sets for a in ('--set', s)]]


def _start(torchrun_args, train_args, log: Path, **env_vars: str) -> subprocess.Popen:
    """torchrun in a session of its own (so a failed test can kill its workers too), output to `log`."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS='1', **env_vars)
    for key in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT'):
        env.pop(key, None)
    with open(log, 'w') as out:
        return subprocess.Popen([sys.executable, '-m', 'torch.distributed.run', *torchrun_args, *train_args],
                                env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def _finish(procs, logs, deadline: float):
    """Waits for every torchrun until `deadline`; on a timeout or a failure kills them all, with their workers."""
    try:
        codes = [proc.wait(timeout=max(1.0, deadline - time.monotonic())) for proc in procs]
    except subprocess.TimeoutExpired:
        codes = None
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    texts = [log.read_text() for log in logs]
    assert codes == [0] * len(procs), '\n'.join(text[-3000:] for text in texts)
    return texts


def _log(output: Path):
    return [json.loads(line) for line in (output / 'log.jsonl').read_text().splitlines()]


def _parameter_digest(state_dict) -> str:
    """sha256 of a model's parameters as the trainer computes it, from a saved state_dict."""
    model = timm.create_model('resnet18_bam', num_classes=10)
    model.load_state_dict(state_dict)
    digest = hashlib.sha256()
    for param in model.parameters():
        digest.update(param.detach().contiguous().flatten().view(torch.uint8).numpy())
    return digest.hexdigest()


def test_two_single_process_nodes_write_one_run_folder_with_equal_weights(shards, tmp_path):
    output, port = tmp_path / 'run', _free_port()
    deadline = time.monotonic() + TIMEOUT_S
    logs = [tmp_path / f'node{rank}.txt' for rank in range(2)]
    procs = [_start(['--nnodes', '2', '--node-rank', str(rank), '--nproc-per-node', '1', '--rdzv-backend', 'c10d',
                     '--rdzv-endpoint', f'127.0.0.1:{port}'], _train_args(shards, output, 'schedule.epochs=1'), log)
             for rank, log in enumerate(logs)]
    texts = _finish(procs, logs, deadline)
    # both nodes were given the same output folder: only rank 0 locked and wrote it, one set of files
    assert sorted(p.name for p in output.iterdir()) == RUN_FILES
    assert sorted(p.name for p in tmp_path.iterdir()) == ['node0.txt', 'node1.txt', 'run']
    # one plan line and one report line for the run, not one per process
    assert sum(text.count('plan: ') for text in texts) == 1 and sum(text.count('done in ') for text in texts) == 1
    assert json.loads((output / 'summary.json').read_text())['processes'] == 2
    (record,) = _log(output)
    assert record['val_images'] == 20  # 3 validation shards over 2 processes: 12 + 8, each sample once
    assert round(record['img_per_s'] * record['epoch_time_s']) == 2 * 8 * 2  # 40 // (8 x 2) steps of 8 x 2
    last = torch.load(output / 'last.pth', weights_only=True)
    # each process's parameters, gathered by the trainer: equal, and equal to the weights rank 0 saved
    assert last['weight_digests'] == [_parameter_digest(last['state_dict'])] * 2


def test_two_processes_score_the_whole_validation_split_with_fewer_shards_than_processes(tiny_data, tmp_path):
    root = tmp_path / 'shards32'  # train 40 in 2 shards, validation 20 in 1: the second process reads none
    assert main(['shards', str(tiny_data), '--out', str(root), '--shard-size', '32']) == 0
    log = tmp_path / 'torchrun.txt'
    proc = _start(['--standalone', '--nproc-per-node', '2'],
                  _train_args(root, tmp_path / 'run', 'schedule.epochs=1', 'data.workers=1'), log)
    _finish([proc], [log], time.monotonic() + TIMEOUT_S)
    (record,) = _log(tmp_path / 'run')
    assert record['val_images'] == 20
    assert json.loads((tmp_path / 'run' / 'summary.json').read_text())['processes'] == 2


def _kill_rank0_after_first_epoch(output: Path, proc: subprocess.Popen, deadline: float) -> None:
    """SIGKILL to the process that holds the run folder's lock (rank 0) once epoch 1 is in log.jsonl."""
    log = output / 'log.jsonl'
    while time.monotonic() < deadline and proc.poll() is None:
        if log.exists() and log.read_text().strip():
            pid = int((output / '.lock').read_text())
            os.kill(pid, signal.SIGKILL)
            return
        time.sleep(0.05)
    raise AssertionError(f'epoch 1 never ended in {output} (torchrun exit {proc.poll()})')


def test_elastic_restart_after_a_killed_worker_resumes_from_last_pth(shards, tmp_path):
    output, log = tmp_path / 'run', tmp_path / 'torchrun.txt'
    deadline = time.monotonic() + TIMEOUT_S
    proc = _start(['--standalone', '--nproc-per-node', '2', '--max-restarts', '1'],
                  [*_train_args(shards, output, 'schedule.epochs=3', 'data.batch_size=4'), '--resume', 'auto'], log,
                  # as docs/training.md says: torch's store shared with the workers keeps the killed round's
                  # addresses, which the restarted workers may read (pytorch/pytorch#135712)
                  TORCH_DISABLE_SHARE_RDZV_TCP_STORE='1')
    _kill_rank0_after_first_epoch(output, proc, deadline)
    (text,) = _finish([proc], [log], deadline)
    plans = re.findall(r'plan: .*', text)
    assert len(plans) == 2, text  # the first start and the restart
    assert 'resuming' not in plans[0]
    resumed_at = int(re.search(r'resuming at epoch (\d+), step 1', plans[1]).group(1))
    assert resumed_at in (2, 3), plans[1]  # after the epochs last.pth held when the worker was killed
    assert [record['epoch'] for record in _log(output)] == [1, 2, 3]
    assert sorted(p.name for p in output.iterdir()) == RUN_FILES  # the dead worker's lock was taken over, then freed

""" What a run says before and while it works: the plan line before the first step (model, parameters, images,
classes, input size, epochs and whether they are the defaults, steps, device, output), the estimate after the
first steps with the share of time spent waiting for data, also with progress bars off, and where a resumed
stream continues. """
import json
import re
import time

import pytest

from bam_models.errors import count
from bam_models.train import load_config, train
from bam_models.train.build import build_run, check_config
from bam_models.train.plan import RunClock, describe_plan, format_duration

from train_helpers import TINY_SETTINGS, run_cli as _run, train_args as _train_args


def test_plan_comes_first_and_the_estimate_after_the_first_steps(tiny_data, tmp_path, capsys):
    cfg = load_config(None, [*TINY_SETTINGS, f'data.dataset={tiny_data}', f'train.output={tmp_path}',
                             'train.export=false'])
    assert cfg.train.progress is False  # the lines are printed without the bars too
    train(cfg)
    lines = capsys.readouterr().out.splitlines()
    plan = lines[0]
    assert plan.startswith('plan: resnet18_bam, ') and 'M parameters (' in plan
    assert '40 training and 20 validation images of 10 classes' in plan
    assert 'input 3x32x32;' in plan  # set by data.input_size: no note
    assert '2 epochs of 5 steps (8 images x 1 process)' in plan and 'default' not in plan
    assert f'device cpu; output {tmp_path}' in plan
    (estimate,) = [line for line in lines if line.startswith('estimate:')]
    # step 1 pays for lazy initialisation; then up to the 4 other steps of the 5-step first epoch are timed
    # (fewer when they take over 20 s on a loaded machine), and the steps after them remain of the 10
    timed = int(re.search(r' s a step over (\d) steps?, \d+ % of it waiting for data \(', estimate).group(1))
    assert 1 <= timed <= 4 and f'{count(10 - 1 - timed, "step")} left: about ' in estimate, estimate
    assert estimate.endswith('plus validation after each epoch')
    assert lines.index(estimate) > 0


def test_one_epoch_of_one_step_reads_in_the_singular(tiny_data, tmp_path):
    cfg = load_config(None, [*TINY_SETTINGS, f'data.dataset={tiny_data}', 'data.batch_size=40',
                             'schedule.epochs=1', f'train.output={tmp_path}'])
    assert '; input 3x32x32; 1 epoch of 1 step (40 images x 1 process); ' in describe_plan(
        build_run(cfg, check_config(cfg)))


def test_the_minimal_call_says_its_epochs_and_input_size_are_defaults(tiny_data, tmp_path):
    cfg = load_config(None, ['model.name=resnet18_bam', f'data.dataset={tiny_data}', 'data.batch_size=8',
                             f'train.output={tmp_path}'])
    plan = describe_plan(build_run(cfg, check_config(cfg)))
    assert '90 epochs (the default; set schedule.epochs) of 5 steps' in plan
    assert "input 3x224x224 (resnet18_bam's default; set data.input_size)" in plan


class _SlowLoader:
    def __init__(self, batches: int, seconds: float):
        self.batches, self.seconds = batches, seconds

    def __iter__(self):
        for index in range(self.batches):
            time.sleep(self.seconds)
            yield index


def test_clock_measures_the_share_spent_waiting_for_data(capsys):
    clock = RunClock(steps_left=100, batch_size=16, workers=0, window_steps=4)
    for _ in clock.batches(_SlowLoader(batches=10, seconds=0.05)):
        time.sleep(0.05)  # the model's step takes as long as the loader's batch
        clock.step_done()
    (line,) = capsys.readouterr().out.splitlines()  # once, after 1 warm-up and 4 timed steps
    share = int(re.search(r'(\d+) % of it waiting for data', line).group(1))
    images_per_s = int(re.search(r'the loader gave (\d+) images/s when waited on', line).group(1))
    assert 35 <= share <= 65, line  # sleeps only lengthen under load; both halves lengthen alike
    assert 100 <= images_per_s <= 330, line  # 16 images per 0.05 s is 320/s at most
    assert '95 steps left' in line and 'data.workers=0' in line


def test_clock_says_when_the_loader_keeps_ahead_and_stays_quiet_off_rank_0(capsys):
    clock = RunClock(steps_left=3, batch_size=4, workers=2, window_steps=10)
    for _ in clock.batches(range(3)):
        time.sleep(0.02)
        clock.step_done()
    clock.report()  # the epoch ended before the window did
    (line,) = capsys.readouterr().out.splitlines()
    assert 'over 2 steps' in line and 'the loader kept ahead of the model' in line and '0 steps left' in line
    quiet = RunClock(steps_left=3, batch_size=4, workers=0, enabled=False)
    for _ in quiet.batches(range(3)):
        quiet.step_done()
    quiet.report()
    assert capsys.readouterr().out == ''


@pytest.mark.parametrize('seconds, text', [(7.4, '7 s'), (125, '2 min 5 s'), (3 * 3600 + 20 * 60 + 9, '3 h 20 min')])
def test_durations_read_as_a_person_would_say_them(seconds, text):
    assert format_duration(seconds) == text


@pytest.mark.slow  # subprocess runs
def test_a_resumed_stream_says_in_its_plan_where_it_continues(tiny_data, tmp_path):
    pytest.importorskip('webdataset')
    from bam_models.cli import main
    assert main(['shards', str(tiny_data), '--out', str(tmp_path / 'shards'), '--shard-size', '10']) == 0
    args = _train_args('wds/tiny', tmp_path / 'run', f'data.root={tmp_path / "shards"}')
    interrupted = _run(args, how='sigint', step=7, check=False)  # epoch 2 (of 5 steps), step 2
    assert interrupted.returncode == 130, interrupted.stderr
    resumed = _run(args + ['--resume', 'auto'])
    (plan,) = [line for line in resumed.stdout.splitlines() if line.startswith('plan:')]
    assert plan.endswith('; resuming at epoch 2, step 1 (wds/tiny is read as a stream, which resumes at an epoch '
                         'boundary: the first 2 steps of the epoch run again)'), plan
    epochs = [json.loads(line)['epoch'] for line in (tmp_path / 'run' / 'log.jsonl').read_text().splitlines()]
    assert epochs == [1, 2]

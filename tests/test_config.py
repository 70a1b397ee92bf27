""" Training configs: every key has a type and a range or choice, checked on load; every mistake in a config
file or a --set reaches the user as one `error:` line with exit status 2, before any work starts. """
import dataclasses
import math
from pathlib import Path

import pytest

from bam_models.cli import main
from bam_models.train.config import (
    CONSTRAINTS, ConfigError, Pair, PerChannel, Range, RunConfig, config_from_dict, load_config)

from _assertions import assert_one_error_line

ROOT = Path(__file__).resolve().parents[1]
DIGITS_YAML = str(ROOT / 'configs/digits.yaml')


def _fields():
    for section in dataclasses.fields(RunConfig):
        for f in dataclasses.fields(section.default_factory):
            yield f'{section.name}.{f.name}', f


def _one_error_line(capsys, args, tmp_path):
    output = tmp_path / 'out'
    err = assert_one_error_line(main([*args, '--set', f'train.output={output}']), capsys.readouterr().err, alone=True)
    assert not output.exists()  # refused before any work
    return err


def test_every_key_has_a_constraint_or_is_a_switch():
    unconstrained = [key for key, f in _fields() if key not in CONSTRAINTS and f.type is not bool]
    assert unconstrained == []
    assert set(CONSTRAINTS) <= {key for key, _ in _fields()}  # no constraint for a key that does not exist


def _out_of_range(rule):
    """A value just outside `rule` (a Range, Pair or PerChannel)."""
    if isinstance(rule, Range):
        if rule.low is not None:
            return rule.low - (0 if rule.low_open else 1)
        return math.inf
    if isinstance(rule, Pair):
        return [0.9, 0.5]  # min > max
    return [0.5, 0.5]  # PerChannel: two numbers for three channels


@pytest.mark.parametrize('key', [k for k, r in CONSTRAINTS.items() if isinstance(r, (Range, Pair, PerChannel))])
def test_every_range_refuses_a_value_outside_it(key):
    rule, (section, name) = CONSTRAINTS[key], key.split('.')
    value = _out_of_range(rule)
    default = getattr(getattr(RunConfig(), section), name)
    if isinstance(default, int) and not isinstance(default, bool) and isinstance(value, float) and math.isfinite(value):
        value = int(value)
    with pytest.raises(ConfigError, match=f"config key '{key}' is .* but must be"):
        config_from_dict({section: {name: value}})


@pytest.mark.parametrize('sets, message', [
    (['train.ema_decay=5'], "config key 'train.ema_decay' is 5.0 but must be in (0, 1)"),
    (['data.input_size=0'], "config key 'data.input_size' is 0 but must be at least 1"),
    (['schedule.warmup_epochs=-1'], "config key 'schedule.warmup_epochs' is -1 but must be at least 0"),
    (['optim.lr=['], 'the value of --set optim.lr=[ is not valid YAML'),
    (['data.scale=[0.5]'], "config key 'data.scale' is [0.5] but must be two numbers [min, max]"),
    (['data.mean=[a, b, c]'], "config key 'data.mean' must be a list of numbers"),
    (['optim.opt=adamww'], "config key 'optim.opt' is 'adamww'; did you mean adamw?"),
    (['train.epochs=1'], "unknown config key 'train.epochs'; 'epochs' belongs to section 'schedule': write "
                         "schedule.epochs"),
    (['train.device=gpu'], "config key 'train.device' is 'gpu' but must be 'auto', 'cpu', 'cuda'"),
    (['optim.lr=.nan'], "config key 'optim.lr' is nan but must be above 0"),
])
def test_cli_refuses_bad_values_with_one_line(sets, message, capsys, tmp_path):
    args = ['train', '--config', DIGITS_YAML]
    for s in sets:
        args += ['--set', s]
    err = _one_error_line(capsys, args, tmp_path)
    assert message in err, err


@pytest.mark.parametrize('text, message', [
    ('model: resnet18_bam\n', "config section 'model' must be a mapping of keys to values, got 'resnet18_bam'; "
                              "a config is sectioned"),
    ('lr: 0.1\n', "'lr' at the top level of the config is a key of section 'optim'"),
    ('data: 5\n', "config section 'data' must be a mapping of keys to values, got 5"),
    ('model:\n  name: [resnet18_bam\n', 'is not valid YAML'),
    ('model: {name: resnet18_bam}\n\tdata: x\n', 'is not valid YAML'),
])
def test_cli_refuses_bad_config_files_with_one_line(text, message, capsys, tmp_path):
    path = tmp_path / 'bad.yaml'
    path.write_text(text)
    err = _one_error_line(capsys, ['train', '--config', str(path), '--set', 'model.name=resnet18_bam'], tmp_path)
    assert message in err, err


def test_yaml_error_names_the_line(tmp_path):
    path = tmp_path / 'bad.yaml'
    path.write_text('model:\n  name: resnet18_bam\ndata:\n  scale: [0.5, 1.0\n')
    with pytest.raises(ConfigError, match=r'config file .*bad.yaml is not valid YAML \(.* at line \d+'):
        load_config(str(path))


def test_train_without_a_config_names_what_it_needs(capsys, tmp_path):
    err = _one_error_line(capsys, ['train'], tmp_path)
    assert 'train needs a config; pass --config FILE' in err and '--set model.name=ARCH' in err
    err = _one_error_line(capsys, ['train', '--set', 'model.name=resnet18_bam'], tmp_path)
    assert 'data.dataset' in err


def test_a_valid_tag_is_accepted_and_an_unknown_one_lists_the_real_ones(tmp_path):
    from bam_models.train.build import check_config
    check_config(load_config(DIGITS_YAML, ['model.name=resnet18_bam.tv_in1k']))
    with pytest.raises(ConfigError, match=r"model 'resnet18_bam' has no tag 'nope'; its tags: tv_in1k$"):
        check_config(load_config(DIGITS_YAML, ['model.name=resnet18_bam.nope']))


def test_multistep_milestones_reach_the_scheduler():
    """schedule.decay_milestones (the CIFAR recipes' uneven lr drops) set where the lr falls, in epochs."""
    import torch.nn as nn

    from bam_models.train.build import build_optimizer, build_scheduler
    cfg = config_from_dict({'schedule': {'sched': 'multistep', 'epochs': 10, 'decay_milestones': [3, 7],
                                         'decay_rate': 0.1, 'warmup_epochs': 0},
                            'optim': {'lr': 1.0}})
    scheduler = build_scheduler(build_optimizer(nn.Linear(2, 2).parameters(), cfg.optim), cfg.schedule,
                                steps_per_epoch=4)
    lr = {epoch: scheduler._get_lr(epoch * 4)[0] for epoch in (0, 2, 3, 6, 7, 9)}
    assert lr == pytest.approx({0: 1.0, 2: 1.0, 3: 0.1, 6: 0.1, 7: 0.01, 9: 0.01})


def _documented_keys():
    """{key: allowed-column text} of the 'Every key' table in docs/training.md."""
    text = (ROOT / 'docs' / 'training.md').read_text()
    table = text[text.index('### Every key'):text.index('## Data and class names')]
    rows = {}
    for line in table.splitlines():
        cells = [cell.strip() for cell in line.strip('|').split('|')]
        if len(cells) == 3 and cells[0].startswith('`'):
            for key in cells[0].replace(' / ', ', ').split(', '):
                rows[key.strip('`')] = cells[2]
    return rows


def test_the_docs_config_table_lists_every_key_and_every_choice():
    """docs/training.md's table is checked against the schema, so it cannot drift from it."""
    documented = _documented_keys()
    assert set(documented) == {key for key, _ in _fields()}
    for key, rule in CONSTRAINTS.items():
        if type(rule) is tuple:
            missing = [choice for choice in rule if f'`{choice}`' not in documented[key]]
            assert not missing, f"{key}: the docs do not list {missing}"

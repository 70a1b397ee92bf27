""" Training: configs and their checks, digits data, exact resume after SIGKILL / Ctrl-C, non-finite loss,
DDP (2 Gloo processes) against one process, Hub export reloaded with timm's local-dir:. """
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import yaml

from bam_models.cli import main
from bam_models.train.validate import validate
from bam_models.train.config import ConfigError, config_from_dict, load_config
from bam_models.train.data import DigitsDataset, EpochShuffleSampler
from bam_models.layers import attention_keys
from bam_models.commands.demo import DIGITS_DEMO
from bam_models.train.build import attention_parameter_names, check_config, param_groups
from bam_models.train.loop import NonFiniteLossError, train

sys.path.insert(0, str(Path(__file__).parent))
from train_helpers import (  # noqa: E402
    TINY_SETTINGS, run_cli as _run, subprocess_env as _env, train_args as _train_args)

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / 'configs').glob('*.yaml'))
STEPS_PER_EPOCH = 5  # 40 tiny train images / batch 8


def _log(output):
    return [json.loads(line) for line in (Path(output) / 'log.jsonl').read_text().splitlines()]


@pytest.fixture(scope='module')
def reference_run(tiny_data, tmp_path_factory):
    output = tmp_path_factory.mktemp('reference')
    _run(_train_args(tiny_data, output))
    return output


# ------------------------------------------------------------------------------------------- configs

@pytest.mark.parametrize('path', CONFIGS, ids=[p.stem for p in CONFIGS])
def test_bundled_config_loads_and_passes_checks(path, tmp_path):
    cfg = load_config(str(path))
    if cfg.data.dataset != 'digits':  # stand in a folder of the right class count for the real data
        for split in (cfg.data.train_split, 'val' if cfg.data.val_split == 'validation' else cfg.data.val_split):
            for c in range(cfg.model.num_classes or 10):
                (tmp_path / split / f'class{c:04d}').mkdir(parents=True)
                (tmp_path / split / f'class{c:04d}' / '0.jpg').touch()  # the checks read file names only
        cfg.data.dataset = str(tmp_path)
    classes = check_config(cfg)
    assert len(classes) == (cfg.model.num_classes or len(classes))


def test_authors_recipes_follow_the_papers():
    for arch, epochs in (('resnet50_bam', 90), ('resnet50_cbam', 100)):
        cfg = load_config(str(ROOT / f'configs/{arch}_imagenet_authors.yaml'))
        assert (cfg.model.name, cfg.schedule.epochs, cfg.schedule.sched) == (arch, epochs, 'step')
        assert (cfg.optim.opt, cfg.optim.lr, cfg.optim.momentum, cfg.optim.weight_decay) == ('momentum', 0.1, 0.9, 1e-4)
        assert (cfg.schedule.decay_epochs, cfg.schedule.decay_rate,
                cfg.optim.no_decay_bias_and_norm) == (30, 0.1, False)
        assert (cfg.data.input_size, cfg.data.crop_pct) == (224, 0.875)


def test_demo_runs_configs_digits_yaml():
    with open(ROOT / 'configs/digits.yaml') as f:
        assert config_from_dict(yaml.safe_load(f)) == config_from_dict(DIGITS_DEMO)


@pytest.mark.parametrize('sets, message', [
    (['optim.weight_decy=0.1'], "unknown config key 'optim.weight_decy'; did you mean weight_decay?"),
    (['trian.seed=1'], "unknown config section 'trian'; did you mean train?"),
    (['data.dataset=no/such/folder'], 'data folder no/such/folder does not exist'),
    (['model.num_classes=7'], 'model.num_classes is 7 but the data has 10 classes'),
    (['model.name=resnet50_bamm'], "unknown model 'resnet50_bamm' in model.name; did you mean resnet50_bam"),
    (['model.name=resnet50_bam.in1k_nope'], "model 'resnet50_bam' has no tag 'in1k_nope'"),
    (['schedule.sched=cosin'], "config key 'schedule.sched' is 'cosin'; did you mean cosine?"),
    (['optim.lr=fast'], "config key 'optim.lr' must be float, got 'fast'"),
])
def test_bad_config_fails_before_any_work_with_one_line(sets, message, tmp_path, capsys):
    output = tmp_path / 'out'
    args = ['train', '--config', str(ROOT / 'configs/digits.yaml'), '--set', f'train.output={output}']
    for s in sets:
        args += ['--set', s]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith('error: ') and message in err and '\n' not in err, err
    assert not output.exists()


def test_folder_with_missing_split_or_disagreeing_classes_is_rejected(tiny_data, tmp_path):
    (tmp_path / 'train' / 'a').mkdir(parents=True)
    cfg = load_config(None, [f'data.dataset={tmp_path}'])
    with pytest.raises(ConfigError, match="has no 'train' split"):  # a class folder without images is no class
        check_config(cfg)
    (tmp_path / 'train' / 'a' / '0.png').write_bytes(b'')  # the reader lists file names only
    with pytest.raises(ConfigError, match="has no 'validation' split"):
        check_config(cfg)
    for name in ('a', 'b'):
        (tmp_path / 'val' / name).mkdir(parents=True)
        (tmp_path / 'val' / name / '0.png').write_bytes(b'')
    with pytest.raises(ConfigError, match=r'has classes the train split lacks \(b\)'):
        check_config(cfg)


# ------------------------------------------------------------------------------------------- pieces

def test_digits_split_is_fixed_stratified_and_real():
    train_set, val_set, test_set = DigitsDataset('train'), DigitsDataset('val'), DigitsDataset('test')
    assert (len(train_set), len(val_set), len(test_set)) == (1137, 300, 360)
    assert np.bincount(val_set.targets).min() >= 29  # stratified: about 30 of each class
    assert np.bincount(test_set.targets).tolist() == [36, 36, 35, 37, 36, 36, 36, 36, 35, 37] or \
        np.bincount(test_set.targets).min() >= 35
    assert np.array_equal(DigitsDataset('test').images, test_set.images)  # same split every time
    image, label = test_set[0]
    assert image.size == (8, 8) and image.mode == 'RGB' and 0 <= label < 10
    # the two splits share no image
    train_keys = {img.tobytes() for img in train_set.images}
    assert sum(img.tobytes() in train_keys for img in test_set.images) < 10  # digits has a few exact duplicates


def test_epoch_sampler_splits_global_batches_across_processes():
    single = list(EpochShuffleSampler(40, 1, 0, seed=3))
    shards = [list(EpochShuffleSampler(40, 2, r, seed=3)) for r in range(2)]
    for step in range(5):  # one process with batch 8 == two processes with batch 4 each
        assert sorted(single[8 * step:8 * step + 8]) == sorted(shards[0][4 * step:4 * step + 4] +
                                                                shards[1][4 * step:4 * step + 4])
    sampler = EpochShuffleSampler(40, 1, 0, seed=3)
    sampler.set_epoch(1)
    assert list(sampler) != single and sorted(sampler) == sorted(single)


def test_param_groups_give_attention_its_own_lr():
    for name in ('resnet18_bam', 'resnet18_cbam'):
        model = timm.create_model(name, num_classes=10)
        groups = param_groups(model, 1e-4, 10.0, no_decay_bias_and_norm=True)
        by_name = {g['group_name']: g for g in groups}
        assert set(by_name) == {'attention', 'attention_no_decay', 'trunk', 'trunk_no_decay'}
        assert by_name['attention']['lr_scale'] == 10.0 and by_name['trunk']['lr_scale'] == 1.0
        assert by_name['trunk_no_decay']['weight_decay'] == 0.0
        attention = sum(p.numel() for g in groups if g['group_name'].startswith('attention') for p in g['params'])
        expected = sum(p.numel() for n, p in model.named_parameters() if n in set(attention_keys(model)))
        assert attention == expected > 0
    names = attention_parameter_names(timm.create_model('resnet18_bam'))
    assert 'layer1.bam.channel_gate.fc1.weight' in names and 'layer1.0.conv1.weight' not in names


def test_timm_squeeze_excitation_is_trunk_not_attention():
    """Attention means the BAM/CBAM module types: timm's SE blocks (also named `.se`) train as trunk."""
    model = timm.create_model('seresnet18', num_classes=10)
    assert any('.se.' in n for n, _ in model.named_parameters())
    assert attention_parameter_names(model) == set()
    groups = {g['group_name'] for g in param_groups(model, 1e-4, 10.0, no_decay_bias_and_norm=True)}
    assert groups == {'trunk', 'trunk_no_decay'}


def test_freeze_trunk_trains_only_attention_and_head(tiny_data):
    from bam_models.train.build import build_model
    cfg = load_config(None, [*TINY_SETTINGS, f'data.dataset={tiny_data}', 'model.freeze=trunk'])
    model = build_model(cfg, 10)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    attention = attention_parameter_names(model)
    assert trainable and all(n in attention or n.startswith('fc.') for n in trainable)
    assert 'fc.weight' in trainable and any('.bam.' in n for n in trainable)


# ------------------------------------------------------------------------------------------- runs

def test_run_writes_logs_checkpoints_and_a_hub_folder_timm_loads(reference_run, tiny_data):
    log = _log(reference_run)
    assert [r['epoch'] for r in log] == [1, 2]  # numbered from 1, as on the console
    assert log[1]['train_loss'] < log[0]['train_loss']
    summary = json.loads((reference_run / 'summary.json').read_text())
    best = summary['best']
    assert best['top1'] == max(r['val_top1'] for r in log)
    assert not list(reference_run.glob('*.tmp'))
    last = torch.load(reference_run / 'last.pth', weights_only=True)
    assert {'state_dict', 'optimizer', 'scheduler', 'rng', 'config', 'epoch'} <= set(last) and last['epoch'] == 2
    hub = reference_run / 'hub'
    assert {p.name for p in hub.iterdir()} >= {'model.safetensors', 'config.json', 'README.md'}
    config = json.loads((hub / 'config.json').read_text())
    assert config['architecture'] == 'resnet18_bam' and config['num_classes'] == 10
    assert config['pretrained_cfg']['input_size'] == [3, 32, 32]
    model = timm.create_model(f'local-dir:{hub}')
    assert model.num_classes == 10
    reloaded = validate(f'local-dir:{hub}', str(tiny_data), split='val')
    assert reloaded['count'] == 20 and math.isclose(reloaded['top1'], best['top1'], abs_tol=1e-9)
    from_checkpoint = validate('resnet18_bam', str(tiny_data), checkpoint=str(reference_run / 'best.pth'), split='val')
    assert math.isclose(from_checkpoint['loss'], reloaded['loss'], rel_tol=1e-6)


@pytest.mark.slow  # a subprocess or torch.compile
def test_sigkill_mid_epoch_then_resume_ends_like_an_uninterrupted_run(reference_run, tiny_data, tmp_path):
    args = _train_args(tiny_data, tmp_path)
    killed = _run(args, how='kill', step=STEPS_PER_EPOCH + 2, check=False)  # epoch 2, step 2
    assert killed.returncode == -9
    assert [r['epoch'] for r in _log(tmp_path)] == [1]
    assert torch.load(tmp_path / 'last.pth', weights_only=True)['epoch'] == 1
    _run(args + ['--resume', 'auto'])
    assert _log(tmp_path) == [
        {**r, 'img_per_s': s['img_per_s'], 'epoch_time_s': s['epoch_time_s']}
        for r, s in zip(_log(reference_run), _log(tmp_path))]


@pytest.mark.slow  # a subprocess or torch.compile
def test_ctrl_c_saves_last_and_resume_ends_like_an_uninterrupted_run(reference_run, tiny_data, tmp_path):
    args = _train_args(tiny_data, tmp_path)
    interrupted = _run(args, how='sigint', step=STEPS_PER_EPOCH + 3, check=False)
    assert interrupted.returncode == 130, interrupted.stderr
    last = torch.load(tmp_path / 'last.pth', weights_only=True)
    assert (last['epoch'], last['step_in_epoch']) == (1, 3)  # saved in the middle of epoch 2
    _run(args + ['--resume', str(tmp_path / 'last.pth')])
    resumed, reference = _log(tmp_path)[-1], _log(reference_run)[-1]
    for key in ('val_loss', 'val_top1', 'val_top5', 'lr'):
        assert resumed[key] == reference[key], key


def test_non_finite_loss_stops_with_epoch_and_step_and_keeps_last_good_checkpoint(tiny_data, tmp_path, monkeypatch):
    import bam_models.train.build as train_module

    class ExplodingLoss(train_module.LabelSmoothingCrossEntropy):
        calls = 0

        def forward(self, x, target):
            ExplodingLoss.calls += 1
            loss = super().forward(x, target)
            return loss * float('nan') if ExplodingLoss.calls == STEPS_PER_EPOCH + 2 else loss

    monkeypatch.setattr(train_module, 'LabelSmoothingCrossEntropy', ExplodingLoss)
    cfg = load_config(None, [*TINY_SETTINGS, f'data.dataset={tiny_data}', f'train.output={tmp_path}'])
    expected = r'at epoch 2, step 2 of 5; .*last.pth still holds the state after epoch 1'
    with pytest.raises(NonFiniteLossError, match=expected):
        train(cfg)
    last = torch.load(tmp_path / 'last.pth', weights_only=True)
    assert last['epoch'] == 1
    assert all(torch.isfinite(v).all() for v in last['state_dict'].values() if v.is_floating_point())


@pytest.mark.slow  # a subprocess or torch.compile
def test_two_gloo_processes_match_one_process(tiny_data, tmp_path):
    # frozen BN: per-process batch statistics would otherwise differ (SyncBatchNorm is GPU-only)
    sets = [*TINY_SETTINGS, f'data.dataset={tiny_data}', 'schedule.epochs=1', 'model.freeze=bn']
    _run(_train_args(tiny_data, tmp_path / 'one', *sets[len(TINY_SETTINGS) + 1:]))
    ddp_sets = [*sets, f'train.output={tmp_path / "two"}', 'data.batch_size=4']  # 2 x 4 = the same global batch
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', '--master_port', '29577',
           '-m', 'bam_models.cli', 'train', *[a for s in ddp_sets for a in ('--set', s)]]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (two,), (one,) = _log(tmp_path / 'two'), _log(tmp_path / 'one')
    for key in ('train_loss', 'val_loss', 'val_top5', 'val_top1', 'lr'):
        assert math.isclose(two[key], one[key], rel_tol=1e-4), (key, two, one)
    assert json.loads((tmp_path / 'two' / 'summary.json').read_text())['processes'] == 2
    assert sorted(p.name for p in (tmp_path / 'two').iterdir()) == [
        'best.pth', 'hub', 'last.pth', 'log.jsonl', 'summary.json']  # one set of files, written by rank 0


def test_sync_bn_on_cpu_is_rejected(tiny_data):
    cfg = load_config(None, [f'data.dataset={tiny_data}', 'model.sync_bn=true', 'train.device=cpu'])
    with pytest.raises(ConfigError, match='SyncBatchNorm is GPU-only'):
        check_config(cfg)

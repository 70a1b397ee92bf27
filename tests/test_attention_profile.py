""" scripts/attention_profile.py: the attention modules' own time inside real passes, and the bandwidth floor. """

import pytest
import timm
import torch

from bam_models.benchmark.attention_profile import (
    MIN_PASSES, AttentionTimer, attention_ops, copy_bandwidth, onnxruntime_ops, profile_attention)

from _scripts import load_script



@pytest.mark.parametrize('name', ['resnet18_bam', 'resnet18_cbam'])
def test_timer_sees_forward_and_backward_of_every_attention_module(name):
    model = timm.create_model(name, num_classes=4)
    timer = AttentionTimer(model)
    x = torch.randn(2, 3, 64, 64)
    model(x).sum().backward()
    assert 0 < timer.forward_s and 0 < timer.backward_s
    # BAM refines the outputs of layer1-3 (64x16x16, 128x8x8, 256x4x4); CBAM every block's (2 blocks a stage)
    stages = [64 * 256, 128 * 64, 256 * 16, 512 * 4]
    per_image = sum(stages[:3]) if name.endswith('_bam') else 2 * sum(stages)
    assert timer.map_bytes == 2 * 4 * per_image
    timer.reset()
    with torch.no_grad():
        model(x)
    assert timer.forward_s > 0 and timer.backward_s == 0
    counted = (timer.forward_s, timer.map_bytes)
    timer.remove()
    model(x).sum().backward()
    assert (timer.forward_s, timer.map_bytes, timer.backward_s) == (*counted, 0)  # no hook left counting


def test_profile_rows_set_time_against_the_floor():
    rows = profile_attention('resnet18_bam', 'resnet18', img_size=64, batch_size=2, repeats=1, bandwidth=1e10)
    assert [(r['model'], r['pass_']) for r in rows] == [
        ('resnet18', 'train'), ('resnet18', 'inference'), ('resnet18_bam', 'train'), ('resnet18_bam', 'inference')]
    for row in rows:
        if row['model'] == 'resnet18':
            assert row['attention_ms'] == 0 and row['map_mib'] == 0
        else:
            assert 0 < row['attention_ms'] < row['total_ms']
            assert row['floor_ms'] == pytest.approx(1e3 * MIN_PASSES[row['pass_']] * row['map_mib'] * 2**20 / 1e10)


@pytest.mark.parametrize('train', [True, False])
def test_attention_ops_are_the_modules_own_aten_calls(train):
    rows = attention_ops('resnet18_cbam', img_size=64, batch_size=2, top=50, train=train)
    names = [row['op'] for row in rows]
    assert all(row['calls'] > 0 and row['ms'] >= 0 for row in rows)
    # CBAM's 7x7 spatial convolution and its sigmoids run in both passes, gradients only in training
    assert 'aten::sigmoid' in names or 'aten::sigmoid_' in names, names
    assert any('backward' in name for name in names) == train, names
    assert 'aten::max_pool2d' not in names  # the stem's pool is the trunk's, not the attention's


def test_onnxruntime_profile_counts_the_graph_onnxruntime_runs():
    pytest.importorskip('onnxruntime')
    trunk = {r['op']: r for r in onnxruntime_ops('resnet18', img_size=64, repeats=2)}
    cbam = {r['op']: r for r in onnxruntime_ops('resnet18_cbam', img_size=64, repeats=2)}
    assert all(r['ms'] >= 0 for r in (*trunk.values(), *cbam.values()))
    # resnet18: 20 convolutions (onnxruntime fuses each residual Add and ReLU into one); no channel reduction
    assert trunk['Conv']['calls'] == 20 and 'ReduceMax' not in trunk and 'Add' not in trunk
    # resnet18_cbam: per CBAM a max over channels (its mean is a 1x1 convolution: 4 more convolutions per CBAM,
    # MLP, mean, 7x7), two gating products and the residual Add that can no longer be fused
    assert cbam['ReduceMax']['calls'] == 8 and 'ReduceMean' not in cbam
    assert cbam['Conv']['calls'] == 20 + 8 * 4 and cbam['Mul']['calls'] == 16 and cbam['Add']['calls'] == 8
    assert cbam['ReorderOutput']['calls'] > trunk.get('ReorderOutput', {'calls': 0})['calls']


def test_copy_bandwidth_is_a_rate():
    assert 1e8 < copy_bandwidth(mib=16, repeats=2) < 1e13


def test_quick_script_prints_both_tables(tmp_path, capsys):
    out = tmp_path / 'profile.md'
    assert load_script('attention_profile').main(['--quick', '--onnxruntime', '--markdown', str(out)]) == 0
    table = capsys.readouterr().out
    assert '| `resnet18_bam` | train |' in table and 'GB/s' in table and '64 px, batch 2' in table
    assert '`resnet18_bam` exported, in onnxruntime at batch 1: kernel time per op type' in table
    assert "`resnet18_bam`'s attention modules alone, forward and backward" in table
    assert out.read_text().strip() == table.strip()

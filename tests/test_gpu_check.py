""" scripts/gpu_check.py runs end to end on CPU at its quick size, so it is ready for a GPU machine. """
import json

import pytest
import torch

from _scripts import load_script

pytestmark = pytest.mark.slow  # the whole module runs a CLI end to end



def test_quick_cpu_run_checks_fused_against_reference_and_measures_every_variant(tmp_path, capsys):
    gpu_check = load_script('gpu_check')
    out_json, out_md = tmp_path / 'check.json', tmp_path / 'check.md'
    try:
        # the quick size itself (64 px): at 32 px the last stages are 1-2 pixels wide and bf16 gradients of both
        # paths are off by more than their own norm, which no bound can tell apart
        rc = gpu_check.main(['--device', 'cpu', '--quick', '-q',
                             '--json', str(out_json), '--markdown', str(out_md)])
    finally:
        torch._dynamo.reset()
    result = json.loads(out_json.read_text())
    checks = {(r['model'], r['mode']): r for r in result['checks']}
    # fp16 autocast training is not supported on CPU: reported as not applicable, neither a pass nor a failure,
    # so the run exits 0 exactly when every check that applies to CPU passes
    for name in ('resnet50_bam', 'resnet50_cbam'):
        assert checks[name, 'fp16']['ok'] is None and 'not supported on CPU' in checks[name, 'fp16']['not_applicable']
    applicable = [r for r in checks.values() if r['not_applicable'] is None]
    assert len(applicable) == 6 and all(r['ok'] for r in applicable), applicable
    assert rc == 0
    assert set(checks) == {(m, mode) for m in ('resnet50_bam', 'resnet50_cbam')
                           for mode in ('fp32', 'bf16', 'fp16', 'channels_last')}
    for row in applicable:
        assert row['same_grads'] and row['worst_param']
    # the fused nodes are not the reference's autograd graph: rounding differs, but not much
    for mode in ('fp32', 'channels_last', 'bf16'):
        row = checks['resnet50_cbam', mode]
        assert row['ok'] and 0 < row['grad_rel_error'] <= row['tolerance'], row
    rows = {(r['model'], r['variant']): r for r in result['measurements']}
    assert set(rows) == {(m, v) for m in ('resnet50', 'resnet50_bam', 'resnet50_cbam')
                         for v in ('fused', 'reference', 'compiled')}
    assert rows['resnet50', 'fused']['train_step_ratio'] == 1.0
    for row in rows.values():
        assert row['train_step_ms'] > 0 and row['throughput_img_s'] > 0 and row['peak_train_bytes'] > 0
    # the fused BAM keeps less for backward than the plain formulas
    assert rows['resnet50_bam', 'fused']['peak_train_bytes'] < rows['resnet50_bam', 'reference']['peak_train_bytes']
    table = out_md.read_text()
    assert table.strip() == capsys.readouterr().out.strip()
    assert '| `resnet50_cbam` | compiled |' in table and '| `resnet50_bam` | fp16 | – |' in table


def test_a_measurement_precision_the_device_cannot_train_in_is_refused(capsys):
    gpu_check = load_script('gpu_check')
    assert gpu_check.main(['--device', 'cpu', '--quick', '--precision', 'fp16', '-q']) == 2
    assert 'error: --precision fp16 cannot be measured on cpu' in capsys.readouterr().err

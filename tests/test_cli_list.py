""" `bam-models list`: the zoo table with measured parameters and FLOPs. """
import json
import subprocess
import sys

import pytest
import timm

import bam_models
from bam_models.benchmark import count_params, model_stats, model_table
from bam_models.models.paper import PAPER_FIGURES, PAPER_METRICS


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, '-m', 'bam_models.cli', *args], capture_output=True, text=True, check=False)


@pytest.mark.slow  # a subprocess or torch.compile
def test_list_prints_every_zoo_model_with_counts():
    result = _cli('list', '--json')
    assert result.returncode == 0, result.stderr
    rows = {row['model']: row for row in json.loads(result.stdout)}
    assert sorted(rows) == sorted(bam_models.list_zoo_models())
    assert rows['resnet50_bam']['params'] == 25_915_099
    assert rows['resnet50_cbam']['params'] == 28_089_624
    table = _cli('list', '*_cbam').stdout.splitlines()
    assert table[0].startswith('| model |') and len(table) == 2 + len(bam_models.list_zoo_models('*_cbam'))
    assert '| `resnet50_cbam` | 28,089,624 |' in '\n'.join(table)


def test_flop_overheads_match_the_papers():
    """Papers: ResNet50 3.86 GFLOPs (multiply-adds) -> +BAM 3.94 (+2.1%), +CBAM 3.864 (+0.1%)."""
    plain, bam, cbam = (model_stats(n)['gmacs'] for n in ('resnet50', 'resnet50_bam', 'resnet50_cbam'))
    assert 0.015 < bam / plain - 1 < 0.025
    assert 0.0 < cbam / plain - 1 < 0.005


@pytest.mark.slow  # a subprocess or torch.compile
def test_unknown_pattern_fails_with_a_hint():
    result = _cli('list', '*_nonexistent')
    assert result.returncode != 0
    assert 'bam-models list' in result.stderr


def test_paper_table_holds_the_papers_printed_figures_not_our_counts():
    """Every published figure is one the papers print (parameters to 0.01M, GFLOPs to at most three decimals),
    names a table of one of the two papers, and belongs to a registered model; no parameter figure equals our
    count, so "ours vs paper" cannot be zero by construction."""
    for name, figures in PAPER_FIGURES.items():
        assert timm.is_model(name), name
        assert set(figures) <= set(PAPER_METRICS), name
        for figure in figures.values():
            assert figure.table.paper.startswith(('BAM:', 'CBAM:')) and figure.table.number > 0
            assert str(figure.table.number) in str(figure.table)
        if 'params' in figures:
            printed = figures['params'].value
            assert printed % 10_000 == 0, (name, printed)
            ours = count_params(timm.create_model(name, device='meta'))
            assert ours != printed and abs(ours / printed - 1) < 0.005, (name, ours, printed)
        if 'gmacs' in figures:
            assert round(figures['gmacs'].value, 3) == figures['gmacs'].value, name


def test_list_shows_the_papers_parameter_figure():
    stats = [model_stats(name) for name in ('resnet50_bam', 'mobilenetv1_100_cbam', 'resnet34_bam')]
    rows = model_table(stats).splitlines()[2:]
    assert rows[0].endswith('| 25.92M |') and rows[1].endswith('| 5.07M |') and rows[2].endswith('|  |')

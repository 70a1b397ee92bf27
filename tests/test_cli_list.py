""" `bam-models list`: the zoo table with measured parameters and FLOPs. """
import json
import subprocess
import sys

import bam_models
from bam_models.profiling import model_stats


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, '-m', 'bam_models.cli', *args], capture_output=True, text=True, check=False)


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


def test_unknown_pattern_fails_with_a_hint():
    result = _cli('list', '*_nonexistent')
    assert result.returncode != 0
    assert 'bam-models list' in result.stderr

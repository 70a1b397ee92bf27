""" scripts/input_pipeline.py measures the training loader alone, the same images as a folder and as shards. """
import json

import pytest

from _scripts import load_script

pytestmark = pytest.mark.slow  # loader worker processes



def test_quick_run_times_folder_and_shards_over_the_same_images(tmp_path, capsys):
    pytest.importorskip('webdataset')
    out = tmp_path / 'pipeline.json'
    assert load_script('input_pipeline').main(['--quick', '--workers', '0', '1', '--json', str(out)]) == 0
    result = json.loads(out.read_text())
    rows = {(r['source'], r['workers']): r for r in result['rows']}
    assert set(rows) == {(source, workers) for source in ('folder', 'shards') for workers in (0, 1)}
    for row in rows.values():  # 32 images in 4 full batches of 8, whichever way they are read
        assert row['images'] == 32 and row['seconds'] > 0
        assert row['images_per_s'] == pytest.approx(32 / row['seconds'])
    assert result['mean_jpeg_kb'] > 0 and result['input_size'] == 64
    table = capsys.readouterr().out
    assert '| shards | 1 | 32 |' in table and result['machine']['cpu'] in table


def test_too_few_images_for_a_batch_is_one_line(capsys):
    assert load_script('input_pipeline').main(['--images', '3', '--batch-size', '32', '--workers', '0']) == 2
    err = capsys.readouterr().err.strip()
    assert err == ('error: 3 images make no full batch of 32 with every one of the 10 classes; measure at least 32 '
                   'images (--images)')

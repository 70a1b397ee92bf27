""" The demo selects its best epoch on validation digits carved from the training images and scores the 360
test digits once, with the reloaded Hub folder and best.pth agreeing; epochs are numbered from 1 in log.jsonl,
summary.json and best.pth alike. """
import json

import pytest
import numpy as np

from bam_models.train.data import DigitsDataset, build_dataset
from bam_models.commands.demo import run_demo

pytestmark = pytest.mark.slow  # the whole module runs a CLI end to end


def test_digits_validation_is_carved_from_training_and_disjoint_from_test():
    splits = {name: DigitsDataset(name) for name in ('train', 'val', 'test')}
    assert {name: len(d) for name, d in splits.items()} == {'train': 1137, 'val': 300, 'test': 360}
    keys = {name: {img.tobytes() for img in d.images} for name, d in splits.items()}
    assert len(keys['val'] & keys['train']) < 5  # digits holds a few exact duplicate images
    assert np.array_equal(DigitsDataset('val').images, splits['val'].images)  # the same split every time
    # what training selects on (data.val_split 'validation') and what the demo scores once at the end
    assert len(build_dataset('digits', 'val')) == 300 and len(build_dataset('digits', 'val', val_split='test')) == 360
    assert len(build_dataset('digits', 'train')) == 1137


def test_demo_selects_on_validation_and_scores_the_test_digits_once(tmp_path):
    output = tmp_path / 'demo'
    result = run_demo(str(output), progress=False, overrides=['schedule.epochs=1', 'schedule.warmup_epochs=0'])
    log = [json.loads(line) for line in (output / 'log.jsonl').read_text().splitlines()]
    summary = json.loads((output / 'summary.json').read_text())
    assert [r['epoch'] for r in log] == [1] and summary['best']['epoch'] == 1 == result.summary['best']['epoch']
    assert log[0]['val_images'] == result.val_images == 300  # selection never saw the test digits
    assert result.test['count'] == 360 and result.reload_matches
    assert summary['best']['top1'] == log[0]['val_top1']
    assert (output / 'attention.png').stat().st_size > 0

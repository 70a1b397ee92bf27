""" The README's model table is generated: it must equal what `bam-models list` measures now. """
import pathlib
import re
import runpy

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_readme_model_table_is_current():
    updater = runpy.run_path(str(ROOT / 'scripts' / 'update_readme_table.py'))
    readme = (ROOT / 'README.md').read_text()
    block = re.search(re.escape(updater['START']) + r'\n(.*?)\n' + re.escape(updater['END']), readme, re.S)
    assert block, 'README.md lost its model-table markers'
    assert block.group(1) == updater['render'](), 'run `python scripts/update_readme_table.py`'

""" The README's model table is generated and equals what `bam-models list` measures now; the README links every
docs page. """
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


def test_readme_links_every_docs_page():
    readme = (ROOT / 'README.md').read_text()
    pages = sorted(p.name for p in (ROOT / 'docs').glob('*.md') if not p.name.startswith('_') and p.name != 'index.md')
    unlinked = [name for name in pages if f'](docs/{name})' not in readme]
    assert not unlinked, f"add these docs pages to the README's documentation table: {unlinked}"

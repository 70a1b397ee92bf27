""" The README's model table (the ImageNet models) is generated and equals what `bam-models list` measures now;
the README and docs/index.md link every docs page; relative links and their anchors resolve. """
import pathlib
import re
import runpy

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAGES = [ROOT / 'README.md'] + sorted(p for p in (ROOT / 'docs').glob('*.md') if not p.name.startswith('_'))
FENCED = re.compile(r'^```.*?^```', flags=re.M | re.S)  # code blocks: their '#' lines are no headings


def test_readme_model_table_is_current():
    updater = runpy.run_path(str(ROOT / 'scripts' / 'update_readme_table.py'))
    readme = (ROOT / 'README.md').read_text()
    block = re.search(re.escape(updater['START']) + r'\n(.*?)\n' + re.escape(updater['END']), readme, re.S)
    assert block, 'README.md lost its model-table markers'
    names = updater['readme_models']()
    assert block.group(1) == updater['render'](names), 'run `python scripts/update_readme_table.py`'
    assert names and not any('_cifar' in name for name in names)


def test_readme_and_docs_index_link_every_docs_page():
    readme = (ROOT / 'README.md').read_text()
    index = (ROOT / 'docs' / 'index.md').read_text()
    pages = sorted(p.name for p in (ROOT / 'docs').glob('*.md') if not p.name.startswith('_') and p.name != 'index.md')
    assert [name for name in pages if f'](docs/{name})' not in readme] == [], "add them to the README's table"
    assert [name for name in pages if f']({name})' not in index] == [], 'add them to docs/index.md'


def _anchors(markdown: str) -> set:
    """GitHub's anchors of a page's headings: lower case, punctuation dropped, spaces as hyphens."""
    headings = re.findall(r'^#+ (.*)$', FENCED.sub('', markdown), flags=re.M)
    return {re.sub(r'[^\w\- ]', '', heading.strip().lower()).replace(' ', '-') for heading in headings}



@pytest.mark.parametrize('page', PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_relative_links_resolve(page):
    """Links to files of the repository name existing files, and their #anchors existing headings. A link to a
    docs page that is not in the tree yet is allowed (each page comes with the feature it documents)."""
    text = page.read_text()
    broken = []
    for target in re.findall(r'\]\(([^)\s]+)\)', FENCED.sub('', text)):
        if re.match(r'[a-z]+:', target):
            continue  # https:, mailto:
        path, _, anchor = target.partition('#')
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            if not (file.parent == ROOT / 'docs' and file.suffix == '.md'):
                broken.append(target)
        elif anchor and anchor not in _anchors(file.read_text()):
            broken.append(target)
    assert not broken, f'{page.name}: broken links {broken}'

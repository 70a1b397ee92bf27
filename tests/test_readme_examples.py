""" The README's usage, detection, segmentation and export examples run as written. """
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / 'README.md'
SECTIONS = ('Using the models', 'Detection', 'Segmentation', 'Export')


def _python_blocks(section: str):
    text = README.read_text()
    match = re.search(rf'^## {section}\n(.*?)(?=^## |\Z)', text, flags=re.M | re.S)
    assert match, f"README.md has no '## {section}' section"
    blocks = re.findall(r'```python\n(.*?)```', match.group(1), flags=re.S)
    assert blocks, f"README.md's '## {section}' section has no python example"
    return blocks


@pytest.mark.parametrize('section', SECTIONS)
def test_readme_examples_run(section, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # examples that write files write them here
    for block in _python_blocks(section):
        exec(compile(block, f'README.md ## {section}', 'exec'), {'__name__': '__readme__'})

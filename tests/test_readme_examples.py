""" The Python examples of README.md and of every page under docs/ run as written.

Convention for writers of the README and the docs pages:
- every fenced block whose info string is exactly `python` is executed, in the order of the page, in one
  namespace per page (a later block may use what an earlier one defined), in a fresh temporary directory
  (examples that write files write them there);
- a block that cannot run in a test (it downloads weights or data, trains for long, needs a GPU or files the
  reader supplies) is fenced ```python no-run: it is shown but not executed;
- other blocks (`bash`, `text`, `yaml`, ...) are not executed;
- pages whose file name starts with `_` (working notes) are not checked.
Keep the executed examples small (a few seconds each: small models, 32-160 px inputs); the whole file runs in
the suite on 2 CPU cores.
"""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / 'README.md'] + sorted(p for p in (ROOT / 'docs').glob('*.md') if not p.name.startswith('_'))
# an opening fence with its info string, then everything up to the closing fence
FENCE = re.compile(r'^```([^\n`]*)\n(.*?)^```[ \t]*$', flags=re.M | re.S)


def code_blocks(text: str):
    """(info string, code, line number) of every fenced block of a Markdown text."""
    return [(m.group(1).strip(), m.group(2), text.count('\n', 0, m.start()) + 2) for m in FENCE.finditer(text)]


def runnable_blocks(text: str):
    """The blocks the runner executes, with their line numbers; a python block with another info string than
    `python no-run` is refused, so a typo cannot silently turn an example off."""
    blocks = []
    for info, code, line in code_blocks(text):
        words = info.split()
        if not words or words[0] != 'python':
            continue
        if words[1:] == ['no-run']:
            continue
        assert not words[1:], f"line {line}: unknown python block option {' '.join(words[1:])!r} (only 'no-run')"
        blocks.append((code, line))
    return blocks


def test_block_parser_follows_the_convention():
    text = ('intro\n```python\na = 1\n```\n\n```python no-run\ndownload()\n```\n'
            '```bash\nmake test\n```\n```python\nb = a + 1\n```\n')
    assert runnable_blocks(text) == [('a = 1\n', 3), ('b = a + 1\n', 13)]
    with pytest.raises(AssertionError, match='unknown python block option'):
        runnable_blocks('```python norun\nx = 1\n```\n')


def test_the_readme_has_runnable_examples():
    assert len(runnable_blocks((ROOT / 'README.md').read_text())) >= 3


@pytest.mark.parametrize('page', PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_examples_run(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # examples that write files write them here
    namespace = {'__name__': '__docs__'}
    for code, line in runnable_blocks(page.read_text()):
        # leading newlines make tracebacks point at the page's own line numbers
        exec(compile('\n' * (line - 1) + code, str(page.relative_to(ROOT)), 'exec'), namespace)

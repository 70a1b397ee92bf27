"""Regenerate the generated model tables (README.md and docs/models.md) from `bam-models list`; run after adding
or changing a model. `python scripts/update_readme_table.py [FILE ...]` writes only the files named."""
import pathlib
import re
import sys

from bam_models.commands.list_models import model_table
from bam_models.models import list_zoo_models
from bam_models.profiling import model_stats

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / 'README.md'
DOCS = ROOT / 'docs' / 'models.md'
START, END = '<!-- model-table:start -->', '<!-- model-table:end -->'
BLOCK = re.compile(re.escape(START) + '.*?' + re.escape(END), re.S)


def render() -> str:
    return model_table([model_stats(name) for name in list_zoo_models()])


def write_table(path: pathlib.Path, table: str) -> None:
    text = path.read_text()
    if not BLOCK.search(text):
        raise SystemExit(f'{path} has no {START} ... {END} block to fill')
    path.write_text(BLOCK.sub(lambda _: f'{START}\n{table}\n{END}', text))


def main(paths=None) -> None:
    table = render()
    for path in paths or [README, DOCS]:
        write_table(pathlib.Path(path), table)


if __name__ == '__main__':
    main(sys.argv[1:])

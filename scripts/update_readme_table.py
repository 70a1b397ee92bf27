"""Regenerate the generated model tables from `bam-models list`: README.md lists the ImageNet models, docs/models.md
every model (CIFAR networks included); run after adding or changing a model.
`python scripts/update_readme_table.py [FILE ...]` writes only the files named."""
import pathlib
import re
import sys

from bam_models.benchmark import model_stats, model_table
from bam_models.models import list_zoo_models

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / 'README.md'
DOCS = ROOT / 'docs' / 'models.md'
START, END = '<!-- model-table:start -->', '<!-- model-table:end -->'
BLOCK = re.compile(re.escape(START) + '.*?' + re.escape(END), re.S)


def render(names=None) -> str:
    return model_table([model_stats(name) for name in (list_zoo_models() if names is None else names)])


def readme_models() -> list:
    """The README keeps to the ImageNet networks; the CIFAR family is in docs/models.md."""
    return [name for name in list_zoo_models() if '_cifar' not in name]


def table_for(path: pathlib.Path) -> str:
    return render(readme_models() if pathlib.Path(path).resolve() == README else None)


def write_table(path: pathlib.Path, table: str) -> None:
    text = path.read_text()
    if not BLOCK.search(text):
        raise SystemExit(f'{path} has no {START} ... {END} block to fill')
    path.write_text(BLOCK.sub(lambda _: f'{START}\n{table}\n{END}', text))


def main(paths=None) -> None:
    for path in paths or [README, DOCS]:
        write_table(pathlib.Path(path), table_for(path))


if __name__ == '__main__':
    main(sys.argv[1:])

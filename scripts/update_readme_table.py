"""Regenerate the README's model table from `bam-models list` (run after adding or changing a model)."""
import pathlib
import re

from bam_models.commands.list_models import model_table
from bam_models.models import list_zoo_models
from bam_models.profiling import model_stats

README = pathlib.Path(__file__).resolve().parents[1] / 'README.md'
START, END = '<!-- model-table:start -->', '<!-- model-table:end -->'


def render() -> str:
    return model_table([model_stats(name) for name in list_zoo_models()])


def main() -> None:
    text = README.read_text()
    pattern = re.compile(re.escape(START) + '.*?' + re.escape(END), re.S)
    if not pattern.search(text):
        raise SystemExit(f'{README} has no {START} ... {END} block to fill')
    README.write_text(pattern.sub(lambda _: f'{START}\n{render()}\n{END}', text))


if __name__ == '__main__':
    main()

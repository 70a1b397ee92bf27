""" The package's import graph, read from the source with `ast` (imports inside functions included):
no cycle between top-level parts, `layers/` imports nothing above it, and no private name crosses a part. """
import ast
from pathlib import Path
from typing import Dict, Iterator, List, NamedTuple, Optional, Set

PACKAGE = Path(__file__).parents[1] / 'bam_models'
ROOT = '__init__'  # the package itself (`import bam_models`, `from bam_models import X` for a name of it)
# what the layers may import: the floor below them, and themselves
LAYERS_FLOOR = {'errors', '_compat', 'checkpoint', 'layers'}


class Import(NamedTuple):
    importer: str  # module path inside the package, e.g. 'hub/load.py'
    part: str  # top-level part of the importer
    target: str  # top-level part imported
    names: List[str]  # dotted path and names imported, for the private-name check
    line: int


def _part(relative: Path) -> str:
    return ROOT if relative.parts == ('__init__.py',) else relative.parts[0].removesuffix('.py')


def _is_part(name: str) -> bool:
    return (PACKAGE / name).is_dir() or (PACKAGE / f'{name}.py').is_file()


def _module_path(relative: Path, node: ast.ImportFrom) -> List[str]:
    """The absolute dotted path below the package of a `from X import ...`, or [] when outside it."""
    if node.level == 0:
        parts = (node.module or '').split('.')
        return parts[1:] if parts[0] == 'bam_models' else []
    package = list(relative.parent.parts)
    base = package[:len(package) - (node.level - 1)] if node.level > 1 else package
    return base + (node.module.split('.') if node.module else [])


def _imports_of(path: Path) -> Iterator[Import]:
    relative = path.relative_to(PACKAGE)
    part = _part(relative)
    for node in ast.walk(ast.parse(path.read_text(encoding='utf-8'))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split('.')
                if parts[0] == 'bam_models':
                    target = parts[1] if len(parts) > 1 else ROOT
                    yield Import(str(relative), part, target, parts[2:], node.lineno)
        elif isinstance(node, ast.ImportFrom):
            module = _module_path(relative, node)
            if node.level == 0 and not (node.module or '').startswith('bam_models'):
                continue
            names = [alias.name for alias in node.names]
            if module:
                yield Import(str(relative), part, module[0], module[1:] + names, node.lineno)
                continue
            for name in names:  # `from bam_models import hub` names a part; `import BAM` the package itself
                target = name if _is_part(name) else ROOT
                yield Import(str(relative), part, target, [] if target == name else [name], node.lineno)


def _all_imports() -> List[Import]:
    return [imp for path in sorted(PACKAGE.rglob('*.py')) for imp in _imports_of(path)]


def _graph(imports: List[Import]) -> Dict[str, Set[str]]:
    graph: Dict[str, Set[str]] = {}
    for imp in imports:
        if imp.target != imp.part:
            graph.setdefault(imp.part, set()).add(imp.target)
    return graph


def _cycle(graph: Dict[str, Set[str]]) -> Optional[List[str]]:
    """One cycle of `graph` as [a, b, ..., a], or None."""
    state: Dict[str, str] = {}
    stack: List[str] = []

    def visit(node: str) -> Optional[List[str]]:
        state[node] = 'open'
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 'open':
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 'done'
        return None

    for start in sorted(graph):
        if start not in state:
            found = visit(start)
            if found:
                return found
    return None


def _is_private(name: str) -> bool:
    return name.startswith('_') and not (name.startswith('__') and name.endswith('__'))  # `__all__` is public


def _private_crossings(imports: List[Import]) -> List[str]:
    # `_compat` is the one module made to be imported from everywhere: its names are public
    return [f'{imp.importer}:{imp.line} imports {".".join([imp.target] + imp.names)}' for imp in imports
            if imp.target not in (imp.part, '_compat') and any(_is_private(n) for n in imp.names)]


def test_the_reader_sees_deferred_and_relative_imports(tmp_path):
    # the checks below are only as good as the reader: check it on the shapes the package uses
    imports = _all_imports()
    found = {(imp.importer, imp.target) for imp in imports}
    assert ('convert.py', 'hub') in found  # a top-level import
    assert ('cli.py', 'errors') in found
    assert ('models/attention_resnet.py', 'weights') in found
    assert ('models/attention_resnet.py', 'layers') in found
    assert any(imp.importer == 'commands/train.py' and imp.target == 'train' for imp in imports)  # deferred
    assert ('__init__.py', 'layers') in found  # `from .layers import ...`
    assert _cycle({'a': {'b'}, 'b': {'c'}, 'c': {'a'}}) == ['a', 'b', 'c', 'a']
    assert _cycle({'a': {'b'}, 'b': {'c'}}) is None


def test_layers_import_nothing_above_them():
    above = [f'{imp.importer}:{imp.line} imports {imp.target}' for imp in _all_imports()
             if imp.part == 'layers' and imp.target not in LAYERS_FLOOR]
    assert not above, above


def test_the_loading_floor_imports_nothing_above_it():
    # errors/_compat/checkpoint -> layers -> weights -> models: the verified build must not need the models
    floor = {'errors': set(), '_compat': set(), 'checkpoint': {'errors', '_compat'},
             'weights': LAYERS_FLOOR | {'weights'}}
    wrong = [f'{imp.importer}:{imp.line} imports {imp.target}' for imp in _all_imports()
             if imp.part in floor and imp.target != imp.part and imp.target not in floor[imp.part]]
    assert not wrong, wrong


def test_no_cycle_between_top_level_parts():
    cycle = _cycle(_graph(_all_imports()))
    assert cycle is None, ' -> '.join(cycle)


def test_no_private_name_crosses_a_part():
    crossings = _private_crossings(_all_imports())
    assert not crossings, crossings


def test_the_private_name_check_catches_a_crossing():
    imports = [Import('insert/__init__.py', 'insert', 'models', ['attention_resnet', '_hand_final_relu_over'], 1),
               Import('models/x.py', 'models', 'models', ['_checks', 'check_image_batch'], 1),
               Import('weights/build.py', 'weights', '_compat', ['hf_split'], 1),
               Import('detection.py', 'detection', 'tasks', ['detection', '__all__'], 1)]
    assert _private_crossings(imports) == ['insert/__init__.py:1 imports models.attention_resnet._hand_final_relu_over']


def _private_library_imports() -> List[str]:
    """Imports of timm / huggingface_hub modules or names that start with `_`, outside `_compat.py`."""
    found = []
    for path in sorted(PACKAGE.rglob('*.py')):
        if path.name == '_compat.py' and path.parent == PACKAGE:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding='utf-8'))):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                dotted = node.module.split('.') + [alias.name for alias in node.names]
            elif isinstance(node, ast.Import):
                dotted = [part for alias in node.names for part in alias.name.split('.')]
            else:
                continue
            if dotted[0] in ('timm', 'huggingface_hub') and any(_is_private(p) for p in dotted):
                found.append(f'{path.relative_to(PACKAGE)}:{node.lineno} imports {".".join(dotted)}')
    return found


def test_timm_and_huggingface_hub_private_names_only_in_compat():
    assert _private_library_imports() == []

""" The test suite's own rules: no test module imports another (shared fixtures live in conftest.py, shared
helpers in modules without the test_ prefix), and the slow tests are marked so `make test-fast` can leave them out. """
import ast
from pathlib import Path

TESTS = Path(__file__).parent


def _imported_modules(path: Path):
    for node in ast.walk(ast.parse(path.read_text(encoding='utf-8'))):
        if isinstance(node, ast.Import):
            yield from (alias.name.split('.')[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module.split('.')[0]


def test_no_test_module_imports_another():
    test_modules = {path.stem for path in TESTS.glob('test_*.py')}
    crossings = [f'{path.name} imports {name}' for path in sorted(TESTS.glob('*.py'))
                 for name in _imported_modules(path) if name in test_modules]
    assert crossings == []


def test_subprocess_and_compile_tests_are_marked_slow():
    unmarked = []
    for path in sorted(TESTS.glob('test_*.py')):
        source = path.read_text(encoding='utf-8')
        if 'pytestmark = pytest.mark.slow' in source:
            continue
        for node in ast.parse(source).body:
            if not (isinstance(node, ast.FunctionDef) and node.name.startswith('test_')):
                continue
            body = ast.get_source_segment(source, node)
            marked = any('mark.slow' in ast.get_source_segment(source, d) for d in node.decorator_list)
            if any(call in body for call in ('subprocess.', 'torch.compile(', 'torchrun')) and not marked:
                unmarked.append(f'{path.name}::{node.name}')
    assert unmarked == []

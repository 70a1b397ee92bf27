""" The repository's scripts/ as modules, for the tests that call their main() in-process. """
import importlib.util
from pathlib import Path
from types import ModuleType

SCRIPTS = Path(__file__).resolve().parents[1] / 'scripts'


def load_script(name: str) -> ModuleType:
    """scripts/NAME.py, loaded fresh."""
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f'{name}.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module

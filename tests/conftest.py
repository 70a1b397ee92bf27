import os

import pytest
import torch

# two CI cores: `make test` runs two pytest-xdist workers, each with one intra-op thread (no oversubscription);
# a plain `pytest` run in one process uses both cores
_DEFAULT_THREADS = '1' if os.environ.get('PYTEST_XDIST_WORKER') else '2'
torch.set_num_threads(int(os.environ.get('BAM_MODELS_TEST_THREADS', _DEFAULT_THREADS)))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_configure(config):
    config.addinivalue_line('markers', 'slow: starts subprocesses, compiles, or takes over ~10 s')

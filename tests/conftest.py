import os
import sys
from pathlib import Path

import huggingface_hub.constants as hf_constants
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # the helper modules beside the tests
from _hub_server import LocalHub  # noqa: E402
from train_helpers import make_digits_folder  # noqa: E402

from bam_models.weights.manifest import PACKAGED_MANIFEST  # noqa: E402

# two CI cores: `make test` runs two pytest-xdist workers, each with one intra-op thread (no oversubscription);
# a plain `pytest` run in one process uses both cores
_DEFAULT_THREADS = '1' if os.environ.get('PYTEST_XDIST_WORKER') else '2'
torch.set_num_threads(int(os.environ.get('BAM_MODELS_TEST_THREADS', _DEFAULT_THREADS)))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A local Hub, a private HF cache and a private copy of the manifest, all wired in for this test."""
    with LocalHub(tmp_path / 'hub') as server:
        # huggingface_hub reads these at import; the subprocess test covers the environment variables themselves
        monkeypatch.setattr(hf_constants, 'ENDPOINT', server.endpoint)
        monkeypatch.setattr(hf_constants, 'HUGGINGFACE_CO_URL_TEMPLATE',
                            server.endpoint + '/{repo_id}/resolve/{revision}/{filename}')
        monkeypatch.setattr(hf_constants, 'HF_HUB_CACHE', str(tmp_path / 'hf_cache'))
        monkeypatch.setattr(hf_constants, 'HF_HUB_OFFLINE', False)
        manifest = tmp_path / 'manifest.json'
        manifest.write_text(PACKAGED_MANIFEST.read_text())
        monkeypatch.setenv('BAM_MODELS_MANIFEST', str(manifest))
        server.manifest = manifest
        yield server


@pytest.fixture(scope='module')
def tiny_data(tmp_path_factory):
    """A small digits image folder (train/ and val/ of class folders), shared by the tests of one module."""
    return make_digits_folder(tmp_path_factory.mktemp('digits_folder'))


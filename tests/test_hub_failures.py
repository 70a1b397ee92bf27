""" Hub endpoints that misbehave: every load fails within the download budget with one PretrainedWeightsError
and leaves no partial file in the cache; a damaged cached copy of an unverified file is evicted. """
import socket
import threading
import time
import warnings
from pathlib import Path

import huggingface_hub.constants as hf_constants
import pytest
import timm

import bam_models  # noqa: F401
from bam_models.hub import PretrainedWeightsError, UnverifiedWeightsWarning
from bam_models.weights.manifest import PACKAGED_MANIFEST


TRUNK = 'resnet18_bam.tv_in1k'  # a manifest entry on timm/resnet18.tv_in1k
BODY_SIZE = 1 << 20
LIFETIME = 30.0  # seconds after which a test server stops on its own


class MisbehavingHub:
    """A Hub endpoint on 127.0.0.1 that answers HEAD correctly and then, per `mode`, fails the download:

    'close': sends half the body and closes; 'stall': sends some bytes, then nothing; 'trickle': one byte every
    0.2 s (each read stays under any read timeout); 'silent': accepts connections and never answers."""

    def __init__(self, mode: str):
        self.mode, self.requests, self.stop = mode, [], threading.Event()
        self.sock = socket.create_server(('127.0.0.1', 0))
        self.sock.settimeout(0.1)
        self.endpoint = f'http://127.0.0.1:{self.sock.getsockname()[1]}'
        self.thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self):
        end = time.monotonic() + LIFETIME
        while not self.stop.is_set() and time.monotonic() < end:
            try:
                conn, _ = self.sock.accept()
            except socket.timeout:
                continue
            threading.Thread(target=self._answer, args=(conn, end), daemon=True).start()

    def _wait(self, seconds: float, end: float) -> bool:
        """Sleep; False once the server is stopping."""
        return not self.stop.wait(min(seconds, max(0.0, end - time.monotonic()))) and time.monotonic() < end

    def _answer(self, conn: socket.socket, end: float):
        with conn:
            conn.settimeout(1.0)
            try:
                request = conn.recv(65536).decode('latin-1')
            except OSError:
                return
            self.requests.append(request.split('\r\n')[0])
            if self.mode == 'silent' or not request:
                while self._wait(0.1, end):
                    pass
                return
            headers = (f'HTTP/1.1 200 OK\r\nX-Repo-Commit: {"a" * 40}\r\nETag: "{"b" * 64}"\r\n'
                       f'Content-Length: {BODY_SIZE}\r\nConnection: close\r\n\r\n').encode()
            try:
                conn.sendall(headers)
                if request.startswith('HEAD'):
                    return
                if self.mode == 'close':
                    conn.sendall(b'\0' * (BODY_SIZE // 2))
                elif self.mode == 'stall':
                    conn.sendall(b'\0' * 1000)
                    while self._wait(0.1, end):
                        pass
                elif self.mode == 'trickle':
                    while self._wait(0.2, end):
                        conn.sendall(b'\0')
            except OSError:
                pass

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(timeout=5)
        self.sock.close()


@pytest.fixture
def limits(monkeypatch, tmp_path):
    monkeypatch.setenv('BAM_MODELS_DOWNLOAD_TIMEOUT', '1')
    monkeypatch.setenv('BAM_MODELS_DOWNLOAD_BUDGET', '3')
    monkeypatch.setenv('BAM_MODELS_MANIFEST', str(PACKAGED_MANIFEST))
    monkeypatch.setattr(hf_constants, 'HF_HUB_CACHE', str(tmp_path / 'hf_cache'))
    monkeypatch.setattr(hf_constants, 'HF_HUB_OFFLINE', False)
    return tmp_path / 'hf_cache'


@pytest.mark.parametrize('mode', ['close', 'stall', 'trickle', 'silent'])
def test_misbehaving_endpoint_fails_within_the_budget(limits, monkeypatch, mode):
    with MisbehavingHub(mode) as server:
        monkeypatch.setattr(hf_constants, 'ENDPOINT', server.endpoint)
        monkeypatch.setattr(hf_constants, 'HUGGINGFACE_CO_URL_TEMPLATE',
                            server.endpoint + '/{repo_id}/resolve/{revision}/{filename}')
        start = time.monotonic()
        with warnings.catch_warnings(), pytest.raises(PretrainedWeightsError) as error:
            warnings.simplefilter('ignore', UnverifiedWeightsWarning)
            timm.create_model(TRUNK, pretrained=True)
        took = time.monotonic() - start
    message = str(error.value)
    assert message.startswith(f'cannot load pretrained weights for {TRUNK} (repo timm/resnet18.tv_in1k'), message
    assert '\n' not in message and ('3 s budget' in message or 'could not be reached' in message), message
    # the budget (3 s) plus at most one of huggingface_hub's back-off sleeps (8 s), not minutes
    assert took < 12, took
    assert server.requests, 'the endpoint was never asked'
    leftovers = [p for p in limits.rglob('*') if p.is_file() and p.parent.name in ('blobs', 'snapshots')
                 or p.name.endswith('.incomplete')]
    assert not leftovers, leftovers


def test_budget_and_timeout_must_be_positive(limits, monkeypatch):
    monkeypatch.setenv('BAM_MODELS_DOWNLOAD_BUDGET', 'soon')
    with pytest.raises(PretrainedWeightsError, match=r"BAM_MODELS_DOWNLOAD_BUDGET='soon' is not a positive number"):
        timm.create_model(TRUNK, pretrained=True)


def test_damaged_cached_copy_of_an_unverified_file_is_evicted(hub, tmp_path):
    model = timm.create_model('resnet18_bam', num_classes=3)
    timm.models.save_for_hf(model, tmp_path / 'repo', safe_serialization=True)
    hub.commit('someone/unverified', tmp_path / 'repo')
    name = 'hf-hub:someone/unverified'
    with pytest.warns(UnverifiedWeightsWarning):
        timm.create_model(name, pretrained=True)
    blob = next(p for p in Path(hf_constants.HF_HUB_CACHE).rglob('blobs/*')
                if p.stat().st_size == (tmp_path / 'repo' / 'model.safetensors').stat().st_size)
    blob.write_bytes(blob.read_bytes()[:1000])  # a damaged copy: an interrupted copy, a full disk
    with pytest.warns(UnverifiedWeightsWarning), pytest.raises(PretrainedWeightsError, match='removed from the cache'):
        timm.create_model(name, pretrained=True)
    assert not blob.exists()
    with pytest.warns(UnverifiedWeightsWarning):
        reloaded = timm.create_model(name, pretrained=True)
    assert reloaded.fc.out_features == 3

""" Bounded Hub downloads: every request of a bam_models load has connect/read timeouts and the whole load a
total time budget, so a Hub endpoint that stalls, trickles or never answers fails in bounded time.

huggingface_hub retries on its own: metadata requests up to 6 times with a fixed 60 s timeout once the file is
not cached, and a body download resumes without end as long as each attempt receives some bytes. Neither its
`HF_HUB_ETAG_TIMEOUT` nor `HF_HUB_DOWNLOAD_TIMEOUT` bounds that loop. Inside `bounded_downloads()` two event
hooks on huggingface_hub's HTTP client (installed through its public `set_client_factory`, inert outside the
context) cap every request's timeouts at `BAM_MODELS_DOWNLOAD_TIMEOUT` and at the time left, and stop any
request or body chunk once `BAM_MODELS_DOWNLOAD_BUDGET` has run out, with a `PretrainedWeightsError`; a host
that gave no answer to a request (refused, or silent past the connect timeout) is not asked again in the same
load, so an unreachable Hub fails within one connect timeout instead of huggingface_hub's five retries.
huggingface_hub then removes its temporary `.incomplete` file as on any failed download.

`describe_hub_error` is the one translation of a failed Hub download into "what went wrong; what to do", used
by the verified build and by `bam_models.hub.create_model_from_name` alike.
"""
import os
import threading
import time
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Iterator, Optional, Set, Tuple

from huggingface_hub import constants as hf_constants
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from bam_models._compat import current_hf_client_factory
from bam_models.errors import PretrainedWeightsError

try:
    import httpx2 as _httpx  # huggingface_hub >= 2
except ImportError:  # pragma: no cover - huggingface_hub 1.x
    import httpx as _httpx

__all__ = [
    'BUDGET_ENV', 'TIMEOUT_ENV', 'TRANSPORT_ERRORS', 'bounded_downloads', 'describe_failure', 'describe_hub_error',
    'download_limits',
]

TIMEOUT_ENV = 'BAM_MODELS_DOWNLOAD_TIMEOUT'
BUDGET_ENV = 'BAM_MODELS_DOWNLOAD_BUDGET'
DEFAULT_TIMEOUT = 10.0  # seconds to connect, and between two received bytes
DEFAULT_BUDGET = 100.0  # seconds for everything one model load downloads, retries included

# what a failed transfer raises out of huggingface_hub once its own retries give up
TRANSPORT_ERRORS = (OSError, _httpx.HTTPError, _httpx.StreamError)


def describe_failure(error: BaseException) -> str:
    """'Type: first line of the message', short enough for a one-line error."""
    lines = str(error).splitlines()
    return f"{type(error).__name__}: {lines[0][:200]}" if lines else type(error).__name__


def describe_hub_error(
        error: BaseException,
        repo_id: Optional[str] = None,
        filename: Optional[str] = None,
        revision: Optional[str] = None,
        cache_dir=None,
) -> Optional[Tuple[str, str]]:
    """(what went wrong, what to do) for a failed huggingface_hub download; None for any other error."""
    repo = f'repository {repo_id}' if repo_id else 'the Hub repository'
    if isinstance(error, (LocalEntryNotFoundError, OfflineModeIsEnabled)):  # before OSError: both are one
        cache = cache_dir or hf_constants.HF_HUB_CACHE
        if hf_constants.is_offline_mode():
            return (f"HF_HUB_OFFLINE is set and the file is not in the cache ({cache})",
                    "load it once with network access (same cache_dir / HF_HOME), or unset HF_HUB_OFFLINE")
        return (f"the Hub could not be reached at {hf_constants.ENDPOINT} and the file is not in the cache ({cache})",
                "check the network or HF_ENDPOINT, or fill the cache where the Hub is reachable")
    if isinstance(error, RepositoryNotFoundError):
        return (f"{repo} does not exist on {hf_constants.ENDPOINT} (or needs a token)",
                "check the repo id, HF_ENDPOINT, and HF_TOKEN for private repos")
    if isinstance(error, RevisionNotFoundError):
        return (f"revision {revision or '(the one asked for)'} does not exist in {repo_id or repo}",
                "fix the revision (a manifest entry's pinned one is recorded by `bam-models publish --push`)")
    if isinstance(error, EntryNotFoundError):
        return (f"{repo_id or repo} has no file {filename or '(the one asked for)'} at this revision (404)",
                "publish it with `bam-models publish ... --push`, fix the manifest entry, or name a repo with "
                "a timm config.json and model.safetensors")
    if isinstance(error, HfHubHTTPError):
        return f"the Hub answered {describe_failure(error)}", "retry later or check HF_ENDPOINT"
    if isinstance(error, TRANSPORT_ERRORS):
        return (f"the download failed ({describe_failure(error)})",
                "retry later, check the network and HF_ENDPOINT; nothing partial was kept in the cache")
    return None


def _seconds(env: str, default: float) -> float:
    value = os.environ.get(env)
    if not value:
        return default
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise PretrainedWeightsError(f"{env}={value!r} is not a positive number of seconds; set it to e.g. {default:g}")
    return seconds


def download_limits() -> 'tuple[float, float]':
    """(per-request timeout, total budget) in seconds, from the environment or the defaults."""
    return _seconds(TIMEOUT_ENV, DEFAULT_TIMEOUT), _seconds(BUDGET_ENV, DEFAULT_BUDGET)


@dataclass
class _Budget:
    timeout: float
    budget: float
    deadline: float
    # hosts whose last request got no response (connection refused or timed out): huggingface_hub retries
    # those 5 times with 1-8 s sleeps (28 s for a refused connection), which one load does not wait for
    unanswered: Set[str] = field(default_factory=set)

    def refuse_unreachable(self, url) -> None:
        host = url.host
        if host in self.unanswered:
            raise PretrainedWeightsError(
                f"the Hub could not be reached at {url.scheme}://{host}{_port(url)} (no answer to the first "
                f"request, within the {self.timeout:g} s connect timeout); check the network and HF_ENDPOINT, set "
                f"HF_HUB_OFFLINE=1 to use only the cache, or raise {TIMEOUT_ENV}")
        self.unanswered.add(host)

    def time_left(self, url) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise PretrainedWeightsError(
                f"downloading from {url} did not finish within the {self.budget:g} s budget (the Hub endpoint "
                f"stalls or keeps failing); retry later, check HF_ENDPOINT and the network, or raise {BUDGET_ENV}")
        return left


_ACTIVE: ContextVar[Optional[_Budget]] = ContextVar('bam_models_download_budget', default=None)


class _BudgetedStream(_httpx.SyncByteStream):
    """A response body that stops once the budget is spent, even if bytes keep trickling in."""

    def __init__(self, stream, budget: _Budget, url):
        self._stream, self._budget, self._url = stream, budget, url

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self._stream:
            self._budget.time_left(self._url)
            yield chunk

    def close(self) -> None:
        self._stream.close()

    def __getattr__(self, name):  # e.g. `elapsed`, which the client's own stream wrapper records
        return getattr(self._stream, name)


def _port(url) -> str:
    return f':{url.port}' if url.port else ''


def _limit_request(request) -> None:
    budget = _ACTIVE.get()
    if budget is None:
        return
    budget.refuse_unreachable(request.url)
    cap = min(budget.timeout, budget.time_left(request.url))
    timeouts = request.extensions.get('timeout') or {}
    request.extensions['timeout'] = {
        kind: cap if timeouts.get(kind) is None else min(timeouts[kind], cap)
        for kind in ('connect', 'read', 'write', 'pool')}


def _limit_response(response) -> None:
    budget = _ACTIVE.get()
    if budget is not None:
        budget.unanswered.discard(response.request.url.host)
        response.stream = _BudgetedStream(response.stream, budget, response.request.url)


_INSTALL_LOCK = threading.Lock()
_installed = False


def _install_hooks() -> None:
    """Add the hooks to every client huggingface_hub creates from now on (it recreates its client on errors)."""
    global _installed
    with _INSTALL_LOCK:
        if _installed:
            return
        from huggingface_hub import set_client_factory
        # wrap whatever factory is in use (the user's own, with proxies or certificates, or the default)
        previous = current_hf_client_factory()

        def factory():
            client = previous()
            hooks = client.event_hooks
            client.event_hooks = {
                'request': [*hooks.get('request', []), _limit_request],
                'response': [*hooks.get('response', []), _limit_response],
            }
            return client

        set_client_factory(factory)
        _installed = True


@contextmanager
def bounded_downloads() -> Iterator[None]:
    """Every huggingface_hub download in this context (this thread) runs under the timeouts and one budget.

    Nested contexts share the outer budget: one model load, config.json and weights together, has one."""
    if _ACTIVE.get() is not None:
        yield
        return
    timeout, budget = download_limits()
    _install_hooks()
    token = _ACTIVE.set(_Budget(timeout, budget, time.monotonic() + budget))
    try:
        yield
    finally:
        _ACTIVE.reset(token)

""" The package's one error hierarchy.

Every expected failure (a user's mistake, a bad file, an unreachable Hub) raises a `BamModelsError`. Each
subclass also keeps the builtin base that callers caught before (as huggingface_hub's errors do), so
`except ValueError` around a config load keeps working. The CLI prints any `BamModelsError` as one line,
`error: <what was wrong>; <what to do>`, and exits with `exit_code`; `--debug` shows the traceback instead.
`did_you_mean` is the one way a message suggests close spellings; `excerpt` the one way a message quotes a
value a user or a file gave (shortened, so a huge value cannot make a huge message).
"""
import difflib
import reprlib
from typing import Any, Iterable

__all__ = [
    'BamModelsError', 'CheckpointError', 'ConfigError', 'ConversionError', 'ExportError', 'FusedGatingError',
    'ManifestError', 'NonFiniteLossError', 'OutputExistsError', 'PretrainedWeightsError', 'UsageError',
    'count', 'did_you_mean', 'excerpt',
]


class BamModelsError(Exception):
    """Base class of every error bam_models raises on purpose; the message says what to do."""
    exit_code = 2


class UsageError(BamModelsError, ValueError):
    """A command or function was called with arguments that cannot work (missing file, unknown name...)."""


class CheckpointError(BamModelsError, ValueError):
    """A weights file is missing, unreadable, holds bad values or does not fit the model; nothing was loaded."""


class ConfigError(BamModelsError, ValueError):
    """A training configuration that cannot run; raised before any work starts."""


class ConversionError(BamModelsError, ValueError):
    """A checkpoint could not be converted to a zoo model's layout; nothing was written."""


class ManifestError(BamModelsError, ValueError):
    """The weights manifest is missing, not valid JSON, inconsistent, or lacks the entry asked for."""


class OutputExistsError(BamModelsError, FileExistsError):
    """A command that writes a fresh folder (publish, insert, convert) was given one that already holds files."""


class ExportError(BamModelsError, RuntimeError):
    """An exported file does not compute what the PyTorch model computes."""


class FusedGatingError(BamModelsError, RuntimeError):
    """Something the fused BAM/CBAM gating cannot do (double backward); the reference formulas can."""


class PretrainedWeightsError(BamModelsError, RuntimeError):
    """Pretrained weights could not be loaded; nothing was loaded into the model."""


class NonFiniteLossError(BamModelsError, RuntimeError):
    """Training stopped because the loss became NaN or infinite."""
    exit_code = 3


def did_you_mean(word: str, options: Iterable[str], n: int = 3, cutoff: float = 0.6) -> str:
    """'did you mean a or b?' with the closest spellings of `word` among `options`; '' when none is close."""
    close = difflib.get_close_matches(word, list(options), n=n, cutoff=cutoff)
    return f"did you mean {' or '.join(close)}?" if close else ''


_EXCERPT = reprlib.Repr()
_EXCERPT.maxlevel, _EXCERPT.maxstring, _EXCERPT.maxother = 3, 60, 60
_EXCERPT.maxlist = _EXCERPT.maxtuple = _EXCERPT.maxdict = _EXCERPT.maxset = 4
_EXCERPT_CHARS = 80


def excerpt(value: Any, limit: int = _EXCERPT_CHARS) -> str:
    """`repr(value)` for a message, at most `limit` characters: nested and long values are cut ('...'), and
    the cut is made while the repr is built, so a value of millions of items costs no more than a short one."""
    try:
        text = _EXCERPT.repr(value)
    except ValueError:  # an int of more digits than Python converts to text
        text = f'<{type(value).__name__} too long to print>'
    return text if len(text) <= limit else text[:limit - 3] + '...'


def count(number: int, noun: str, plural: str = '') -> str:
    """'1 key', '3 keys': a count with its noun in the right number (`plural` where it is not noun + 's')."""
    return f"{number} {noun if number == 1 else plural or noun + 's'}"

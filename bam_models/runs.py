""" What every trainer shares about a run: its folder, checkpoints, resume policy and precision.

One safety story for `bam-models train` and `bam-models detect-train`:

- A run folder holds one run: starting a run in a folder that already holds one is refused unless the run
  resumes it or the caller asks to overwrite it (then the earlier run's files are removed first).
- A lock file (`.lock`, created with O_EXCL, holding the pid) keeps a second run out of a folder in use; a
  lock left by a process that no longer exists (a killed run) is taken over.
- Every checkpoint and weights file is written atomically (`atomic_write`: a `.tmp` next to it, fsync, rename)
  with the permissions of any new file; a failed write (a full disk) removes the `.tmp` and leaves the
  previous file as it was.
- Run checkpoints are read with `weights_only=True` (no pickled code runs), and a file that is not a run
  checkpoint of this job (a best.pth, a truncated file, another architecture or config) gives one clear line.
- RNG states of every process are saved with the checkpoint, so a run resumed mid-epoch replays exactly.
- One resume policy (`read_resume`): a run continues only with the config it was written with; the keys that
  may differ are those that say where and how visibly it runs (paths, device, workers), never what it computes,
  so what a run records is what it ran. `--resume auto` (`resolve_resume`) continues OUTPUT/last.pth when the
  folder has one and starts the run when it has none, so one command serves a first start and every restart
  (torchrun's elastic restarts). Under torch.distributed only process 0 reads the checkpoint and
  `share_resume` hands it to the others: on several machines the run folder exists on process 0's alone.
- `autocast_for` is the one mixed-precision switch of training, evaluation and the GPU checks.
"""
import errno
import os
import random
import shutil
import signal
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, ContextManager, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from bam_models.checkpoint import check_storage, describe_mismatch, key_mismatch
from bam_models.errors import CheckpointError, ConfigError, UsageError, count

__all__ = ['AMP_MODES', 'BEST', 'LAST', 'Checkpointer', 'RunFolderLock', 'atomic_save', 'atomic_write',
           'autocast_for', 'config_changes', 'flat_config', 'prepare_run_folder', 'read_resume',
           'read_run_checkpoint', 'resolve_resume', 'rng_state', 'seed_epoch', 'set_rng_state', 'share_resume',
           'StopRequest']

LAST, BEST = 'last.pth', 'best.pth'
LOCK = '.lock'
RUN_FILES = (LAST, BEST, 'log.jsonl', 'summary.json', 'hub')  # what makes a folder hold a run
PathLike = Union[str, Path]


# ---------------------------------------------------------------------------------------------- folder

def check_output_folder(output: PathLike) -> None:
    """Refuses an output folder that is a file or lies under one, before anything is written."""
    output = Path(output)
    blocking = next((p for p in (output, *output.parents) if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise UsageError(f"output folder {output} cannot be created: {blocking} is a file; choose another "
                         f"output folder (train.output / --out)")


def prepare_run_folder(output: PathLike, *, resume: bool, overwrite: bool) -> None:
    """Refuses to start a new run over an earlier one unless `overwrite` (which removes the earlier files)."""
    output = Path(output)
    if resume and overwrite:
        raise UsageError("--resume and --overwrite contradict each other; resume to continue the run in "
                         f"{output}, or overwrite to replace it")
    existing = [name for name in RUN_FILES if _holds_results(output / name)]
    if not existing or resume:
        return
    if not overwrite:
        how = 'continue it with --resume auto, ' if LAST in existing else f'it has no {LAST} to continue from; '
        raise UsageError(f"{output} already holds a run ({', '.join(existing)}); {how}replace it with --overwrite, "
                         f"or choose another output folder")
    for name in existing:
        path = output / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()


def _holds_results(path: Path) -> bool:
    """An empty log.jsonl is all a run stopped in its first epoch leaves: nothing would be lost."""
    return path.exists() and not (path.name == 'log.jsonl' and path.stat().st_size == 0)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class RunFolderLock:
    """An exclusive claim on a run folder: OUTPUT/.lock holds the pid of the run using it."""

    def __init__(self, folder: PathLike):
        self.path = Path(folder) / LOCK
        self.held = False

    def _holder(self) -> Optional[int]:
        try:
            return int(self.path.read_text().strip() or 0) or None
        except (FileNotFoundError, ValueError):
            return None

    def acquire(self) -> 'RunFolderLock':
        check_output_folder(self.path.parent)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):  # a stale lock is removed, then created again; another run may win that race
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                pid = self._holder()
                if pid is not None and _pid_alive(pid):
                    raise UsageError(f"{self.path.parent} is in use by another run (pid {pid}, lock file "
                                     f"{self.path}); wait for it to end or choose another output folder") from None
                self.path.unlink(missing_ok=True)  # left by a run that was killed: take it over
                continue
            with os.fdopen(fd, 'w') as f:
                f.write(f'{os.getpid()}\n')
            self.held = True
            return self
        raise UsageError(f"could not lock {self.path.parent}: other runs keep claiming it; choose another output "
                         f"folder")

    def release(self) -> None:
        if self.held and self._holder() == os.getpid():
            self.path.unlink(missing_ok=True)
        self.held = False

    def __enter__(self) -> 'RunFolderLock':
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


# ---------------------------------------------------------------------------------------------- files

def atomic_write(path: PathLike, write: Callable[[Path], None], then: str = 'continue with --resume') -> None:
    """`write(tmp)` writes the file at `tmp`, a `.tmp` next to `path`, which is then synced and renamed:
    `path` holds either the old or the new file, never a part. The file gets the permissions of any new file
    (0666 less the umask) also where `write` makes it private (safetensors writes through a 0600 temporary
    file). A failed write (a full disk) removes the `.tmp` and raises CheckpointError, ending with `then`."""
    path = Path(path)
    tmp = path.with_name(path.name + '.tmp')
    try:
        tmp.unlink(missing_ok=True)  # a `.tmp` left by a killed write keeps its own mode
        with open(tmp, 'wb'):  # created as an ordinary new file is, whatever `write` does with it
            mode = os.stat(tmp).st_mode & 0o777
        write(tmp)
        os.chmod(tmp, mode)
        with open(tmp, 'rb+') as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            reason = 'the disk is full' if e.errno == errno.ENOSPC else (e.strerror or str(e))
            kept = f'{path} still holds the previous checkpoint' if path.exists() else f'{path} was not written'
            raise CheckpointError(f"could not write {path} ({reason}); {kept}; free space or fix the folder, "
                                  f"then {then}") from None
        raise


def atomic_save(obj: Any, path: PathLike) -> None:
    """torch.save through `atomic_write`."""
    def write(tmp: Path) -> None:
        with open(tmp, 'wb') as f:
            torch.save(obj, f)
    atomic_write(path, write)


def read_run_checkpoint(path: PathLike, required: Sequence[str], what: str = '--resume') -> Dict[str, Any]:
    """A run checkpoint (last.pth) read with weights_only=True; a file that is not one raises CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what} {path} does not exist; pass a last.pth written by an earlier run")
    try:
        state = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:
        first = (str(e).splitlines() or [''])[0][:160]
        raise CheckpointError(f"{what} {path} could not be read ({type(e).__name__}: {first}): it is truncated "
                              f"(an interrupted or disk-full write) or not a torch file; resume from an intact "
                              f"last.pth or start again with --overwrite") from None
    check_storage(state, f'{what} {path}', fix='resume from an intact last.pth or start again with --overwrite')
    if isinstance(state, dict) and 'config' in state:
        _check_saved_config(state['config'], f'{what} {path}')
    missing = [key for key in required if not (isinstance(state, dict) and key in state)]
    if missing and isinstance(state, dict) and 'metrics' in state and 'state_dict' in state:
        raise CheckpointError(f"{what} {path} is a best-model file (weights only, no optimizer state); resume "
                              f"from the run's last.pth, or start a new run from these weights with "
                              f"model.checkpoint={path}")
    if missing:
        raise CheckpointError(f"{what} {path} is not a run checkpoint (it lacks {', '.join(missing)}); pass a "
                              f"last.pth written by an earlier run")
    return state


# far more than any run's config holds (about 70 keys); a pickle of shared references can mean 2**40 of them
MAX_CONFIG_VALUES, MAX_CONFIG_DEPTH = 10_000, 16


def _check_saved_config(config: Any, what: str) -> None:
    """A run checkpoint's config is a small tree of sections: one that spells out to more values or deeper
    nesting than any config has (a few bytes of shared references) is refused before it is compared."""
    stack, values = [(config, 0)], 0
    while stack:
        value, depth = stack.pop()
        values += 1
        if values > MAX_CONFIG_VALUES or depth > MAX_CONFIG_DEPTH:
            raise CheckpointError(f"{what} holds a config of more than {MAX_CONFIG_VALUES:,} values or "
                                  f"{MAX_CONFIG_DEPTH} levels, which no run writes (a damaged or crafted file); "
                                  f"resume from an intact last.pth or start again with --overwrite")
        children = value.values() if isinstance(value, dict) else value if isinstance(value, (list, tuple)) else ()
        stack.extend((child, depth + 1) for child in children)


def flat_config(config: Mapping[str, Any], prefix: str = '') -> Dict[str, Any]:
    """{'optim.lr': 0.1, ...}: nested sections joined with dots; a flat mapping comes back as it is."""
    flat: Dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, Mapping):
            flat.update(flat_config(value, f'{prefix}{key}.'))
        else:
            flat[f'{prefix}{key}'] = value
    return flat


def config_changes(saved: Mapping[str, Any], current: Mapping[str, Any], ignore: Sequence[str] = ()) -> List[str]:
    """'key: saved -> current' for every config key whose value differs (keys in `ignore` excepted)."""
    saved, current = flat_config(saved), flat_config(current)
    keys = [k for k in dict.fromkeys([*saved, *current]) if k not in ignore]
    return [f'{k}: {saved.get(k)!r} -> {current.get(k)!r}' for k in keys if saved.get(k) != current.get(k)]


def read_resume(path: PathLike, required: Sequence[str], config: Mapping[str, Any], free_keys: Sequence[str],
                restart_hint: str) -> Dict[str, Any]:
    """The run checkpoint to continue from. A `config` that differs from the one the checkpoint was written with
    (its 'config' entry) is refused, listing the keys, unless only `free_keys` differ; `restart_hint` says how
    to start a new run from these weights instead."""
    state = read_run_checkpoint(path, tuple(dict.fromkeys([*required, 'config'])))
    changes = config_changes(state['config'], config, free_keys)
    if changes:
        raise ConfigError(
            f"--resume {path} was written with another config, {count(len(changes), 'key differs', 'keys differ')} "
            f"({'; '.join(changes[:6])}"
            f"{'; ...' if len(changes) > 6 else ''}); resume with the run's own config, or {restart_hint}")
    return state


def is_main_process() -> bool:
    """Whether this process is rank 0 of its launch (torchrun sets RANK; a plain run is rank 0), readable before
    torch.distributed starts and after it ends: only rank 0 owns the run folder and speaks for the run."""
    return int(os.environ.get('RANK', '0')) == 0


def resolve_resume(resume: Optional[str], output: PathLike) -> Optional[str]:
    """The checkpoint a run continues from: `resume` as given; for 'auto', OUTPUT/last.pth when it exists, else
    None (the run starts: the first start of a job launched with auto, or a restart before an epoch ended)."""
    if resume != 'auto':
        return resume
    last = Path(output) / LAST
    return str(last) if last.exists() else None


def share_resume(path: Optional[str], state: Optional[Dict[str, Any]]) -> Tuple[Optional[str], Optional[Dict]]:
    """Process 0's resume checkpoint (its path and state, None for a new run) on every process (a collective
    call): the others never read the run folder, which only process 0 writes."""
    shared = [path, state]
    dist.broadcast_object_list(shared, src=0)
    return shared[0], shared[1]


def check_model_fits(state_dict: Dict[str, torch.Tensor], model: nn.Module, path: PathLike) -> None:
    mismatch = key_mismatch(state_dict, model)
    if mismatch:
        arch = getattr(model, 'pretrained_cfg', {}).get('architecture') or type(model).__name__
        raise CheckpointError(f"--resume {path} was written for another model than {arch}: "
                              f"{describe_mismatch(mismatch)}; resume with the config of that run")


# ---------------------------------------------------------------------------------------------- RNG

def rng_state() -> Dict[str, Any]:
    np_state = np.random.get_state(legacy=False)
    return dict(
        torch=torch.get_rng_state(), cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        numpy=dict(key=torch.from_numpy(np_state['state']['key'].astype(np.int64)), pos=np_state['state']['pos'],
                   has_gauss=np_state['has_gauss'], gauss=np_state['gauss']),
        python=random.getstate())


def seed_epoch(seed: int, epoch: int, rank: int) -> None:
    """Every epoch starts from RNG states that depend only on (seed, epoch, rank), so a resumed epoch replays."""
    epoch_seed = (seed * 1_000_003 + epoch * 1009 + rank) % (2 ** 31)
    random.seed(epoch_seed)
    np.random.seed(epoch_seed)
    torch.manual_seed(epoch_seed)


def set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state['torch'])
    if state['cuda'] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])
    np_state = state['numpy']
    np.random.set_state(dict(bit_generator='MT19937', state=dict(key=np_state['key'].numpy().astype(np.uint32),
                                                                   pos=np_state['pos']),
                             has_gauss=np_state['has_gauss'], gauss=np_state['gauss']))
    random.setstate(state['python'])


# ---------------------------------------------------------------------------------------------- precision

AMP_MODES = ('none', 'bf16', 'fp16', 'auto')  # auto: fp16 on CUDA, bf16 elsewhere
_AMP_DTYPES = {'bf16': torch.bfloat16, 'fp16': torch.float16}


def autocast_for(device: Union[str, torch.device], amp: str) -> ContextManager:
    """A fresh autocast context for `device` ('none': full precision, a context that does nothing)."""
    device = torch.device(device)
    if amp not in AMP_MODES:
        raise UsageError(f"amp must be one of {', '.join(AMP_MODES)}, got {amp!r}")
    if amp == 'none':
        return nullcontext()
    if amp == 'auto':
        amp = 'fp16' if device.type == 'cuda' else 'bf16'
    return torch.autocast(device_type=device.type, dtype=_AMP_DTYPES[amp])


# ---------------------------------------------------------------------------------------------- Ctrl-C and saver

class StopRequest:
    """Turns the first Ctrl-C (SIGINT) into a flag the training loop checks after each step."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc):
        signal.signal(signal.SIGINT, self._previous)


class Checkpointer:
    """Saves and restores everything a run needs to continue exactly: the objects with a state_dict (model,
    optimizer, scheduler, EMA, scaler), counters, the RNG state of every process and the config.

    `objects` maps checkpoint keys to those objects (None entries are saved as None). Only the main process
    writes; with `distributed`, `state()` gathers every process's RNG state (a collective call).
    """

    def __init__(self, output: PathLike, objects: Mapping[str, Any], *, is_main: bool = True,
                 distributed: bool = False, world: int = 1):
        self.output = Path(output)
        self.objects = dict(objects)
        self.is_main, self.distributed, self.world = is_main, distributed, world
        self.saved_epoch: Optional[int] = None  # finished epochs in OUTPUT/last.pth, None: none written

    @property
    def last(self) -> Path:
        return self.output / LAST

    def state(self, **meta: Any) -> Dict[str, Any]:
        rngs = [rng_state()]
        if self.distributed:
            rngs = [None] * self.world
            dist.all_gather_object(rngs, rng_state())
        objects = {key: obj.state_dict() if obj is not None else None for key, obj in self.objects.items()}
        return dict(objects, rng=rngs, **meta)

    def save_last(self, state: Dict[str, Any]) -> None:
        if self.is_main:
            atomic_save(state, self.last)
            self.saved_epoch = state.get('epoch')

    def save_file(self, obj: Dict[str, Any], name: str) -> None:
        if self.is_main:
            atomic_save(obj, self.output / name)

    def save_interrupted(self, state: Dict[str, Any], epoch: int, step: int) -> None:
        """The Ctrl-C save: the run continues from this very step with --resume."""
        self.save_last(state)
        if self.is_main:
            print(f"interrupted at epoch {epoch + 1}, step {step}: saved {self.last}; continue with --resume "
                  f"{self.last}")

    def describe_last(self) -> str:
        """What OUTPUT/last.pth holds, for messages after a failure (never names a file that does not exist)."""
        if self.saved_epoch is None or not self.last.exists():
            return 'no checkpoint was written yet (the first epoch did not finish)'
        return f'{self.last} still holds the state after epoch {self.saved_epoch}'

    def restore(self, state: Dict[str, Any], path: PathLike, model_key: str, model: nn.Module) -> None:
        """Loads every saved object; a checkpoint of another architecture fails before anything changes."""
        check_model_fits(state[model_key], model, path)
        for key, obj in self.objects.items():
            if obj is None or state.get(key) is None:
                continue
            try:
                obj.load_state_dict(state[key])
            except (KeyError, ValueError, RuntimeError) as e:
                raise CheckpointError(f"--resume {path}: its {key} state does not fit this run ({type(e).__name__}: "
                                      f"{str(e).splitlines()[0][:160]}); resume with the config of that run") from None
        self.saved_epoch = state.get('epoch')

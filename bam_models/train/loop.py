""" The epochs of a classification run: `train(config)` runs one job described by a `RunConfig` on one process
or under torchrun (DDP), writes `last.pth` / `best.pth` (atomically, every epoch), `log.jsonl`, `summary.json`,
and exports the best weights in Hub format to `OUTPUT/hub` (loadable with
`timm.create_model('local-dir:OUTPUT/hub', pretrained=True)`).

It reads as timm's train.py does: `check_config` and `build_run` (`build.py`), `train_one_epoch`, `evaluate`,
a `Checkpointer` (atomic saves, RNG state, resume, the Ctrl-C save; see `bam_models.runs`) and `export_best`.
Epochs are numbered from 1 everywhere: the console, `log.jsonl`, `summary.json`, `best.pth` and the model card.
"""
import hashlib
import json
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import timm
import torch
import torch.distributed as dist
import torch.nn as nn
from timm.utils import accuracy, dispatch_clip_grad
from tqdm import tqdm

from bam_models.checkpoint import describe_mismatch, key_mismatch, read_state_dict
from bam_models.errors import CheckpointError, NonFiniteLossError
from bam_models.hub import save_pretrained
from bam_models.runs import (
    BEST, Checkpointer, RunFolderLock, StopRequest, autocast_for, is_main_process, prepare_run_folder, read_resume,
    resolve_resume, seed_epoch, set_rng_state, share_resume)
from bam_models.train.build import Run, base_weights, build_run, check_config
from bam_models.train.config import RunConfig
from bam_models.train.data import dataset_name, start_epoch
from bam_models.train.plan import RunClock, describe_plan
from bam_models.train.readers import is_iterable

__all__ = ['RESUME_FREE_KEYS', 'evaluate', 'export_best', 'train', 'train_one_epoch']

# config keys that may differ on resume: they change where and how visibly a run runs, not what it computes
RESUME_FREE_KEYS = ('train.output', 'train.device', 'train.progress', 'train.export', 'data.workers',
                    'data.eval_batch_size', 'data.root')
RUN_STATE_KEYS = ('state_dict', 'optimizer', 'epoch', 'step_in_epoch', 'best', 'rng', 'config')


def _reduce(values: List[float], device, distributed: bool) -> List[float]:
    if not distributed:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


@dataclass
class EpochResult:
    loss: float  # mean over every process
    top1: float
    seen: float
    seconds: float
    step: int  # steps of this epoch done
    stopped: bool  # Ctrl-C: the epoch ended early at `step`


def _check_step(run: Run, loss: torch.Tensor, stop: StopRequest, epoch: int, step: int,
                checkpointer: Checkpointer) -> bool:
    """Raises on a non-finite loss; returns whether to stop. Under DDP every process decides together."""
    finite, stop_now = bool(torch.isfinite(loss).all()), stop.requested
    if run.distributed:
        flags = torch.tensor([float(not finite), float(stop_now)], device=run.device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        finite, stop_now = not flags[0].item(), bool(flags[1].item())
    if not finite:
        raise NonFiniteLossError(
            f"loss is not finite ({loss.item()}) at epoch {epoch + 1}, step {step + 1} of {run.steps_per_epoch}; "
            f"stopped without saving, {checkpointer.describe_last()}; lower optim.lr, set optim.clip_grad, or use "
            f"train.amp=none")
    return stop_now


def _optimizer_step(run: Run, loss: torch.Tensor) -> None:
    optim = run.cfg.optim
    run.optimizer.zero_grad(set_to_none=True)
    params = [p for p in run.model.parameters() if p.requires_grad]
    if run.scaler is not None:
        run.scaler(loss, run.optimizer, clip_grad=optim.clip_grad, clip_mode=optim.clip_mode, parameters=params)
        return
    loss.backward()
    if optim.clip_grad is not None:
        dispatch_clip_grad(params, optim.clip_grad, mode=optim.clip_mode)
    run.optimizer.step()


def train_one_epoch(run: Run, epoch: int, skip_steps: int, resume_rng: Optional[Dict[str, Any]],
                    stop: StopRequest, checkpointer: Checkpointer, clock: RunClock) -> EpochResult:
    """One epoch (0-based `epoch`) from step `skip_steps`, with the RNG of a resumed step restored; `clock`
    times its steps for the run's estimate."""
    cfg, steps = run.cfg, run.steps_per_epoch
    seed_epoch(cfg.train.seed, epoch, run.rank)
    start_epoch(run.train_loader, epoch, skip_steps * cfg.data.batch_size)
    batches = iter(run.train_loader)  # creating it draws the loader's base seed from the epoch's RNG
    if skip_steps and resume_rng is not None:
        set_rng_state(resume_rng)  # the RNG exactly as it was after the last finished step
    if run.scheduler is not None:
        run.scheduler.step_update(epoch * steps + skip_steps)
    run.train_model.train()
    loss_sum = correct = seen = 0.0
    started, step, stop_now = time.perf_counter(), skip_steps, False
    bar = tqdm(clock.batches(batches), desc=f'epoch {epoch + 1}/{cfg.schedule.epochs}', initial=skip_steps, total=steps,
               disable=not (run.is_main and cfg.train.progress), dynamic_ncols=True)
    for images, targets in bar:
        images, targets = images.to(run.device, non_blocking=True), targets.to(run.device, non_blocking=True)
        if cfg.model.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        hard_targets = targets
        if run.mixup is not None:
            images, targets = run.mixup(images, targets)
        with run.autocast():
            logits = run.train_model(images)
            loss = run.criterion(logits, targets)
        stop_now = _check_step(run, loss, stop, epoch, step, checkpointer)
        _optimizer_step(run, loss)
        step += 1
        if run.ema is not None:
            run.ema.update(run.model, step=epoch * steps + step)
        if run.scheduler is not None:
            run.scheduler.step_update(epoch * steps + step)
        loss_sum += loss.item() * hard_targets.numel()
        correct += (logits.argmax(-1) == hard_targets).sum().item()
        seen += hard_targets.numel()
        bar.set_postfix(loss=f'{loss_sum / seen:.4f}', acc=f'{100 * correct / seen:.1f}',
                        lr=f"{run.optimizer.param_groups[0]['lr']:.2e}",
                        img_s=f'{seen * run.world / (time.perf_counter() - started):.0f}', refresh=False)
        clock.step_done()
        if stop_now:
            break
    bar.close()
    clock.report()  # a first epoch shorter than the clock's window
    if stop_now:
        return EpochResult(0.0, 0.0, 0.0, 0.0, step, stopped=True)
    loss_sum, correct, seen = _reduce([loss_sum, correct, seen], run.device, run.distributed)
    return EpochResult(loss_sum / seen, 100 * correct / seen, seen, time.perf_counter() - started, step, stopped=False)


@torch.no_grad()
def evaluate(model: nn.Module, loader, device, amp: str = 'none', *, channels_last: bool = False,
             distributed: bool = False) -> Dict[str, float]:
    """Exact top-1/top-5/loss over the whole set (every process evaluates its own share, then sums)."""
    model.eval()
    criterion = nn.CrossEntropyLoss(reduction='sum')
    loss_sum = top1_sum = top5_sum = count = 0.0
    for images, targets in loader:
        images, targets = images.to(device), targets.to(device)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast_for(device, amp):
            logits = model(images)
        logits = logits.float()
        top1, top5 = accuracy(logits, targets, topk=(1, min(5, logits.shape[1])))
        loss_sum += criterion(logits, targets).item()
        top1_sum += top1.item() * targets.numel() / 100
        top5_sum += top5.item() * targets.numel() / 100
        count += targets.numel()
    loss_sum, top1_sum, top5_sum, count = _reduce([loss_sum, top1_sum, top5_sum, count], device, distributed)
    return dict(loss=loss_sum / count, top1=100 * top1_sum / count, top5=100 * top5_sum / count, count=int(count))


# ---------------------------------------------------------------------------------------------- export

def export_best(model: nn.Module, out_dir: str, metrics: Dict[str, Any], data_config: Dict[str, Any],
                label_names: Optional[List[str]] = None, base: Optional[str] = None) -> Path:
    """Writes the best weights as a Hub folder (model.safetensors, config.json in timm's format, model card)
    that `timm.create_model('local-dir:...', pretrained=True)` loads and `bam-models publish` uploads; `base` is
    what the run started from (`base_weights`), None for a run trained from scratch."""
    arch = model.pretrained_cfg.get('architecture')
    how = f'fine-tuned from {base}' if base else 'trained from scratch'
    save_pretrained(
        model, out_dir,
        metrics=[dict(dataset=metrics['dataset'], split='val', top1=metrics['top1'],
                      top5=metrics.get('top5'), input_size=data_config['input_size'][-1],
                      measured_by='this project', reference=f"bam-models train, best of epoch {metrics['epoch']}")],
        description=f"{arch} {how} with `bam-models train`.",
        data_config=data_config,
        model_config=dict(label_names=list(label_names)) if label_names else None,
        base_weights=base,
    )
    return Path(out_dir)


def _export_run(run: Run, output: Path, best: Dict[str, Any]) -> Path:
    """The best.pth weights in a fresh model (no frozen BN, no DDP/EMA wrappers), exported to OUTPUT/hub."""
    cfg = run.cfg
    state = read_state_dict(output / BEST, what='best.pth')
    model = timm.create_model(cfg.model.name, num_classes=cfg.model.num_classes or len(run.classes))
    # frozen BN (model.freeze) keeps no num_batches_tracked; everything else must match
    mismatch = key_mismatch(state, model, ignore=[k for k in model.state_dict() if k.endswith('num_batches_tracked')])
    if mismatch:
        raise CheckpointError(f"{output / BEST} does not fit {cfg.model.name}: {describe_mismatch(mismatch)}; "
                              f"the run wrote another model than its config names")
    model.load_state_dict(state, strict=False)
    metrics = dict(dataset=dataset_name(cfg.data.dataset), epoch=best['epoch'], top1=round(best['top1'], 3),
                   top5=round(best['top5'], 3))
    return export_best(model, str(output / 'hub'), metrics, run.data_config, label_names=run.classes,
                       base=base_weights(cfg))


# ---------------------------------------------------------------------------------------------- orchestration

def resume_state(cfg: RunConfig, path: str) -> Dict[str, Any]:
    """The run checkpoint to continue from, under the one resume policy (`bam_models.runs.read_resume`): only
    the keys in RESUME_FREE_KEYS may differ from the config it was written with."""
    return read_resume(path, RUN_STATE_KEYS, cfg.to_dict(), RESUME_FREE_KEYS,
                       f"start a new run from its weights with model.checkpoint={path} in another train.output")


def _open_log(output: Path, finished_epochs: int, resumed: bool, is_main: bool) -> List[Dict[str, Any]]:
    """The history so far; a resumed run drops the lines of epochs about to run again."""
    if not is_main:
        return []
    output.mkdir(parents=True, exist_ok=True)
    log_path = output / 'log.jsonl'
    kept = []
    if resumed and log_path.exists():
        kept = [line for line in log_path.read_text().splitlines() if json.loads(line)['epoch'] <= finished_epochs]
    log_path.write_text(''.join(line + '\n' for line in kept))
    return [json.loads(line) for line in kept]


def _weight_digests(run: Run) -> List[str]:
    """The sha256 of every process's parameters, in rank order (a collective call): DDP keeps the replicas equal,
    and last.pth records that it did. Buffers are left out: BatchNorm statistics are each process's own."""
    digest = hashlib.sha256()
    for param in run.model.parameters():
        digest.update(param.detach().cpu().contiguous().flatten().view(torch.uint8).numpy())
    digests = [digest.hexdigest()]
    if run.distributed:
        digests = [None] * run.world
        dist.all_gather_object(digests, digest.hexdigest())
    return digests


def _end_epoch(run: Run, checkpointer: Checkpointer, epoch: int, result: EpochResult,
               best: Optional[Dict[str, Any]], history: List[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
    """Validation, best.pth (when better), last.pth and the log line of a finished epoch; returns the best."""
    cfg, number = run.cfg, epoch + 1
    metrics = evaluate(run.eval_model, run.val_loader, run.device, cfg.train.amp,
                       channels_last=cfg.model.channels_last, distributed=run.distributed)
    is_best = best is None or metrics['top1'] > best['top1']
    record = dict(epoch=number, train_loss=result.loss, train_top1=result.top1,
                  lr=run.optimizer.param_groups[0]['lr'], val_loss=metrics['loss'], val_top1=metrics['top1'],
                  val_top5=metrics['top5'], val_images=metrics['count'], img_per_s=result.seen / result.seconds,
                  epoch_time_s=result.seconds)
    if is_best:
        best = dict(epoch=number, top1=metrics['top1'], top5=metrics['top5'], loss=metrics['loss'])
    state = checkpointer.state(epoch=number, step_in_epoch=0, best=best, config=cfg.to_dict(),
                               weight_digests=_weight_digests(run))
    if is_best:  # best before last: a kill in between re-runs this epoch and rewrites both
        checkpointer.save_file(dict(state_dict=run.eval_model.state_dict(), epoch=number, metrics=best,
                                    config=cfg.to_dict(), classes=run.classes, data_config=run.data_config), BEST)
    checkpointer.save_last(state)
    if run.is_main:
        with open(checkpointer.output / 'log.jsonl', 'a') as f:
            f.write(json.dumps(record) + '\n')
        history.append(record)
        if cfg.train.progress:
            tqdm.write(f"epoch {number}: train loss {record['train_loss']:.4f}, val top-1 {metrics['top1']:.2f} "
                       f"top-5 {metrics['top5']:.2f} loss {metrics['loss']:.4f}{' (best)' if is_best else ''}")
    return best


def _resume_point(run: Run, epoch: int, step: int) -> Tuple[int, str]:
    """The step a resumed epoch starts at, and why when it is not where the run stopped: a stream (an iterable
    dataset, which cannot start mid-epoch) resumes at the epoch's first step; the steps done of it run again, none
    is skipped."""
    if not step or not is_iterable(run.train_loader.dataset):
        return step, ''
    return 0, (f" ({run.cfg.data.dataset} is read as a stream, which resumes at an epoch boundary: the first "
               f"{step} steps of the epoch run again)")


def _fit(run: Run, checkpointer: Checkpointer, resumed: Optional[Dict[str, Any]],
         history: List[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
    """The epochs from where the run stands to the last; Ctrl-C saves the very step and re-raises."""
    start_epoch, start_step, best, resume_rng, why = 0, 0, None, None, ''
    if resumed is not None:
        start_epoch, start_step, best = resumed['epoch'], resumed['step_in_epoch'], resumed['best']
        resume_rng = resumed['rng'][run.rank] if run.rank < len(resumed['rng']) else None
        start_step, why = _resume_point(run, start_epoch, start_step)
    cfg, steps = run.cfg, run.steps_per_epoch
    if run.is_main:
        print(describe_plan(run, start_epoch, start_step) + why, flush=True)
    clock = RunClock(cfg.schedule.epochs * steps - start_epoch * steps - start_step, cfg.data.batch_size,
                     cfg.data.workers, enabled=run.is_main)
    with StopRequest() as stop:
        for epoch in range(start_epoch, cfg.schedule.epochs):
            first = epoch == start_epoch
            result = train_one_epoch(run, epoch, start_step if first else 0, resume_rng if first else None, stop,
                                     checkpointer, clock)
            if result.stopped:
                checkpointer.save_interrupted(checkpointer.state(
                    epoch=epoch, step_in_epoch=result.step, best=best, config=cfg.to_dict()), epoch, result.step)
                raise KeyboardInterrupt
            best = _end_epoch(run, checkpointer, epoch, result, best, history)
    return best


def train(cfg: RunConfig, resume: Optional[str] = None, overwrite: bool = False) -> Dict[str, Any]:
    """Runs the job; returns the summary (also written to OUTPUT/summary.json on rank 0).

    `resume` is a last.pth to continue from ('auto': OUTPUT/last.pth when there is one, else a new run); a folder
    that already holds a run is refused unless the run resumes it or `overwrite` replaces it; the folder is locked
    while the run lasts. Under torchrun only rank 0 reads the checkpoint and hands it to the others.
    """
    classes = check_config(cfg)
    output = Path(cfg.train.output)
    is_main = is_main_process()
    resume = resolve_resume(resume, output) if is_main else None  # the others get rank 0's state from it
    resumed = resume_state(cfg, resume) if resume else None
    started = time.perf_counter()
    with RunFolderLock(output) if is_main else nullcontext():
        if is_main:  # under the lock: --overwrite never deletes the files of a run that is still going
            prepare_run_folder(output, resume=resume is not None, overwrite=overwrite)
        run = build_run(cfg, classes)
        if run.distributed:
            resume, resumed = share_resume(resume, resumed)
        checkpointer = Checkpointer(output, dict(
            state_dict=run.model, optimizer=run.optimizer, scheduler=run.scheduler, state_dict_ema=run.ema,
            scaler=run.scaler), is_main=run.is_main, distributed=run.distributed, world=run.world)
        if resumed is not None:
            checkpointer.restore(resumed, resume, 'state_dict', run.model)
        history = _open_log(output, resumed['epoch'] if resumed else 0, resumed is not None, run.is_main)
        best = _fit(run, checkpointer, resumed, history)
        summary = dict(model=cfg.model.name, base_weights=base_weights(cfg), epochs=cfg.schedule.epochs, best=best,
                       final=history[-1] if history else None, train_time_s=time.perf_counter() - started,
                       processes=run.world, output=str(output))
        if run.is_main:
            if cfg.train.export and best is not None:
                summary['hub_dir'] = str(_export_run(run, output, best))
            (output / 'summary.json').write_text(json.dumps(summary, indent=2) + '\n')
    if run.distributed:
        dist.barrier()
    return summary

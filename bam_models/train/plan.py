""" What a run says about itself before and while it works: the plan, printed before the first step, and an
estimate of the whole run after its first steps, both from rank 0 and whether or not `train.progress` shows
bars. A run of the wrong size (the default 90 epochs at the model's 224 px, say) is visible within seconds, and
so is a run whose steps wait on the data loader rather than on the model.
"""
import time
from typing import Iterable, Iterator

from tqdm import tqdm

from bam_models.errors import count
from bam_models.train.config import DataConfig, ScheduleConfig
from bam_models.train.data import train_sample_count

__all__ = ['RunClock', 'describe_plan', 'format_duration']

DEFAULT_EPOCHS = ScheduleConfig().epochs
DEFAULT_INPUT_SIZE = DataConfig().input_size


def _parameters(count: int) -> str:
    return f'{count / 1e6:.2f} M' if count >= 100_000 else f'{count:,}'


def format_duration(seconds: float) -> str:
    """'45 s', '12 min 5 s', '3 h 20 min'."""
    seconds = round(seconds)
    if seconds < 60:
        return f'{seconds} s'
    if seconds < 3600:
        return f'{seconds // 60} min {seconds % 60} s'
    return f'{seconds // 3600} h {seconds % 3600 // 60} min'


def describe_plan(run, start_epoch: int = 0, start_step: int = 0) -> str:
    """One line: model and parameters, images per split and classes, input size, epochs, steps per epoch,
    device and output folder; for a resumed run, where it continues."""
    cfg = run.cfg
    params = list(run.model.parameters())
    trained = sum(p.numel() for p in params if p.requires_grad)
    epochs = cfg.schedule.epochs
    epochs_note = ' (the default; set schedule.epochs)' if epochs == DEFAULT_EPOCHS else ''
    size = 'x'.join(str(side) for side in run.data_config['input_size'])
    size_note = (f" ({cfg.model.name}'s default; set data.input_size)"
                 if cfg.data.input_size == DEFAULT_INPUT_SIZE else '')
    resumed = f'; resuming at epoch {start_epoch + 1}, step {start_step + 1}' if start_epoch or start_step else ''
    return (f"plan: {cfg.model.name}, {_parameters(sum(p.numel() for p in params))} parameters "
            f"({_parameters(trained)} trained); {train_sample_count(run.train_loader.dataset)} training and "
            f"{train_sample_count(run.val_loader.dataset)} validation images of {len(run.classes)} classes; "
            f"input {size}{size_note}; {count(epochs, 'epoch')}{epochs_note} of {count(run.steps_per_epoch, 'step')} "
            f"({count(cfg.data.batch_size, 'image')} x {count(run.world, 'process', 'processes')}); "
            f"device {run.device}; output {cfg.train.output}{resumed}")


class RunClock:
    """Times the first steps of a run (after `warmup` steps, which pay for lazy initialisation) until
    `window_steps` are timed or `window_seconds` have passed, then prints one estimate line: time per step, the
    share of it spent waiting for the next batch, what the loader delivered while waited on, and the time left."""

    def __init__(self, steps_left: int, batch_size: int, workers: int, *, enabled: bool = True, warmup: int = 1,
                 window_steps: int = 5, window_seconds: float = 20.0):
        self.steps_left, self.batch_size, self.workers = steps_left, batch_size, workers
        self.warmup, self.window_steps, self.window_seconds = warmup, window_steps, window_seconds
        self.done = not enabled
        self.seen = self.timed = 0
        self.waited = 0.0
        self.started = time.perf_counter()

    def batches(self, iterable: Iterable) -> Iterator:
        """The loader's batches, timing the wait for each one."""
        iterator = iter(iterable)
        while True:
            asked = time.perf_counter()
            try:
                batch = next(iterator)
            except StopIteration:
                return
            if self.seen >= self.warmup:
                self.waited += time.perf_counter() - asked
            yield batch

    def step_done(self) -> None:
        self.seen += 1
        if self.done:
            return
        if self.seen == self.warmup:
            self.started, self.waited = time.perf_counter(), 0.0
        elif self.seen > self.warmup:
            self.timed += 1
            if self.timed >= self.window_steps or time.perf_counter() - self.started >= self.window_seconds:
                self.report()

    def report(self) -> None:
        """Prints the estimate from the steps timed so far (at the end of a first epoch shorter than the window,
        too); nothing when no step was timed."""
        if self.done or not self.timed:
            return
        self.done = True
        elapsed = time.perf_counter() - self.started
        per_step = elapsed / self.timed
        wait_share = self.waited / elapsed if elapsed else 0.0
        if self.waited > 0.01 * elapsed:
            loader = f'the loader gave {self.batch_size * self.timed / self.waited:.0f} images/s when waited on'
        else:
            loader = 'the loader kept ahead of the model'
        left = self.steps_left - self.seen
        tqdm.write(f"estimate: {per_step:.3g} s a step over {count(self.timed, 'step')}, {100 * wait_share:.0f} % of "
                   f"it waiting for data ({loader}, data.workers={self.workers}); {count(left, 'step')} left: about "
                   f"{format_duration(left * per_step)}, plus validation after each epoch")

""" Helpers for the training tests: a tiny ImageFolder made of real digits images, and a subprocess entry point
that interrupts a run at a chosen training step (`python tests/train_helpers.py kill|sigint|none STEP -- ARGS`,
run by `run_cli`). """
import os
import signal
import subprocess
import sys
from pathlib import Path

TINY_TRAIN_PER_CLASS = 4  # 40 train images
TINY_VAL_PER_CLASS = 2  # 20 val images

TINY_SETTINGS = [
    'model.name=resnet18_bam', 'data.input_size=32', 'data.batch_size=8', 'data.scale=[1.0, 1.0]',
    'data.ratio=[1.0, 1.0]', 'data.hflip=0.0', 'data.crop_pct=1.0', 'data.interpolation=bilinear',
    'optim.lr=0.05', 'schedule.epochs=2', 'schedule.warmup_epochs=0', 'train.label_smoothing=0.1',
    'train.progress=false',
]


def make_digits_folder(root: Path) -> Path:
    """root/train/<digit>/*.png and root/val/<digit>/*.png from scikit-learn's digits (the first images of each
    class)."""
    from bam_models.train.data import DigitsDataset
    dataset = DigitsDataset('train')
    counts = {}
    for index in range(len(dataset)):
        image, label = dataset[index]
        seen = counts.get(label, 0)
        if seen >= TINY_TRAIN_PER_CLASS + TINY_VAL_PER_CLASS:
            continue
        split = 'train' if seen < TINY_TRAIN_PER_CLASS else 'val'
        folder = root / split / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        image.save(folder / f'{index}.png')
        counts[label] = seen + 1
    return root


def train_args(data, output, *extra) -> list:
    """`bam-models train` arguments of a tiny run of `data` into `output`, with `extra` settings."""
    sets = [*TINY_SETTINGS, f'data.dataset={data}', f'train.output={output}', *extra]
    return ['train', *[a for s in sets for a in ('--set', s)]]


def subprocess_env() -> dict:
    """The environment of a subprocess run of this checkout: one thread, not part of a distributed run, the tuning
    table's kernels (a kernel measured faster in one process and not in the next rounds differently, and the
    resume tests compare runs bit for bit)."""
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]), OMP_NUM_THREADS='1',
               BAM_MODELS_GATING_AUTOTUNE='0')
    env.pop('WORLD_SIZE', None)
    return env


def run_cli(args, how='none', step=0, check=True) -> subprocess.CompletedProcess:
    """`bam-models ARGS` in a subprocess of this checkout, interrupted (`how`: kill, sigint) at training `step`."""
    cmd = [sys.executable, str(Path(__file__)), how, str(step), '--', *args]
    proc = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f'{cmd} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}')
    return proc


def _interrupt_at(step: int, how: str):
    """Counts loss evaluations (one per training step) and sends a signal to this process at `step`."""
    import bam_models.train.build as train_module
    base = train_module.LabelSmoothingCrossEntropy

    class InterruptingLoss(base):
        calls = 0

        def forward(self, x, target):
            InterruptingLoss.calls += 1
            if InterruptingLoss.calls == step:
                os.kill(os.getpid(), signal.SIGKILL if how == 'kill' else signal.SIGINT)
            return super().forward(x, target)

    train_module.LabelSmoothingCrossEntropy = InterruptingLoss


if __name__ == '__main__':
    how, step = sys.argv[1], int(sys.argv[2])
    if how != 'none':
        _interrupt_at(step, how)
    from bam_models.cli import main
    sys.exit(main(sys.argv[sys.argv.index('--') + 1:]))

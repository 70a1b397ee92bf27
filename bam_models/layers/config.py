""" The fused-gating switch, modelled on timm's `use_fused_attn` / `set_fused_attn` / `TIMM_FUSED_ATTN`

BAM and CBAM have two implementations of the same formulas: the memory-lean fused autograd nodes of
`fused_gates.py` (the default in eager mode) and the plain formulas of `gating_reference.py`, which autograd
differentiates on its own. The switch picks one, in this order:

1. Scripting, tracing, ONNX export, torch.export and torch.func transforms always take the reference: custom
   autograd nodes are opaque to them. A torch.compile'd training step takes BAM's and CBAM's whole refinement as
   the `torch.library` custom ops `bam_models::bam_refine` and `bam_models::cbam_refine` (`use_gate_ops`), which
   keep the fused path's memory under the compiler; compiled inference takes the reference, which it fuses.
2. A module's own `fused` attribute (constructor argument `fused=True|False`), where it is not None.
3. The process-wide setting: `set_fused_gating(enabled)`, the `fused_gating(enabled)` context manager, or the
   environment variable `BAM_MODELS_FUSED_GATING=0|1` (default 1), read the first time the setting is needed:
   a bad value then raises a `UsageError` where it can be reported (the CLI checks it before any command
   runs, with `fused_gating_from_env`), not in the middle of `import bam_models`.

Off, every model trains through plain autograd, so double backward (`create_graph=True`), `torch.func` and
anything else autograd supports work. On, double backward stops with `FusedGatingError`, which names the switch.
"""
import contextlib
import os
from typing import ContextManager, Iterator, Optional

import torch

from bam_models.errors import FusedGatingError, UsageError

__all__ = [
    'FUSED_GATING', 'FUSED_GATING_ENV', 'FusedGatingError', 'ProcessSwitch', 'exporting', 'fused_gating',
    'fused_gating_from_env', 'fused_gating_supported', 'set_fused_gating', 'use_fused_gating', 'use_gate_ops',
]

FUSED_GATING_ENV = 'BAM_MODELS_FUSED_GATING'


class ProcessSwitch:
    """A process-wide on/off setting: set in code (`set`, or `scoped` for a block), else read from the environment
    variable `env` (0 or 1, default 1) the first time it is needed, so a bad value raises a `UsageError` where it
    can be reported, not during `import bam_models`. `on` and `off` say what each value does, for that error."""

    def __init__(self, env: str, on: str, off: str):
        self.env, self.on, self.off = env, on, off
        self._value: Optional[bool] = None  # None: not set in code yet; the environment decides on first use

    def from_env(self) -> bool:
        """The environment variable as a bool (1 when unset); a `UsageError` for any value but 0 or 1."""
        value = os.environ.get(self.env, '1').strip()
        if value not in ('0', '1'):
            raise UsageError(f"{self.env}={value!r} is not a valid setting; set it to 1 ({self.on}, the default) or "
                             f"0 ({self.off})")
        return value == '1'

    def get(self) -> bool:
        if self._value is None:
            self._value = self.from_env()
        return self._value

    def set(self, enabled: bool) -> None:
        self._value = bool(enabled)

    @contextlib.contextmanager
    def scoped(self, enabled: bool) -> Iterator[None]:
        """Runs the block with the switch set, then restores the previous setting."""
        previous = self.get()
        self.set(enabled)
        try:
            yield
        finally:
            self.set(previous)


FUSED_GATING = ProcessSwitch(FUSED_GATING_ENV, 'fused BAM/CBAM gating',
                             'plain autograd through the reference formulas')


def fused_gating_from_env() -> bool:
    """`BAM_MODELS_FUSED_GATING` as a bool (1 when unset); a `UsageError` for any value but 0 or 1."""
    return FUSED_GATING.from_env()


def set_fused_gating(enabled: bool) -> None:
    """Turn the fused BAM/CBAM gating on (default) or off for every module without its own `fused` setting."""
    FUSED_GATING.set(enabled)


def fused_gating(enabled: bool) -> ContextManager[None]:
    """`with fused_gating(False): ...` runs the block with the switch set, then restores the previous setting."""
    return FUSED_GATING.scoped(enabled)


@torch.jit.unused
def fused_gating_supported() -> bool:
    """False while scripting, tracing, exporting, compiling or inside a torch.func transform, which need plain
    ops; True in plain eager mode."""
    if torch.jit.is_scripting() or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
        return False
    if torch.compiler.is_compiling():
        return False
    # torch.func.grad / vmap / jvp run their function under a functorch interpreter
    return torch._C._functorch.peek_interpreter_stack() is None


@torch.jit.unused
def use_fused_gating(override: Optional[bool] = None) -> bool:
    """Whether a module with `fused=override` runs the fused nodes now (see the module docstring for the order)."""
    if not fused_gating_supported():
        return False
    return FUSED_GATING.get() if override is None else bool(override)


@torch.jit.unused
def exporting() -> bool:
    """True while tracing, exporting to ONNX or running torch.export: the graph is for deployment, so modules
    take the form that runtimes optimise best (1x1 convolutions whose BatchNorms fold, pools over H, W that
    become global pools)."""
    return torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or torch.compiler.is_exporting()


@torch.jit.unused
def use_gate_ops(override: Optional[bool] = None) -> bool:
    """Whether a module with `fused=override` runs its refinement as its library custom op now: under
    torch.compile with the switch on, where autograd records. Not under torch.export or ONNX export, whose
    programs must run where bam_models is not installed; not in eager mode, which has the autograd nodes; and not
    for compiled inference, which keeps nothing for backward and whose plain formulas the compiler fuses."""
    if torch.jit.is_scripting() or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
        return False
    if not torch.compiler.is_compiling() or torch.compiler.is_exporting() or not torch.is_grad_enabled():
        return False
    return FUSED_GATING.get() if override is None else bool(override)


def double_backward_error(module: str) -> FusedGatingError:
    return FusedGatingError(
        f"{module}'s fused gating does not support double backward (create_graph=True, e.g. a gradient penalty "
        f"or a Hessian); turn it off with bam_models.layers.set_fused_gating(False), the environment variable "
        f"{FUSED_GATING_ENV}=0, or fused=False on the module, to train through plain autograd.")

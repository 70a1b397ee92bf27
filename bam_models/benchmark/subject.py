""" What a measurement runs: seeded inputs shared by every model of a run, and a model with its optimizer that
takes training steps and inference passes on them. Used by `bam-models benchmark` and scripts/gpu_check.py. """
import contextlib
from dataclasses import dataclass
from typing import Callable, ContextManager, Optional

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

import bam_models.models  # noqa: F401  registers the zoo models with timm, so that their names resolve

__all__ = ['Inputs', 'OnnxRuntimeSubject', 'Subject', 'create_benchmarked_model']


def create_benchmarked_model(name: str, device=None, **kwargs) -> nn.Module:
    """A timm model, or pytorchcv's model for `pytorchcv:NAME` (an independent implementation to compare with)."""
    if not name.startswith('pytorchcv:'):
        return timm.create_model(name, device=device, **kwargs)
    from pytorchcv.model_provider import get_model  # optional: only for the side-by-side comparison
    with torch.device(device or 'cpu'):
        model = get_model(name.split(':', 1)[1], pretrained=False, **kwargs)
    # pytorchcv's ResNets end in a fixed 7x7 average pool (224 input only); adaptive is equal at 224
    if isinstance(getattr(model.features, 'final_pool', None), nn.AvgPool2d):
        model.features.final_pool = nn.AdaptiveAvgPool2d(1)
    return model


@dataclass
class Inputs:
    """A batch-1 image (latency), a batch with its targets (training, throughput) and an inference batch (the
    batch itself unless another size is asked for), drawn in that order from one seed."""
    single: torch.Tensor
    batch: torch.Tensor
    target: torch.Tensor
    infer_batch: torch.Tensor

    @classmethod
    def draw(cls, img_size: int, batch_size: int, seed: int = 0, channels_last: bool = False,
             num_classes: int = 1000, infer_batch_size: Optional[int] = None, device=None) -> 'Inputs':
        generator = torch.Generator().manual_seed(seed)
        fmt = torch.channels_last if channels_last else torch.contiguous_format

        def images(n: int) -> torch.Tensor:
            return torch.randn(n, 3, img_size, img_size, generator=generator).to(device=device, memory_format=fmt)

        single, batch = images(1), images(batch_size)
        target = torch.randint(0, num_classes, (batch_size,), generator=generator).to(device)
        infer = batch if infer_batch_size in (None, batch_size) else images(infer_batch_size)
        return cls(single, batch, target, infer)


class Subject:
    """One model with the shared inputs and an SGD optimizer. `forward` replaces the model's call (a compiled
    version of it), `context` opens what every pass runs under (autocast, a gating switch), `scaler` scales the
    loss for fp16; by default none of these changes anything."""

    def __init__(self, model: nn.Module, inputs: Inputs, lr: float = 1e-4,
                 forward: Optional[Callable] = None, context: Callable[[], ContextManager] = contextlib.nullcontext,
                 scaler: Optional[torch.amp.GradScaler] = None):
        self.model = model
        self.inputs = inputs
        self.forward = model if forward is None else forward  # no truth test: it would call len(module)
        self.context = context
        self.optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
        self.scaler = torch.amp.GradScaler(inputs.batch.device.type, enabled=False) if scaler is None else scaler

    def train_step(self) -> None:
        """Forward, cross-entropy, backward and optimizer step on the batch, from gradients set to None."""
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        with self.context():
            loss = F.cross_entropy(self.forward(self.inputs.batch).float(), self.inputs.target)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()

    def infer(self, x: torch.Tensor, iters: int = 1) -> None:
        """`iters` eval-mode forward passes of `x` under torch.inference_mode."""
        self.model.eval()
        with torch.inference_mode(), self.context():
            for _ in range(iters):
                self.forward(x)


    def no_grad_forward(self) -> None:
        """One eval-mode forward pass of the batch under torch.no_grad (inference mode would make tensors that
        autograd hooks cannot be registered on, as profiling needs)."""
        self.model.eval()
        with torch.no_grad(), self.context():
            self.forward(self.inputs.batch)


class OnnxRuntimeSubject:
    """An exported ONNX graph run by onnxruntime on the CPU with `threads` intra-op threads: inference only (what a
    deployment runs), on the same inputs as the PyTorch models."""

    def __init__(self, path: str, inputs: Inputs, threads: int, profile_prefix: Optional[str] = None):
        import onnxruntime  # optional: only for `bam-models benchmark --onnxruntime`

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3  # errors only: the exporter's unused initializers are not the user's concern
        if profile_prefix is not None:  # onnxruntime's own profiler: a JSON trace of every kernel run
            options.enable_profiling = True
            options.profile_file_prefix = profile_prefix
        self.session = onnxruntime.InferenceSession(path, options, providers=['CPUExecutionProvider'])
        self.input_name = self.session.get_inputs()[0].name
        self.inputs = inputs

    def infer(self, x: torch.Tensor, iters: int = 1) -> None:
        feed = {self.input_name: x.contiguous().numpy()}
        for _ in range(iters):
            self.session.run(None, feed)

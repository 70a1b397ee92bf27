""" Export zoo models to ONNX, TorchScript and torch.export programs with dynamic batch, height and width.

Every exported file is checked against the PyTorch model it came from by `compare_with_pytorch`, which runs
the file in its own runtime (onnxruntime, torch.jit.load, torch.export.load) at the given input sizes.
"""
import warnings
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import timm
import torch
import torch.nn as nn
from timm.models import get_pretrained_cfg

from bam_models.hub import model_from_checkpoint

__all__ = [
    'FORMATS', 'create_model_for_export', 'export_model', 'export_onnx', 'export_torchscript', 'export_program',
    'load_exported', 'compare_with_pytorch',
]

FORMATS = ('onnx', 'torchscript', 'exported')
INPUT_NAME = 'images'
OUTPUT_NAME = 'output'
MAX_SIDE = 8192


def create_model_for_export(
        model_name: str,
        checkpoint: Optional[str] = None,
        random_init: bool = False,
        **model_kwargs,
) -> nn.Module:
    """An eval-mode model with the weights to export.

    `model_name` may carry a pretrained tag ('resnet50_bam.tag'). A `checkpoint` (read by
    `bam_models.hub.model_from_checkpoint`) wins over pretrained weights; its classifier size sets num_classes.
    """
    if checkpoint is not None:
        return model_from_checkpoint(model_name, checkpoint, **model_kwargs).eval()
    cfg = get_pretrained_cfg(model_name, allow_unregistered=False)
    has_weights = cfg is not None and any(getattr(cfg, key, None) for key in ('url', 'hf_hub_id', 'file', 'state_dict'))
    if not has_weights and not random_init:
        raise ValueError(
            f"{model_name} has no pretrained weights to export; pass --checkpoint FILE with your weights, "
            f"or --random-init to export randomly initialised weights (e.g. to test a deployment pipeline)")
    return timm.create_model(model_name, pretrained=has_weights and not random_init, **model_kwargs).eval()


def _total_stride(model: nn.Module) -> int:
    feature_info = getattr(model, 'feature_info', None)
    if feature_info:
        return int(feature_info[-1]['reduction'])
    return 32


def _dynamic_shapes(model: nn.Module) -> Dict[str, Dict[int, torch.export.Dim]]:
    # at one pixel in the last stage torch.export specialises size-1 broadcasts, so the smallest exported side
    # is one more than the network's total stride; ONNX graphs built from it run at any size
    min_side = _total_stride(model) + 1
    return {'x': {
        0: torch.export.Dim('batch', min=1, max=4096),
        2: torch.export.Dim('height', min=min_side, max=MAX_SIDE),
        3: torch.export.Dim('width', min=min_side, max=MAX_SIDE),
    }}


def _sample(model: nn.Module, input_size: Optional[Tuple[int, int]]) -> torch.Tensor:
    if input_size is None:
        input_size = tuple(model.pretrained_cfg.get('input_size', (3, 224, 224))[-2:])
    # batch 2: a sample of batch 1 would let the tracers specialise the batch dimension to 1
    return torch.randn(2, getattr(model, 'in_chans', 3), *input_size)


def export_onnx(model: nn.Module, path: Path, sample: torch.Tensor, opset: Optional[int] = None) -> str:
    """Write an ONNX graph with dynamic batch, height and width; returns the exporter used.

    The torch.export-based exporter comes first; if it fails, the TorchScript-based one is used.
    """
    kwargs = dict(input_names=[INPUT_NAME], output_names=[OUTPUT_NAME])
    if opset is not None:
        kwargs['opset_version'] = opset
    try:
        torch.onnx.export(model, (sample,), str(path), dynamo=True, dynamic_shapes=_dynamic_shapes(model), **kwargs)
        return 'dynamo'
    except Exception as error:  # the exporters raise many types; the fallback's own error reports a real failure
        warnings.warn(f"torch.export-based ONNX export failed ({type(error).__name__}: {error}); "
                      f"falling back to the TorchScript-based exporter")
    axes = {0: 'batch', 2: 'height', 3: 'width'}
    torch.onnx.export(
        model, (sample,), str(path), dynamo=False,
        dynamic_axes={INPUT_NAME: axes, OUTPUT_NAME: {0: 'batch'}}, **kwargs)
    return 'torchscript'


def export_torchscript(model: nn.Module, path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', FutureWarning)  # torch.jit.script's deprecation notice
        torch.jit.script(model).save(str(path))


def export_program(model: nn.Module, path: Path, sample: torch.Tensor) -> None:
    torch.export.save(torch.export.export(model, (sample,), dynamic_shapes=_dynamic_shapes(model)), str(path))


def export_model(
        model: nn.Module,
        path: Path,
        fmt: str,
        input_size: Optional[Tuple[int, int]] = None,
        opset: Optional[int] = None,
) -> str:
    """Export `model` (put in eval mode) to `path` in `fmt`; returns a one-word description of the exporter."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    model = model.eval()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sample = _sample(model, input_size)
    with torch.no_grad():
        if fmt == 'onnx':
            return f'onnx ({export_onnx(model, path, sample, opset)} exporter)'
        if fmt == 'torchscript':
            export_torchscript(model, path)
            return 'torchscript (scripted)'
        export_program(model, path, sample)
        return 'torch.export'


def load_exported(path: Path, fmt: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """A function running the exported file in its own runtime on a float32 batch."""
    if fmt == 'onnx':
        import onnxruntime

        session = onnxruntime.InferenceSession(str(path), providers=['CPUExecutionProvider'])
        input_name = session.get_inputs()[0].name
        return lambda x: torch.from_numpy(session.run(None, {input_name: x.numpy()})[0])
    if fmt == 'torchscript':
        with warnings.catch_warnings():
            warnings.simplefilter('ignore', FutureWarning)
            return torch.jit.load(str(path)).eval()
    if fmt == 'exported':
        return torch.export.load(str(path)).module()
    raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")


def compare_with_pytorch(
        model: nn.Module,
        path: Path,
        fmt: str,
        shapes: Sequence[Tuple[int, int, int, int]] = ((1, 3, 224, 192), (2, 3, 160, 256)),
) -> List[float]:
    """Max abs difference between the exported file and the PyTorch model on random inputs of each shape."""
    run_exported = load_exported(path, fmt)
    diffs = []
    model = model.eval()
    with torch.no_grad():
        for shape in shapes:
            x = torch.randn(shape)
            diffs.append((run_exported(x) - model(x)).abs().max().item())
    return diffs

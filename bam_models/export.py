""" Export zoo models to ONNX, TorchScript and torch.export programs with dynamic batch, height and width.

Every exported file is checked against the PyTorch model it came from by `compare_with_pytorch`, which runs
the file in its own runtime (onnxruntime, torch.jit.load, torch.export.load) at the given input sizes.
`export_model` returns every file it wrote: the ONNX exporter may put the weights into a `.onnx.data` file
next to the graph, which must travel with it.
"""
import warnings
from pathlib import Path
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from bam_models.errors import UsageError
from bam_models.hub.load import create_model_from_name

__all__ = [
    'FORMATS', 'ExportResult', 'check_shapes', 'create_model_for_export', 'export_model', 'export_onnx',
    'export_torchscript', 'export_program', 'global_pools_in_place', 'load_exported', 'compare_with_pytorch',
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
    """An eval-mode model with the weights to export (`bam_models.hub.load.create_model_from_name`).

    `model_name` is any name timm takes (`ARCH[.TAG]`, `local-dir:PATH`, `hf-hub:ORG/NAME`). A `checkpoint`
    wins over pretrained weights; its classifier size sets num_classes. Random weights only on request
    (`random_init`): a model without pretrained weights raises PretrainedWeightsError.
    """
    return create_model_from_name(model_name, checkpoint, pretrained=not random_init, **model_kwargs).eval()


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


def trace_size(model: nn.Module, input_size: Optional[Tuple[int, int]] = None) -> Tuple[int, int]:
    """(H, W) of the example input: `input_size`, checked, or the model's own input size (which a checkpoint
    of `bam-models train` sets to its training size), raised to the smallest side the export supports."""
    min_side = _total_stride(model) + 1
    if input_size is not None:
        if min(input_size) < min_side:
            name = model.pretrained_cfg.get('architecture') or type(model).__name__
            raise UsageError(f"--img-size {input_size[0]} {input_size[1]} is too small for {name}: H and W "
                             f"must be at least {min_side} (its total stride {min_side - 1}, plus one); "
                             f"pass e.g. --img-size 224")
        return tuple(input_size)
    height, width = model.pretrained_cfg.get('input_size', (3, 224, 224))[-2:]
    return max(height, min_side), max(width, min_side)


def check_shapes(model: nn.Module, input_size: Optional[Tuple[int, int]] = None) -> List[Tuple[int, int, int, int]]:
    """Two batch sizes and two non-square sizes, neither of them the traced one: what `bam-models export`
    compares with PyTorch."""
    height, width = trace_size(model, input_size)
    return [(1, 3, height + 32, width), (3, 3, height, width + 64)]


def _sample(model: nn.Module, input_size: Optional[Tuple[int, int]]) -> torch.Tensor:
    # batch 2: a sample of batch 1 would let the tracers specialise the batch dimension to 1
    return torch.randn(2, getattr(model, 'in_chans', 3), *trace_size(model, input_size))


def export_onnx(model: nn.Module, path: Path, sample: torch.Tensor, opset: Optional[int] = None) -> str:
    """Write an ONNX graph with dynamic batch, height and width; returns the exporter used.

    The torch.export-based exporter comes first; if it fails, the TorchScript-based one is used.
    """
    kwargs = dict(input_names=[INPUT_NAME], output_names=[OUTPUT_NAME])
    if opset is not None:
        kwargs['opset_version'] = opset
    try:
        torch.onnx.export(model, (sample,), str(path), dynamo=True, dynamic_shapes=_dynamic_shapes(model), **kwargs)
        global_pools_in_place(path)
        return 'dynamo'
    except Exception as error:  # the exporters raise many types; the fallback's own error reports a real failure
        warnings.warn(f"torch.export-based ONNX export failed ({type(error).__name__}: {error}); "
                      f"falling back to the TorchScript-based exporter", stacklevel=2)
    axes = {0: 'batch', 2: 'height', 3: 'width'}
    torch.onnx.export(
        model, (sample,), str(path), dynamo=False,
        dynamic_axes={INPUT_NAME: axes, OUTPUT_NAME: {0: 'batch'}}, **kwargs)
    return 'torchscript'


_GLOBAL_POOLS = {'ReduceMean': 'GlobalAveragePool', 'ReduceMax': 'GlobalMaxPool'}


def _reduced_axes(node, constants: Dict[str, List[int]]) -> Optional[List[int]]:
    """A reduction node's axes, from its `axes` input (opset 18) or attribute; None where they are not constant."""
    for attribute in node.attribute:
        if attribute.name == 'axes':
            return list(attribute.ints)
    return constants.get(node.input[1]) if len(node.input) > 1 else None


def _keeps_dims(node) -> bool:
    return all(a.i == 1 for a in node.attribute if a.name == 'keepdims')


def global_pools_in_place(path: Path) -> int:
    """Rewrite every ReduceMean / ReduceMax over H and W (keeping dims) of a 4-D map in the ONNX graph at
    `path` as GlobalAveragePool / GlobalMaxPool, the ops onnxruntime runs as one pass over each channel's
    contiguous plane; returns how many it rewrote. The torch.export-based exporter writes global pools as
    reductions. Weights in an external `.onnx.data` file stay where they are."""
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(str(path), load_external_data=False)
    graph = proto.graph
    ranks = {v.name: len(v.type.tensor_type.shape.dim) for v in [*graph.input, *graph.value_info]
             if v.type.tensor_type.HasField('shape')}
    constants = {t.name: numpy_helper.to_array(t).tolist() for t in graph.initializer
                 if t.data_type == onnx.TensorProto.INT64 and t.dims == [2] and not t.external_data}
    for node in graph.node:
        if node.op_type == 'Constant' and node.attribute and node.attribute[0].name == 'value':
            value = numpy_helper.to_array(node.attribute[0].t)
            if value.ndim == 1 and value.size == 2:
                constants[node.output[0]] = value.tolist()
    rewritten = 0
    for node in graph.node:
        if node.op_type not in _GLOBAL_POOLS or ranks.get(node.input[0]) != 4 or not _keeps_dims(node):
            continue
        axes = _reduced_axes(node, constants)
        if axes is None or sorted(a % 4 for a in axes) != [2, 3]:
            continue
        pool = onnx.helper.make_node(_GLOBAL_POOLS[node.op_type], [node.input[0]], list(node.output), name=node.name)
        node.CopyFrom(pool)
        rewritten += 1
    if rewritten:
        onnx.save(proto, str(path))
    return rewritten


def export_torchscript(model: nn.Module, path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', FutureWarning)  # torch.jit.script's deprecation notice
        torch.jit.script(model).save(str(path))


def export_program(model: nn.Module, path: Path, sample: torch.Tensor) -> None:
    torch.export.save(torch.export.export(model, (sample,), dynamic_shapes=_dynamic_shapes(model)), str(path))


class ExportResult(NamedTuple):
    exporter: str  # e.g. 'onnx (dynamo exporter)'
    files: List[Path]  # every file written: the graph/program first, then e.g. its .onnx.data weights


def _stamps(path: Path) -> Dict[Path, int]:
    """Modification times of `path` and of the files named after it (an ONNX graph's `.data` weights)."""
    return {p: p.stat().st_mtime_ns for p in path.parent.glob(f'{path.name}*') if p.is_file()}


def export_model(
        model: nn.Module,
        path: Path,
        fmt: str,
        input_size: Optional[Tuple[int, int]] = None,
        opset: Optional[int] = None,
) -> ExportResult:
    """Export `model` (put in eval mode) to `path` in `fmt`; returns the exporter used and the files written."""
    if fmt not in FORMATS:
        raise UsageError(f"format must be one of {FORMATS}, got {fmt!r}; pick one of them")
    model = model.eval()
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"{path} is a folder; pass the path of the file to write, e.g. {path / 'model.onnx'}")
    sample = _sample(model, input_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    before = _stamps(path)
    with torch.no_grad():
        if fmt == 'onnx':
            exporter = f'onnx ({export_onnx(model, path, sample, opset)} exporter)'
        elif fmt == 'torchscript':
            export_torchscript(model, path)
            exporter = 'torchscript (scripted)'
        else:
            export_program(model, path, sample)
            exporter = 'torch.export'
    written = sorted((p for p, stamp in _stamps(path).items() if before.get(p) != stamp), key=lambda p: p != path)
    return ExportResult(exporter, written)


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
    raise UsageError(f"format must be one of {FORMATS}, got {fmt!r}; pick one of them")


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

""" Attention maps and Grad-CAM for BAM and CBAM models.

`capture_attention(model, images)` runs one ordinary forward pass with forward hooks on every BAM / CBAM
gate and returns what each module multiplied into its feature map, per module and grouped per stage. The
model's output is returned as the model computed it (the hooks only copy the gates' small outputs) and every hook
is removed before the function returns, also when the forward pass raises.

Value definitions, all in [0, 1]:

- BAM multiplies its input F by `1 + A` with `A = sigmoid(fuse(Mc, Ms))` of shape (B, C, H, W). Its
  `spatial` map is the mean of A over channels (B, H, W) and its `channel` weights the mean of A over H and W
  (B, C): the attention actually applied, averaged along the other axis. The raw branch logits alone are
  not shown because under the authors' product fusion the sign of Mc decides what Ms means. The full
  multiplier is therefore `1 + spatial` / `1 + channel` in [1, 2]. A channel-only BAM has no spatial map,
  a spatial-only BAM no channel weights (None).
- CBAM multiplies by its channel weights sigmoid(MLP(avg) + MLP(max)) (B, C) and then by its spatial map
  sigmoid(BN(conv([max, mean]))) (B, H, W); both are returned as they are.
- A stage holding several CBAM blocks (one per residual block in a ResNet stage) reports the mean over its
  blocks of their spatial maps and of their channel weights; the per-block maps stay in `modules`.

`save_attention_figure(model, images, out_path)` draws the input, every stage's spatial attention upsampled
onto it, and a Grad-CAM (the `grad-cam` package) of the top class at the deepest stage whose map is at least 4x4
(`choose_cam_layer`). `load_images` reads image
files with the model's preprocessing and `class_names` gives the label names for the titles.
"""
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from bam_models.errors import UsageError, did_you_mean
from bam_models.layers import BAM, CBAM
from bam_models.train.data import image_as_rgb

__all__ = [
    'MIN_CAM_SIZE', 'AttentionMap', 'AttentionCapture', 'CamLayer', 'capture_attention', 'class_names', 'grad_cam',
    'choose_cam_layer', 'load_images', 'save_attention_figure',
]


@dataclass
class AttentionMap:
    """Attention of one BAM/CBAM module or the mean over one stage's modules.

    spatial: (B, H, W) in [0, 1], or None for a channel-only BAM / CBAM.
    channel: (B, C) in [0, 1], or None for a spatial-only BAM / CBAM.
    """
    name: str
    kind: str  # 'BAM' or 'CBAM'
    modules: Tuple[str, ...]
    spatial: Optional[torch.Tensor]
    channel: Optional[torch.Tensor]

    @property
    def size(self) -> Optional[Tuple[int, int]]:
        """(H, W) of the spatial map."""
        return None if self.spatial is None else tuple(self.spatial.shape[-2:])


@dataclass
class AttentionCapture:
    """Result of `capture_attention`: the model output and the attention by module and by stage, in forward
    order."""
    output: Any
    modules: Dict[str, AttentionMap] = field(default_factory=dict)
    stages: Dict[str, AttentionMap] = field(default_factory=dict)
    cam: Optional['CamLayer'] = None  # set by save_attention_figure: the layer its Grad-CAM explains


def _stage_name(model: nn.Module, module_name: str) -> str:
    """The stage holding the module: the innermost stage timm's `feature_info` names (`stages.0` for
    `stages.0.blocks.bam`), else the innermost nn.Sequential containing it (`layer2` for `layer2.bam` and
    `layer2.1.se`, `blocks.1` for `blocks.1.bam`), or the module's own name if none contains it."""
    stages = [info['module'] for info in getattr(model, 'feature_info', None) or [] if isinstance(info, dict)]
    holding = [stage for stage in stages if module_name.startswith(stage + '.')]
    if holding:
        return max(holding, key=len)
    parts = module_name.split('.')
    for end in range(len(parts) - 1, 0, -1):
        prefix = '.'.join(parts[:end])
        if isinstance(model.get_submodule(prefix), nn.Sequential):
            return prefix
    return module_name


def _fuse_bam_logits(bam: BAM, channel: torch.Tensor, spatial: torch.Tensor) -> torch.Tensor:
    if bam.fusion == 'product':
        return channel * spatial
    if bam.fusion == 'sum':
        return channel + spatial
    if bam.fusion == 'max':
        return torch.maximum(channel, spatial)
    raise ValueError(f"capture_attention cannot combine BAM fusion={bam.fusion!r}; known: product, sum, max.")


def _bam_attention(name: str, bam: BAM, outputs: Dict[str, torch.Tensor]) -> AttentionMap:
    channel_logits, spatial_logits = outputs.get('channel_gate'), outputs.get('spatial_gate')
    if channel_logits is not None and spatial_logits is not None:
        attention = torch.sigmoid(_fuse_bam_logits(bam, channel_logits, spatial_logits))
        spatial, channel = attention.mean(1), attention.mean((2, 3))
    else:
        spatial = None if spatial_logits is None else torch.sigmoid(spatial_logits)[:, 0]
        channel = None if channel_logits is None else torch.sigmoid(channel_logits).flatten(1)
    return AttentionMap(name, 'BAM', (name,), spatial, channel)


def _cbam_attention(name: str, outputs: Dict[str, torch.Tensor]) -> AttentionMap:
    """A CBAM's gate outputs (already sigmoids); a channel-only or spatial-only CBAM lacks one of them."""
    spatial, channel = outputs.get('spatial_gate'), outputs.get('channel_gate')
    return AttentionMap(name, 'CBAM', (name,), None if spatial is None else spatial[:, 0],
                        None if channel is None else channel.flatten(1))


def _mean_or_none(maps: List[Optional[torch.Tensor]]) -> Optional[torch.Tensor]:
    """The mean of the maps shaped like the stage's last one (its output); None if any map is missing. Maps of
    another width (MobileNetV1's CBAM after a depthwise conv sees fewer channels than the stage puts out) are
    left out: channel weights of different channels cannot be averaged."""
    if any(m is None for m in maps):
        return None
    return torch.stack([m for m in maps if m.shape == maps[-1].shape]).mean(0)


def _group_by_stage(model: nn.Module, modules: Dict[str, AttentionMap]) -> Dict[str, AttentionMap]:
    grouped: Dict[str, List[AttentionMap]] = {}
    for name, attention in modules.items():
        grouped.setdefault(_stage_name(model, name), []).append(attention)
    stages = {}
    for stage, members in grouped.items():
        if len(members) == 1:
            stages[stage] = AttentionMap(stage, members[0].kind, members[0].modules, members[0].spatial,
                                         members[0].channel)
            continue
        kinds = sorted({m.kind for m in members})
        stages[stage] = AttentionMap(
            stage, '+'.join(kinds), tuple(m.name for m in members),
            _mean_or_none([m.spatial for m in members]), _mean_or_none([m.channel for m in members]),
        )
    return stages


def capture_attention(model: nn.Module, images: torch.Tensor) -> AttentionCapture:
    """Run `model(images)` once and return its output with every BAM / CBAM attention map.

    The forward pass runs in the model's current mode (train or eval) and grad mode, as a plain call would, so
    the output is bit-identical to `model(images)`, except in a training-mode pass of a CBAM ResNet: there the
    hooks make each block run its last BatchNorm and its CBAM as two calls (`CBAM.forward_after_norm`), which
    differs from the plain call by float rounding. Maps are detached float32 tensors on the
    model's device; see the module docstring for their definitions. Modules that did not run (e.g. behind
    a features_only cut) are absent.
    """
    attention_modules = [(name, m) for name, m in model.named_modules() if isinstance(m, (BAM, CBAM))]
    if not attention_modules:
        raise UsageError(
            f"capture_attention found no BAM or CBAM module in {type(model).__name__}; pass a zoo model "
            f"(bam_models.list_zoo_models()) or one prepared with bam_models.insert_bam / insert_cbam")

    gate_outputs: Dict[str, Dict[str, torch.Tensor]] = {}
    order: List[str] = []

    def make_hook(module_name: str, gate_name: str):
        def hook(gate: nn.Module, args: Any, output: torch.Tensor) -> None:
            outputs = gate_outputs.setdefault(module_name, {})
            if module_name not in order:
                order.append(module_name)
            # the first call is the forward pass; a second one would be a recomputation for backward
            if gate_name not in outputs:
                # a copy, so that in-place ops the model may apply later cannot change what we return
                outputs[gate_name] = output.detach().float().clone()
        return hook

    ran: List[str] = []
    handles = []
    try:
        for name, module in attention_modules:
            handles.append(module.register_forward_hook(lambda m, args, out, name=name: ran.append(name)))
            for gate_name in ('channel_gate', 'spatial_gate'):
                gate = getattr(module, gate_name, None)
                if gate is not None:
                    handles.append(gate.register_forward_hook(make_hook(name, gate_name)))
        output = model(images)
    finally:
        for handle in handles:
            handle.remove()

    modules_by_name = dict(attention_modules)
    for name in ran:
        module = modules_by_name[name]
        expected = {g for g in ('channel_gate', 'spatial_gate') if getattr(module, g, None) is not None}
        if set(gate_outputs.get(name, ())) != expected:
            raise RuntimeError(
                f"{name} ({type(module).__name__}) ran without calling its gate submodules {sorted(expected)} "
                f"as modules, so their forward hooks could not see the attention; call them as "
                f"`self.channel_gate(x)` / `self.spatial_gate(x)` inside {type(module).__name__}.forward.")
    maps = {}
    with torch.no_grad():
        for name in order:
            module = modules_by_name[name]
            if isinstance(module, BAM):
                maps[name] = _bam_attention(name, module, gate_outputs[name])
            else:
                maps[name] = _cbam_attention(name, gate_outputs[name])
    return AttentionCapture(output=output, modules=maps, stages=_group_by_stage(model, maps))


def load_images(model: nn.Module, paths: Sequence[str], img_size: Optional[int] = None) -> torch.Tensor:
    """Image files as one batch, preprocessed as the model's pretrained_cfg says (resize, center crop,
    normalise); `img_size` overrides its input size."""
    from PIL import Image, UnidentifiedImageError
    from timm.data import create_transform, resolve_data_config

    if not paths:
        raise UsageError("no images given; pass one or more image files")
    if img_size is not None and img_size < 1:
        raise UsageError(f"--img-size must be a positive number, got {img_size}; pass e.g. --img-size 224")
    transform = create_transform(**resolve_data_config(
        {'input_size': (3, img_size, img_size)} if img_size else {}, model=model))
    images = []
    for path in paths:
        if not Path(path).is_file():
            raise UsageError(f"image {path} is not an existing file; pass the path of an image file")
        try:
            with Image.open(path) as image:
                images.append(transform(image_as_rgb(image)))
        except Image.DecompressionBombError:
            raise UsageError(f"image {path} has more pixels than Pillow's decompression-bomb limit "
                             f"({Image.MAX_IMAGE_PIXELS:,}); pass a smaller image") from None
        except (UnidentifiedImageError, OSError) as error:
            raise UsageError(f"image {path} could not be read as an image ({type(error).__name__}); "
                             f"pass a PNG, JPEG or another format Pillow reads") from None
    return torch.stack(images)


def class_names(model: nn.Module) -> Optional[List[str]]:
    """Label names from the pretrained cfg, else ImageNet's for 1000-class models, else None."""
    import timm.data

    names = model.pretrained_cfg.get('label_names')
    if names:
        return list(names)
    subset = timm.data.infer_imagenet_subset(model)
    if subset:
        info = timm.data.ImageNetInfo(subset)
        return [info.index_to_description(i) for i in range(model.num_classes)]
    return None


def _cam_layer(model: nn.Module, target_layer: str) -> Tuple[str, nn.Module]:
    names = [name for name, _ in model.named_modules() if name]
    if target_layer not in names:
        children = ', '.join(name for name, _ in model.named_children())
        hint = did_you_mean(target_layer, names) or f"top-level modules: {children}"
        raise UsageError(f"{type(model).__name__} has no module '{target_layer}' ({hint}); pass a module name "
                         f"of model.named_modules(), e.g. the last stage")
    return target_layer, model.get_submodule(target_layer)


def _check_out_path(out_path: str) -> None:
    """Refuse before the forward passes: matplotlib would fail only at the very end."""
    from matplotlib.figure import Figure

    path = Path(out_path)
    if not path.parent.is_dir():
        raise UsageError(f"the folder of {out_path} does not exist; create {path.parent} first or pass another path")
    supported = Figure().canvas.get_supported_filetypes()
    if path.suffix.lstrip('.').lower() not in supported:
        raise UsageError(f"{out_path} has no image suffix matplotlib writes ({', '.join(sorted(supported))}); "
                         f"pass e.g. maps.png")


MIN_CAM_SIZE = 4  # a coarser Grad-CAM map is a blob; at 1x1 (layer4 of a 32 px model) one flat colour


class CamLayer(NamedTuple):
    """The module Grad-CAM explains, the (H, W) of its output at the images' size, and a note when that map is
    coarser than MIN_CAM_SIZE (why, and what to do), else None."""
    name: str
    module: nn.Module
    size: Tuple[int, int]
    note: Optional[str]


def _feature_stages(model: nn.Module) -> List[str]:
    """The feature stages, shallow to deep: timm's `feature_info` modules, else ResNet's layer1..layer4."""
    feature_info = getattr(model, 'feature_info', None)
    if feature_info:
        return [info['module'] for info in feature_info]
    return [name for name in ('layer1', 'layer2', 'layer3', 'layer4') if hasattr(model, name)]


def _map_sizes(model: nn.Module, names: Sequence[str], images: torch.Tensor) -> Dict[str, Tuple[int, int]]:
    """(H, W) of each named module's (B, C, H, W) output for the first image, in eval mode without grad (the
    model's mode is restored, no running statistics change)."""
    sizes: Dict[str, Tuple[int, int]] = {}

    def record(name: str):
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if isinstance(output, torch.Tensor) and output.dim() == 4:
                sizes.setdefault(name, tuple(output.shape[-2:]))
        return hook

    handles = [model.get_submodule(name).register_forward_hook(record(name)) for name in dict.fromkeys(names)]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(images[:1])
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return sizes


def choose_cam_layer(model: nn.Module, images: torch.Tensor, target_layer: Optional[str] = None) -> CamLayer:
    """The module Grad-CAM explains for `images`: by default the deepest feature stage whose map is at least
    MIN_CAM_SIZE on each side at the images' size (`layer4` at 224 px, `layer2` at 32 px), or the stage with the
    largest map and a note when none is; `target_layer` (a module name) is used as asked, with a note when its
    map is coarser than that. One forward pass of the first image measures the maps."""
    stages = _feature_stages(model)
    asked = None if target_layer is None else _cam_layer(model, target_layer)[0]
    sizes = _map_sizes(model, [*stages, *([asked] if asked else [])], images)
    measured = [stage for stage in stages if stage in sizes]
    fine = [stage for stage in measured if min(sizes[stage]) >= MIN_CAM_SIZE]
    best = fine[-1] if fine else max(measured, key=lambda stage: sizes[stage][0] * sizes[stage][1], default=None)
    name = asked or best
    if name is None:
        raise UsageError(f"cannot tell the feature stages of {type(model).__name__} (no timm feature_info, no "
                         f"layer4); pass target_layer= the module whose activations Grad-CAM should use.")
    if name not in sizes:
        raise UsageError(f"{name} puts out no (B, C, H, W) feature map for Grad-CAM; pass a feature stage"
                         f"{f' such as {best}' if best else ''}")
    return CamLayer(name, model.get_submodule(name), sizes[name], _cam_note(asked, best, fine, sizes, images))


def _cam_note(asked: Optional[str], best: Optional[str], fine: Sequence[str], sizes: Dict[str, Tuple[int, int]],
              images: torch.Tensor) -> Optional[str]:
    """Why the Grad-CAM map is coarser than MIN_CAM_SIZE, or None when it is not."""
    input_size = 'x'.join(str(side) for side in images.shape[-2:])
    shape = {name: f'{size[0]}x{size[1]}' for name, size in sizes.items()}
    if asked and min(sizes[asked]) < MIN_CAM_SIZE:
        default = f"; the default target, {best}, is {shape[best]}" if best else ''
        return (f"Grad-CAM at {asked} is {shape[asked]} at input {input_size}, too coarse to show where the model "
                f"looks (below {MIN_CAM_SIZE}x{MIN_CAM_SIZE}){default}")
    if not asked and not fine:
        return (f"no feature stage reaches {MIN_CAM_SIZE}x{MIN_CAM_SIZE} at input {input_size}: Grad-CAM uses "
                f"{best}, the largest map ({shape[best]}); a larger input size gives a finer one")
    return None


def grad_cam(
        model: nn.Module,
        images: torch.Tensor,
        target_layer: Optional[nn.Module] = None,
        classes: Optional[Sequence[int]] = None,
) -> Tuple[np.ndarray, List[int]]:
    """Grad-CAM (pytorch_grad_cam.GradCAM) at `target_layer` (default: `choose_cam_layer`'s choice, the deepest
    stage whose map is at least 4x4 at the images' size) for `classes`
    (default: each image's top class). Returns (B, H, W) heatmaps in [0, 1] at input resolution and the
    classes explained.

    Runs in eval mode; the model's mode and its parameters' .grad are restored afterwards.
    """
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    if target_layer is None:
        target_layer = choose_cam_layer(model, images).module
    was_training = model.training
    saved_grads = [(p, p.grad) for p in model.parameters()]
    try:
        with torch.enable_grad():
            if classes is None:
                model.eval()
                with torch.no_grad():
                    classes = _class_probabilities(model, model(images)).argmax(1).tolist()
            cam = GradCAM(model=model, target_layers=[target_layer])
            try:
                # an input that requires grad keeps Grad-CAM working when every parameter is frozen
                heatmaps = cam(input_tensor=images.detach().requires_grad_(True),
                               targets=[ClassifierOutputTarget(int(c)) for c in classes])
            finally:
                cam.activations_and_grads.release()
    finally:
        model.train(was_training)
        for param, grad in saved_grads:
            param.grad = grad
    return heatmaps, list(classes)


def _class_probabilities(model: nn.Module, logits: torch.Tensor) -> torch.Tensor:
    # a timm model created with num_classes=0 returns pooled features, also of shape (B, N)
    if logits.dim() != 2 or getattr(model, 'num_classes', None) == 0:
        raise UsageError(
            f"Grad-CAM needs classifier logits of shape (B, num_classes), the model returned "
            f"{'features' if logits.dim() == 2 else 'a tensor'} of shape {list(logits.shape)}; create it with "
            f"num_classes > 0.")
    return logits.detach().float().softmax(1).cpu()


def _display_images(
        model: nn.Module,
        images: torch.Tensor,
        display_images: Optional[Union[torch.Tensor, np.ndarray]],
) -> np.ndarray:
    """(B, H, W, 3) float images in [0, 1]: `display_images` if given, else `images` un-normalised with the
    model's pretrained_cfg mean and std."""
    if display_images is None:
        from timm.data import resolve_data_config
        config = resolve_data_config(model=model)
        mean = torch.tensor(config['mean'], device=images.device).view(1, -1, 1, 1)
        std = torch.tensor(config['std'], device=images.device).view(1, -1, 1, 1)
        shown = (images.detach().float() * std + mean).cpu().permute(0, 2, 3, 1).numpy()
    elif isinstance(display_images, torch.Tensor):
        shown = display_images.detach().float().cpu()
        if shown.dim() == 4 and shown.shape[1] in (1, 3):
            shown = shown.permute(0, 2, 3, 1)
        shown = shown.numpy()
    else:
        shown = np.asarray(display_images, dtype=np.float32)
    if shown.ndim == 3:
        shown = shown[..., None]
    if shown.max() > 1.5:  # 0-255 images
        shown = shown / 255.
    if shown.shape[-1] == 1:
        shown = np.repeat(shown, 3, axis=-1)
    if shown.shape[0] != images.shape[0]:
        raise UsageError(
            f"display_images holds {shown.shape[0]} images but images holds {images.shape[0]}; pass one "
            f"display image per input image.")
    return np.clip(shown, 0., 1.)


def _upsample(spatial: torch.Tensor, size: Tuple[int, int]) -> np.ndarray:
    return F.interpolate(spatial[:, None].float().cpu(), size=size, mode='bilinear', align_corners=False)[:, 0].numpy()


def _normalise(heatmap: np.ndarray) -> np.ndarray:
    """Min-max to [0, 1] for display; a constant map (e.g. CBAM's spatial gate at init, 0.5) keeps its value."""
    span = heatmap.max() - heatmap.min()
    return (heatmap - heatmap.min()) / span if span > 1e-6 else heatmap


def save_attention_figure(
        model: nn.Module,
        images: torch.Tensor,
        out_path: str,
        display_images: Optional[Union[torch.Tensor, np.ndarray]] = None,
        class_names: Optional[Sequence[str]] = None,
        target_layer: Optional[str] = None,
        titles: Optional[Sequence[str]] = None,
        panel_inches: float = 2.0,
        dpi: int = 100,
) -> AttentionCapture:
    """Write a PNG with one row per image: the input, each stage's spatial attention overlaid on it, and a
    Grad-CAM of the top class.

    Args:
        model: a zoo model (or one with BAM/CBAM inserted); evaluated in eval mode, its mode restored after.
        images: (B, C, H, W) batch, already normalised as the model expects.
        out_path: where to write the figure (format from the suffix, e.g. .png).
        display_images: what to draw under the overlays, (B, H, W[, 3]) or (B, 3, H, W), floats in [0, 1]
            or 0-255; default: `images` un-normalised with the model's pretrained_cfg mean/std.
        class_names: names of the classes, for the Grad-CAM titles.
        target_layer: module name for Grad-CAM (default: `choose_cam_layer`'s choice, the deepest feature stage
            whose map is at least 4x4: 'layer4' at 224 px, 'layer2' at 32 px).
        titles: one label per image (e.g. the true class), shown over the input.
    Returns the `capture_attention` result (eval mode) behind the figure, with `cam` the Grad-CAM layer chosen
    (its `note` says when its map is below 4x4).

    Overlays are min-max scaled per panel for visibility; each panel's title gives the stage, the module
    type and count, the map size, and the actual range of the map (mean attention, see module docstring).
    """
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure state is touched

    _check_out_path(out_path)
    if images.shape[0] == 0:
        raise UsageError("the image batch is empty; pass at least one image")
    cam = choose_cam_layer(model, images, target_layer)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            capture = capture_attention(model, images)
        probs = _class_probabilities(model, capture.output)
        heatmaps, classes = grad_cam(model, images, cam.module, classes=probs.argmax(1).tolist())
    finally:
        model.train(was_training)
    capture.cam = cam

    shown = _display_images(model, images, display_images)
    height, width = shown.shape[1:3]
    stages = [s for s in capture.stages.values() if s.spatial is not None]
    columns = 2 + len(stages)
    fig = Figure(figsize=(panel_inches * columns, panel_inches * 1.15 * len(shown)))
    axes = fig.subplots(len(shown), columns, squeeze=False)
    for row, image in enumerate(shown):
        axes[row, 0].imshow(image)
        axes[row, 0].set_title('input' if titles is None else str(titles[row]), fontsize=8)
        for col, stage in enumerate(stages, start=1):
            spatial = stage.spatial[row]
            overlay = _upsample(spatial[None], (height, width))[0]
            count = f'{stage.kind}' if len(stage.modules) == 1 else f'{len(stage.modules)}\u00d7{stage.kind} mean'
            axes[row, col].imshow(image)
            axes[row, col].imshow(_normalise(overlay), cmap='jet', alpha=0.5, vmin=0., vmax=1.)
            axes[row, col].set_title(
                f'{stage.name} {count}\n{spatial.shape[0]}x{spatial.shape[1]} '
                f'[{spatial.min():.3f}, {spatial.max():.3f}]', fontsize=7)
        cls = classes[row]
        label = class_names[cls] if class_names is not None else f'class {cls}'
        axes[row, -1].imshow(image)
        axes[row, -1].imshow(heatmaps[row], cmap='jet', alpha=0.5, vmin=0., vmax=1.)
        axes[row, -1].set_title(
            f'Grad-CAM {cam.name}\n{cam.size[0]}x{cam.size[1]}, top: {label} p={probs[row, cls]:.2f}', fontsize=7)
        for ax in axes[row]:
            ax.axis('off')
    fig.tight_layout()
    fig.savefig(out_path, dpi=dpi)
    return capture

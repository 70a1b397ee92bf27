""" Where BAM goes in a CNN: the placement rule, and how a BAM is attached to the stage it refines.

The rule (the papers' "bottleneck" of a network, written once for every architecture):

    Walk the model's stages in order. A stage gets one BAM on its output when it holds two or more
    convolution / linear layers (a stem holds at most one: a bare activation, norm or conv-norm-act) and the
    stage after it downsamples, or would without output_stride (`bam_models.layers.bam_stage_indices`).

timm describes its stages in `feature_info` (module, channels, reduction): the next stage downsamples when its
natural reduction (reduction x its dilation, `bam_models.layers.stage_dilation`) is larger. For torchvision the
stages are the children of the trunk (`features`, `trunk_output` or `layer1`-`layer4`): the next one
downsamples when it holds a convolution or pooling with stride > 1 or is more dilated, and the channels are
those its first convolution reads. For ResNets this gives layer1-3 (at any output_stride) and for MobileNetV1
blocks.0-3, the zoo's placement; how each BAM is configured is `bam_models.layers.stage_bam`.
"""
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch.nn as nn
from timm.models import FeatureInfo
from timm.models.regnet import RegStage

from bam_models.layers import bam_stage_indices, stage_dilation

__all__ = ['Stage', 'bam_stages', 'attach_after']

_WEIGHT_LAYERS = (nn.Conv2d, nn.Linear)
_POOLS = (nn.MaxPool2d, nn.AvgPool2d)
# torchvision trunks: the attribute holding the stage sequence
_TORCHVISION_TRUNKS = ('features', 'trunk_output')


@dataclass
class Stage:
    """One stage whose output BAM refines."""
    name: str
    module: nn.Module
    channels: int
    successor: Optional[nn.Module]  # the module run right after the stage in its parent


def _weight_layers(module: nn.Module) -> int:
    return sum(isinstance(m, _WEIGHT_LAYERS) for m in module.modules())


def _holds_blocks(module: nn.Module) -> bool:
    """True for a stage of blocks, False for a stem (a bare activation, norm, pooling or conv-norm-act)."""
    return _weight_layers(module) >= 2


def _downsamples(module: nn.Module) -> bool:
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, *_POOLS)):
            stride = m.stride if isinstance(m.stride, tuple) else (m.stride,)
            if max(stride) > 1:
                return True
    return False


def _downsamples_after(stage: nn.Module, successor: nn.Module) -> bool:
    """True where `successor` halves the map or, dilated by output_stride, would have."""
    return _downsamples(successor) or stage_dilation(successor) > stage_dilation(stage)


def _channels_read_by(units: List[nn.Module]) -> Optional[int]:
    """Input channels of the first convolution in `units`: the width of the map that reaches them."""
    return next((m.in_channels for unit in units for m in unit.modules() if isinstance(m, nn.Conv2d)), None)


def _resolve(model: nn.Module, name: str) -> Optional[nn.Module]:
    """The module `name` of a model, or of timm's features_only wrapper of it (which flattens 'a.b' to 'a_b')."""
    for candidate in (name, name.replace('.', '_', 1)):
        try:
            return model.get_submodule(candidate)
        except AttributeError:
            continue
    return None  # cut off by a features_only wrapper's out_indices


def _successor(model: nn.Module, module: nn.Module) -> Optional[nn.Module]:
    """The sibling registered right after `module` in its parent."""
    for parent in model.modules():
        children = list(parent.children())
        for child, nxt in zip(children, children[1:]):
            if child is module:
                return nxt
    return None


def _timm_stages(model: nn.Module, info: List[Dict]) -> List[Stage]:
    modules = [_resolve(model, entry['module']) for entry in info]
    natural = [entry['reduction'] * (stage_dilation(m) if m is not None else 1) for entry, m in zip(info, modules)]
    stages = []
    for index in bam_stage_indices(natural):
        module = modules[index]
        if module is None or not _holds_blocks(module):
            continue
        stages.append(Stage(info[index]['module'], module, info[index]['num_chs'], _successor(model, module)))
    return stages


def _torchvision_units(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    for trunk in _TORCHVISION_TRUNKS:
        if isinstance(getattr(model, trunk, None), nn.Sequential):
            return [(f'{trunk}.{name}', child) for name, child in getattr(model, trunk).named_children()]
    return [(f'layer{i}', getattr(model, f'layer{i}')) for i in range(1, 5) if hasattr(model, f'layer{i}')]


def _torchvision_stages(model: nn.Module) -> List[Stage]:
    units = _torchvision_units(model)
    stages = []
    for index, (name, module) in enumerate(units[:-1]):
        following = [unit for _, unit in units[index + 1:]]
        if not _holds_blocks(module) or not _downsamples_after(module, following[0]):
            continue
        channels = _channels_read_by(following)
        if channels is not None:
            stages.append(Stage(name, module, channels, following[0]))
    return stages


def bam_stages(model: nn.Module) -> List[Stage]:
    """The stages of `model` that get a BAM, by the rule in this module's docstring."""
    info = getattr(model, 'feature_info', None)
    if isinstance(info, FeatureInfo):
        info = info.info
    if isinstance(info, (list, tuple)) and info and isinstance(info[0], dict):
        return _timm_stages(model, list(info))
    return _torchvision_stages(model)


_REFINED_CLASSES: Dict[type, type] = {}


def _refined_class(cls: type) -> type:
    """A subclass of `cls` whose forward refines the original output with `self.bam`."""
    if cls not in _REFINED_CLASSES:
        def forward(self, *args, **kwargs):
            return self.bam(cls.forward(self, *args, **kwargs))
        _REFINED_CLASSES[cls] = type(f'{cls.__name__}WithBam', (cls,), {'forward': forward, '__module__': __name__})
    return _REFINED_CLASSES[cls]


def _runs_children_in_order(module: nn.Module) -> bool:
    return type(module).forward is nn.Sequential.forward or isinstance(module, RegStage)


def attach_after(stage: Stage, bam: nn.Module) -> None:
    """Make `bam` refine the stage's output, registered so that no existing parameter changes its name.

    - a stage that runs its children in order (nn.Sequential, timm's RegStage) gets `bam` as its last child;
    - a container whose forward combines its children (a dense block concatenates them) cannot take one more
      child, so `bam` opens the Sequential that follows it (DenseNet's transition, right before its pooling);
    - any other stage module gets a subclass whose forward applies `self.bam` to the original output.
    """
    module = stage.module
    if _runs_children_in_order(module):
        module.add_module('bam', bam)
        return
    if isinstance(module, (nn.ModuleDict, nn.ModuleList)):
        successor = stage.successor
        if successor is None or not _runs_children_in_order(successor):
            raise TypeError(
                f"insert_bam: stage {stage.name} ({type(module).__name__}) combines its children and is not "
                f"followed by a Sequential to open with BAM; place BAM by hand (bam_models.BAM({stage.channels})).")
        successor._modules = {'bam': bam, **successor._modules}
        return
    module.__class__ = _refined_class(type(module))
    module.bam = bam

""" Checkpoint conversion into the bam_models layout.

Sources:
- `official`: the authors' releases (github.com/Jongchan/attention-module), e.g.
  `RESNET50_IMAGENET_BAM_best.pth.tar` / `RESNET50_CBAM_new_name_wrap.pth`: a dict with `state_dict`, keys
  prefixed `module.`, BAM at `bam{1,2,3}`, CBAM at `layer{L}.{i}.cbam`, FC weights 2-D. Their CIFAR networks
  (`ResidualNet('CIFAR100', ...)`) use the same keys and convert into `resnet*_cifar_bam` / `_cbam`. With or without
  `num_batches_tracked` (absent ones are written as 0, which no eval or momentum-based update reads).
- `pytorchcv`: pytorchcv's `bam_resnet*` / `cbam_resnet*` state dicts (`features.stage{s}.unit{u}...`), and its
  CIFAR trunks `resnext29_*_cifar*` (-> `resnext29_*_cifar`), `preresnet110_cifar*` and `wrn28_*_cifar*`
  (-> the pre-activation `preresnet110_cifar` / `wrn28_*_cifar`, whose blocks name their BNs norm1/norm2).
- `torchvision`: torchvision ResNet / Wide ResNet / ResNeXt state dicts; only the trunk, the attention stays
  freshly initialised (the output loads with a TrunkOnlyWeightsWarning).

Every source key must map to a key of the target model and every model key must be provided (attention keys
excepted for trunk sources), or conversion aborts naming the counts, a few examples and, where the keys fit
another zoo model exactly, that model. The classifier is sized from the checkpoint (a 10-class head converts
into a 10-class model). Untrusted input is read with
`weights_only=True`.
"""
import re
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple, Union

import timm
import torch
import torch.nn as nn

from bam_models.checkpoint import KeyMismatch, create_sized_model, describe_mismatch, head_classes, read_state_dict
from bam_models.errors import CheckpointError, ConversionError
from bam_models.hub import new_or_empty_folder, save_pretrained
from bam_models.hub.load import fitting_architecture
from bam_models.layers import attention_keys

__all__ = ['SOURCES', 'ConversionError', 'read_checkpoint', 'convert_state_dict', 'to_official_state_dict',
           'convert_checkpoint']

SOURCES = ('official', 'pytorchcv', 'torchvision')


# the authors' names <-> ours; {k}: BAM stage, {blk}: 'layer{L}.{i}', {p}: parameter/buffer name
_OFFICIAL_RULES = (
    ('bam{k}.channel_att.gate_c.gate_c_fc_0.{p}', 'layer{k}.bam.channel_gate.fc1.{p}'),
    ('bam{k}.channel_att.gate_c.gate_c_bn_1.{p}', 'layer{k}.bam.channel_gate.bn.{p}'),
    ('bam{k}.channel_att.gate_c.gate_c_fc_final.{p}', 'layer{k}.bam.channel_gate.fc2.{p}'),
    ('bam{k}.spatial_att.gate_s.gate_s_conv_reduce0.{p}', 'layer{k}.bam.spatial_gate.conv_reduce.{p}'),
    ('bam{k}.spatial_att.gate_s.gate_s_bn_reduce0.{p}', 'layer{k}.bam.spatial_gate.bn_reduce.{p}'),
    ('bam{k}.spatial_att.gate_s.gate_s_conv_di_{d}.{p}', 'layer{k}.bam.spatial_gate.conv_dil{d}.{p}'),
    ('bam{k}.spatial_att.gate_s.gate_s_bn_di_{d}.{p}', 'layer{k}.bam.spatial_gate.bn_dil{d}.{p}'),
    ('bam{k}.spatial_att.gate_s.gate_s_conv_final.{p}', 'layer{k}.bam.spatial_gate.conv_out.{p}'),
    ('{blk}.cbam.ChannelGate.mlp.1.{p}', '{blk}.se.channel_gate.fc1.{p}'),
    ('{blk}.cbam.ChannelGate.mlp.3.{p}', '{blk}.se.channel_gate.fc2.{p}'),
    ('{blk}.cbam.SpatialGate.spatial.conv.{p}', '{blk}.se.spatial_gate.conv.{p}'),
    ('{blk}.cbam.SpatialGate.spatial.bn.{p}', '{blk}.se.spatial_gate.bn.{p}'),
    # the trunk is torchvision's layout in both
    ('{trunk}.{p}', '{trunk}.{p}'),
)
_FIELDS = {
    'k': r'(?P<k>\d)', 'd': r'(?P<d>\d)', 'p': r'(?P<p>[a-z_]+)', 'blk': r'(?P<blk>layer\d\.\d+)',
    'trunk': r'(?P<trunk>conv1|bn1|fc|layer\d\.\d+\.(?:conv\d|bn\d|downsample\.[01]))',
}


def _template_regex(template: str) -> re.Pattern:
    parts = re.split(r'(\{\w+\})', template)
    return re.compile(''.join(_FIELDS[p[1:-1]] if p.startswith('{') else re.escape(p) for p in parts) + '$')


def _rename(state_dict: Dict[str, torch.Tensor], rules) -> Tuple[Dict[str, torch.Tensor], List[str]]:
    """Apply the first matching (regex, template-or-function) rule to each key; unmatched keys are returned."""
    out, unknown = {}, []
    for key, value in state_dict.items():
        for pattern, target in rules:
            match = pattern.match(key)
            if match:
                out[target(match) if callable(target) else target.format(**match.groupdict())] = value
                break
        else:
            unknown.append(key)
    return out, unknown


def _official_rules(to_official: bool = False):
    return [(_template_regex(dst if to_official else src), dst if not to_official else src)
            for src, dst in _OFFICIAL_RULES]


def _pytorchcv_rules():
    def sub(pattern: str, fn: Callable[[re.Match], str]):
        return re.compile(pattern + '$'), fn

    unit = r'features\.stage(?P<s>\d)\.unit(?P<u>\d+)\.'
    block = lambda m: f"layer{m['s']}.{int(m['u']) - 1}"  # noqa: E731
    bam = lambda m: f"layer{int(m['s']) - 1}.bam"  # noqa: E731
    return [
        sub(r'features\.init_block\.conv\.(?:conv\.)?weight', lambda m: 'conv1.weight'),
        sub(r'features\.init_block\.(?:conv\.)?bn\.(?P<p>\w+)', lambda m: f"bn1.{m['p']}"),
        sub(unit + r'(?:res_unit\.)?body\.conv(?P<n>\d)\.conv\.weight', lambda m: f"{block(m)}.conv{m['n']}.weight"),
        sub(unit + r'(?:res_unit\.)?body\.conv(?P<n>\d)\.bn\.(?P<p>\w+)', lambda m: f"{block(m)}.bn{m['n']}.{m['p']}"),
        sub(unit + r'(?:res_unit\.)?identity_conv\.conv\.weight', lambda m: f"{block(m)}.downsample.0.weight"),
        sub(unit + r'(?:res_unit\.)?identity_conv\.bn\.(?P<p>\w+)', lambda m: f"{block(m)}.downsample.1.{m['p']}"),
        # pytorchcv puts BAM at the start of the next stage; ours ends the stage it refines
        sub(unit + r'bam\.ch_att\.init_fc\.fc\.(?P<p>\w+)', lambda m: f"{bam(m)}.channel_gate.fc1.{m['p']}"),
        sub(unit + r'bam\.ch_att\.init_fc\.bn\.(?P<p>\w+)', lambda m: f"{bam(m)}.channel_gate.bn.{m['p']}"),
        sub(unit + r'bam\.ch_att\.final_fc\.(?P<p>\w+)', lambda m: f"{bam(m)}.channel_gate.fc2.{m['p']}"),
        sub(unit + r'bam\.sp_att\.init_conv\.conv\.(?P<p>\w+)',
            lambda m: f"{bam(m)}.spatial_gate.conv_reduce.{m['p']}"),
        sub(unit + r'bam\.sp_att\.init_conv\.bn\.(?P<p>\w+)', lambda m: f"{bam(m)}.spatial_gate.bn_reduce.{m['p']}"),
        sub(unit + r'bam\.sp_att\.dil_convs\.conv(?P<d>\d)\.conv\.(?P<p>\w+)',
            lambda m: f"{bam(m)}.spatial_gate.conv_dil{int(m['d']) - 1}.{m['p']}"),
        sub(unit + r'bam\.sp_att\.dil_convs\.conv(?P<d>\d)\.bn\.(?P<p>\w+)',
            lambda m: f"{bam(m)}.spatial_gate.bn_dil{int(m['d']) - 1}.{m['p']}"),
        sub(unit + r'bam\.sp_att\.final_conv\.(?P<p>\w+)', lambda m: f"{bam(m)}.spatial_gate.conv_out.{m['p']}"),
        sub(unit + r'cbam\.ch_gate\.mlp\.fc(?P<n>[12])\.(?P<p>\w+)',
            lambda m: f"{block(m)}.se.channel_gate.fc{m['n']}.{m['p']}"),
        sub(unit + r'cbam\.sp_gate\.conv\.conv\.weight', lambda m: f"{block(m)}.se.spatial_gate.conv.weight"),
        sub(unit + r'cbam\.sp_gate\.conv\.bn\.(?P<p>\w+)', lambda m: f"{block(m)}.se.spatial_gate.bn.{m['p']}"),
        sub(r'output\.(?P<p>weight|bias)', lambda m: f"fc.{m['p']}"),
    ]


def _pytorchcv_preact_rules():
    """pytorchcv's CIFAR PreResNet / WRN -> CifarPreActResNet: pre-activation BNs become norm1/norm2."""
    def sub(pattern: str, fn: Callable[[re.Match], str]):
        return re.compile(pattern + '$'), fn

    unit = r'features\.stage(?P<s>\d)\.unit(?P<u>\d+)\.'
    block = lambda m: f"stages.{int(m['s']) - 1}.blocks.{int(m['u']) - 1}"  # noqa: E731
    return [
        sub(r'features\.init_block\.weight', lambda m: 'stem.conv.weight'),
        sub(unit + r'body\.conv(?P<n>[12])\.conv\.weight', lambda m: f"{block(m)}.conv{m['n']}.weight"),
        sub(unit + r'body\.conv(?P<n>[12])\.bn\.(?P<p>\w+)', lambda m: f"{block(m)}.norm{m['n']}.{m['p']}"),
        sub(unit + r'identity_conv\.weight', lambda m: f"{block(m)}.downsample.conv.weight"),
        sub(r'features\.post_activ\.bn\.(?P<p>\w+)', lambda m: f"norm.{m['p']}"),
        sub(r'output\.(?P<p>weight|bias)', lambda m: f"head.fc.{m['p']}"),
    ]


def _torchvision_rules():
    return [(_template_regex('{trunk}.{p}'), '{trunk}.{p}')]


def read_checkpoint(path: Union[str, Path]) -> Dict[str, torch.Tensor]:
    """The tensors of a checkpoint file, read by `bam_models.checkpoint.read_state_dict` (weights_only=True,
    wrappers and `module.` prefixes removed, impossible values refused); failures are ConversionErrors."""
    try:
        return read_state_dict(path)
    except CheckpointError as e:
        raise ConversionError(str(e)) from None


def _fit_shapes(state_dict, expected) -> Tuple[Dict[str, torch.Tensor], List[str]]:
    """Tensors reshaped where only the layout differs (2-D FC weights for 1x1 convs); the keys that still do
    not fit (shape, or an integer tensor where the model has a float one), in `describe_mismatch`'s format."""
    out, mismatched = {}, []
    for key, value in state_dict.items():
        shape = expected[key].shape
        if value.shape != shape:
            # FCs of the released code are nn.Linear; ours are 1x1 convolutions
            if value.dim() == 2 and tuple(shape) == (*value.shape, 1, 1):
                value = value.reshape(shape)
            else:
                mismatched.append(f'{key}: checkpoint {tuple(value.shape)}, model {tuple(shape)}')
        elif expected[key].is_floating_point() and not value.is_floating_point():  # what loading refuses too
            mismatched.append(f'{key}: checkpoint {value.dtype}, model {expected[key].dtype}')
        out[key] = value
    return out, mismatched


def _source_rules(source: str, model: nn.Module):
    if source == 'pytorchcv' and 'stem.conv.weight' in model.state_dict():
        return _pytorchcv_preact_rules()  # the pre-activation CIFAR layout
    return {'official': _official_rules, 'pytorchcv': _pytorchcv_rules, 'torchvision': _torchvision_rules}[source]()


def _convert(state_dict: Dict[str, torch.Tensor], source: str, arch: str):
    """(converted tensors in model order, KeyMismatch) of `state_dict` against `arch`."""
    state_dict = {k[len('module.'):] if k.startswith('module.') else k: v for k, v in state_dict.items()}
    model = timm.create_model(arch, device='meta')
    converted, unknown = _rename(state_dict, _source_rules(source, model))
    # the classifier is sized from the checkpoint, as `validate` sizes it
    classes = head_classes(converted, model.pretrained_cfg.get('classifier'))
    if classes is not None and classes != model.num_classes:
        model = timm.create_model(arch, device='meta', num_classes=classes)
    expected = model.state_dict()
    unknown += [k for k in converted if k not in expected]
    converted = {k: v for k, v in converted.items() if k in expected}
    if source == 'official':
        for key in expected:
            if key.endswith('num_batches_tracked') and key not in converted:
                converted[key] = torch.zeros((), dtype=torch.long)
    allowed_missing = set(attention_keys(model)) if source == 'torchvision' else set()
    missing = [k for k in expected if k not in converted and k not in allowed_missing]
    converted, mismatched = _fit_shapes(converted, expected)
    return {k: converted[k] for k in expected if k in converted}, KeyMismatch(missing, sorted(unknown), mismatched)


def _matching_zoo_model(state_dict: Dict[str, torch.Tensor], source: str, arch: str) -> Optional[str]:
    """The zoo model the checkpoint converts into without a single mismatch, if there is one."""
    return fitting_architecture(state_dict, arch, fits=lambda name: not _convert(state_dict, source, name)[1])


def convert_state_dict(
        state_dict: Dict[str, torch.Tensor],
        source: str,
        arch: str,
) -> Dict[str, torch.Tensor]:
    """`state_dict` of layout `source` -> bam_models keys of `arch`, checked against the model's keys/shapes; the
    classifier keeps the checkpoint's number of classes."""
    if source not in SOURCES:
        raise ConversionError(f"unknown source {source!r}; expected one of {', '.join(SOURCES)}")
    converted, mismatch = _convert(state_dict, source, arch)
    if mismatch:
        guess = _matching_zoo_model(state_dict, source, arch)
        advice = (f"the keys fit {guess}: pass --arch {guess}" if guess else
                  f"pass the zoo model whose architecture the {source} checkpoint has (`bam-models list`)")
        raise ConversionError(f"{source} checkpoint does not fit {arch}: {describe_mismatch(mismatch)}; {advice}")
    return converted


def to_official_state_dict(
        state_dict: Dict[str, torch.Tensor],
        num_batches_tracked: bool = True,
) -> Dict[str, torch.Tensor]:
    """bam_models ResNet keys -> the authors' layout (`module.` prefix, 2-D FC weights), the inverse of
    `convert_state_dict(..., 'official', arch)`."""
    renamed, unknown = _rename(state_dict, _official_rules(to_official=True))
    if unknown:
        raise ConversionError(f"Keys without an equivalent in the authors' layout: {', '.join(unknown)}.")
    out = {}
    for key, value in renamed.items():
        if key.endswith('num_batches_tracked') and not num_batches_tracked:
            continue
        if re.search(r'(gate_c_fc_0|gate_c_fc_final|ChannelGate\.mlp\.[13])\.weight$', key):
            value = value.flatten(1)
        out[f'module.{key}'] = value
    return out


def convert_checkpoint(
        source: str,
        arch: str,
        in_path: Union[str, Path],
        out_dir: Union[str, Path],
        tag: Optional[str] = None,
) -> Dict[str, object]:
    """Read `in_path`, convert, check that it loads into `arch`, write a Hub folder; returns save_pretrained's
    summary (sha256, size, ...). `out_dir` must be new or empty (`OutputExistsError`), as for every Hub folder
    bam_models writes: anything else in it would be taken for part of the converted model."""
    new_or_empty_folder(out_dir, 'output', 'convert writes a Hub folder that is published or loaded as a whole')
    converted = convert_state_dict(read_checkpoint(in_path), source, arch)
    model_name = f'{arch}.{tag}' if tag else arch
    model = create_sized_model(model_name, converted)
    trunk_only = source == 'torchvision'
    # convert_state_dict admitted exactly the attention keys as missing for a trunk: they keep their fresh init
    fresh = {k: v for k, v in model.state_dict().items() if k in set(attention_keys(model))} if trunk_only else {}
    model.load_state_dict(dict(converted, **fresh))
    description = {
        'official': f"{arch} converted from the authors' checkpoint {Path(in_path).name} "
                    f"(github.com/Jongchan/attention-module, MIT).",
        'pytorchcv': f"{arch} converted from the pytorchcv checkpoint {Path(in_path).name}.",
        'torchvision': f"ONLY THE TRUNK of {arch}, converted from the torchvision checkpoint {Path(in_path).name}: "
                       f"the BAM/CBAM modules are not in this file and start freshly initialised; fine-tune.",
    }[source]
    return save_pretrained(
        model, out_dir, arch_tag=model_name, description=description,
        state_dict=converted if trunk_only else None,
    )

""" insert_bam / insert_cbam on timm and torchvision CNNs: the zoo's placement for ResNets and MobileNetV1, the
placement rule on a dozen other architectures (meta device), real training steps, feature maps, Hub folders. """
import copy
import json
import re
import sys
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch
import torchvision
from torchvision.models.feature_extraction import create_feature_extractor
from torchvision.models.mobilenetv3 import InvertedResidual

from bam_models import BAM, CBAM, insert_bam, insert_cbam
from bam_models.cli import main
from bam_models.train.config import ConfigError, config_from_dict
from bam_models.hub import TrunkOnlyWeightsWarning, insert_into_folder
from bam_models.layers import attention_keys
from bam_models.train.build import check_config

sys.path.insert(0, str(Path(__file__).parent))
from train_helpers import TINY_SETTINGS, make_digits_folder  # noqa: E402


def _shapes(model: torch.nn.Module):
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _modules(model: torch.nn.Module):
    """Every submodule with its name, class and settings (BAM's inplace / input_relu included)."""
    return sorted((name, type(m).__name__, m.extra_repr()) for name, m in model.named_modules() if name)


def _attention(model: torch.nn.Module, cls=BAM):
    return [(name, m.channels) for name, m in model.named_modules() if isinstance(m, cls)]


def _timm_meta(name: str, **kwargs):
    return timm.create_model(name, device='meta', **kwargs)


def _torchvision_meta(builder):
    with torch.device('meta'):
        return builder()


def _call_counts(model: torch.nn.Module, x: torch.Tensor):
    """How often each BAM/CBAM runs in one forward pass, and with which input shape."""
    seen = {}
    hooks = [m.register_forward_hook(lambda mod, args, out, n=n: seen.setdefault(n, []).append(args[0].shape))
             for n, m in model.named_modules() if isinstance(m, (BAM, CBAM))]
    out = model(x)
    for h in hooks:
        h.remove()
    return seen, out


# ------------------------------------------------------------------------------------------- zoo placement

@pytest.mark.parametrize('builder, zoo_name', [
    (lambda: _timm_meta('resnet50'), 'resnet50_bam'),
    (lambda: _timm_meta('resnet18'), 'resnet18_bam'),
    (lambda: _timm_meta('resnext50_32x4d'), 'resnext50_32x4d_bam'),
    (lambda: _timm_meta('mobilenetv1_100'), 'mobilenetv1_100_bam'),
    (lambda: _timm_meta('mobilenetv1_125'), 'mobilenetv1_125_bam'),
])
def test_insert_bam_builds_exactly_the_zoo_modules(builder, zoo_name):
    model, zoo = insert_bam(builder()), _timm_meta(zoo_name)
    # same module names, classes and settings (inplace, input_relu, the block ReLU BAM took over) ...
    assert _modules(model) == _modules(zoo)
    # ... hence the same state-dict keys and shapes and parameter count
    assert _shapes(model) == _shapes(zoo)
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in zoo.parameters())


@pytest.mark.parametrize('builder, zoo_name', [
    (lambda: _torchvision_meta(torchvision.models.resnet50), 'resnet50_bam'),
    (lambda: _torchvision_meta(torchvision.models.resnext50_32x4d), 'resnext50_32x4d_bam'),
    (lambda: _timm_meta('resnet34'), 'resnet34_bam'),
])
def test_insert_bam_gives_the_zoo_state_dict(builder, zoo_name):
    assert _shapes(insert_bam(builder())) == _shapes(_timm_meta(zoo_name))


@pytest.mark.parametrize('builder, zoo_name', [
    (lambda: _torchvision_meta(torchvision.models.resnet50), 'resnet50_cbam'),
    (lambda: _torchvision_meta(torchvision.models.resnet18), 'resnet18_cbam'),
    (lambda: _timm_meta('wide_resnet50_2'), 'wide_resnet50_2_cbam'),
])
def test_insert_cbam_gives_the_zoo_architecture(builder, zoo_name):
    model, zoo = insert_cbam(builder()), _timm_meta(zoo_name)
    assert _shapes(model) == _shapes(zoo)
    if zoo_name.startswith('wide'):
        assert _modules(model) == _modules(zoo)


@pytest.mark.parametrize('insert, zoo_name, tv_builder', [
    (insert_bam, 'resnet18_bam', torchvision.models.resnet18),
    (insert_cbam, 'resnet18_cbam', torchvision.models.resnet18),
])
def test_torchvision_model_with_inserted_attention_computes_the_zoo_model(insert, zoo_name, tv_builder):
    zoo = timm.create_model(zoo_name, zero_init_last=False).eval()
    with torch.no_grad():  # non-trivial BN statistics so the comparison covers every layer
        for module in zoo.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
                module.weight.uniform_(0.5, 1.5)
    converted = insert(tv_builder()).eval()
    converted.load_state_dict(zoo.state_dict())
    x = torch.randn(2, 3, 64, 80)
    torch.testing.assert_close(converted(x), zoo(x), rtol=1e-5, atol=1e-5)
    # a training step as well (CBAM applies the BN before it in both), on copies: it moves running statistics
    steps = [copy.deepcopy(m).train() for m in (converted, zoo)]
    outputs = [m(x) for m in steps]
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-5, atol=1e-5)
    for out in outputs:
        out.square().mean().backward()
    grads = [dict((n, p.grad) for n, p in m.named_parameters()) for m in steps]
    for name, grad in grads[1].items():
        torch.testing.assert_close(grads[0][name], grad, rtol=1e-4, atol=1e-5, msg=name)
    # the inserted attention is part of the computation: disabling it changes the output
    for module in converted.modules():
        if isinstance(module, (BAM, CBAM)):
            module.forward = lambda t: t
    assert not torch.allclose(converted(x), zoo(x), atol=1e-3)


def _randomize_norms(model: torch.nn.Module) -> torch.nn.Module:
    """Non-trivial BN statistics and scales, so that an output comparison covers every layer."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
                module.weight.uniform_(0.5, 1.5)
    return model


def _torchvision_dilated(builder, output_stride: int):
    dilate = {32: [False, False, False], 16: [False, False, True], 8: [False, True, True]}[output_stride]
    return builder(replace_stride_with_dilation=dilate)


@pytest.mark.parametrize('output_stride', [8, 16, 32])
@pytest.mark.parametrize('trunk, attention, library', [
    ('resnet50', 'bam', 'timm'),
    ('resnet18', 'bam', 'timm'),
    ('resnet50', 'bam', 'torchvision'),
    ('resnet18', 'cbam', 'timm'),
    ('resnet50', 'cbam', 'torchvision'),  # torchvision's BasicBlock refuses dilation
])
def test_dilated_insertion_equals_the_dilated_zoo_model(trunk, attention, library, output_stride):
    """insert_bam / insert_cbam on a ResNet at any output_stride: the zoo model's keys (a strict load of its
    weights), for timm its modules too, and its output with those weights."""
    zoo = _randomize_norms(timm.create_model(
        f'{trunk}_{attention}', output_stride=output_stride, zero_init_last=False)).eval()
    insert = insert_bam if attention == 'bam' else insert_cbam
    if library == 'timm':
        plain = timm.create_model(trunk, output_stride=output_stride)
    else:
        plain = _torchvision_dilated(getattr(torchvision.models, trunk), output_stride)
    model = insert(plain).eval()
    if library == 'timm':
        assert _modules(model) == _modules(zoo)  # BAM dilation, inplace, input_relu and the handed-over ReLU
    model.load_state_dict(zoo.state_dict(), strict=True)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), zoo(x), rtol=1e-5, atol=1e-5)
    if attention == 'bam':
        dilations = [m.spatial_gate.conv_dil0.dilation[0] for m in model.modules() if isinstance(m, BAM)]
        # layer1-3 whatever the output_stride; the gate on a map k times denser dilates k times more
        assert dilations == {32: [4, 4, 4], 16: [4, 4, 4], 8: [4, 4, 8]}[output_stride]


# ------------------------------------------------------------------------------ the rule, beyond the zoo

# (builder, BAM modules with their channels): the architectures' published stage widths, one BAM before each
# downsampling; the stem and the last stage get none
BAM_LAYOUTS = {
    'timm convnext_tiny': (lambda: _timm_meta('convnext_tiny'),
                           [('stages.0.bam', 96), ('stages.1.bam', 192), ('stages.2.bam', 384)]),
    'timm efficientnet_b0': (lambda: _timm_meta('efficientnet_b0'),
                             [('blocks.0.bam', 16), ('blocks.1.bam', 24), ('blocks.2.bam', 40), ('blocks.4.bam', 112)]),
    'timm regnety_008': (lambda: _timm_meta('regnety_008'), [('s1.bam', 64), ('s2.bam', 128), ('s3.bam', 320)]),
    'timm mobilenetv3_large_100': (lambda: _timm_meta('mobilenetv3_large_100'),
                                   [('blocks.0.bam', 16), ('blocks.1.bam', 24), ('blocks.2.bam', 40),
                                    ('blocks.4.bam', 112)]),
    'timm densenet121': (lambda: _timm_meta('densenet121'),
                         [('features.transition1.bam', 256), ('features.transition2.bam', 512),
                          ('features.transition3.bam', 1024)]),
    'timm cspresnet50': (lambda: _timm_meta('cspresnet50'),
                         [('stages.0.bam', 128), ('stages.1.bam', 256), ('stages.2.bam', 512)]),
    'torchvision convnext_tiny': (lambda: _torchvision_meta(torchvision.models.convnext_tiny),
                                  [('features.1.bam', 96), ('features.3.bam', 192), ('features.5.bam', 384)]),
    'torchvision efficientnet_b0': (lambda: _torchvision_meta(torchvision.models.efficientnet_b0),
                                    [('features.1.bam', 16), ('features.2.bam', 24), ('features.3.bam', 40),
                                     ('features.5.bam', 112)]),
    'torchvision efficientnet_v2_s': (lambda: _torchvision_meta(torchvision.models.efficientnet_v2_s),
                                      [('features.1.bam', 24), ('features.2.bam', 48), ('features.3.bam', 64),
                                       ('features.5.bam', 160)]),
    # torchvision computes RegNet widths with tensor ops, which the meta device cannot run
    'torchvision regnet_x_400mf': (lambda: torchvision.models.regnet_x_400mf().to('meta'),
                                   [('trunk_output.block1.bam', 32), ('trunk_output.block2.bam', 64),
                                    ('trunk_output.block3.bam', 160)]),
    'torchvision mobilenet_v2': (lambda: _torchvision_meta(torchvision.models.mobilenet_v2),
                                 [('features.1.bam', 16), ('features.3.bam', 24), ('features.6.bam', 32),
                                  ('features.13.bam', 96)]),
    'torchvision mobilenet_v3_large': (lambda: _torchvision_meta(torchvision.models.mobilenet_v3_large),
                                       [('features.1.bam', 16), ('features.3.bam', 24), ('features.6.bam', 40),
                                        ('features.12.bam', 112)]),
    'torchvision densenet121': (lambda: _torchvision_meta(torchvision.models.densenet121),
                                [('features.transition1.bam', 256), ('features.transition2.bam', 512),
                                 ('features.transition3.bam', 1024)]),
}


@pytest.mark.parametrize('arch', list(BAM_LAYOUTS))
def test_insert_bam_places_one_bam_before_every_downsampling(arch):
    builder, layout = BAM_LAYOUTS[arch]
    plain = builder()
    model = insert_bam(builder())
    assert _attention(model) == layout
    # every trunk tensor keeps its name and shape; what is new is exactly the BAM modules
    new = set(_shapes(model)) - set(_shapes(plain))
    assert new == set(attention_keys(model)) and set(_shapes(plain)) <= set(_shapes(model))
    assert all(_shapes(model)[k] == shape for k, shape in _shapes(plain).items())
    # each BAM runs once per forward pass, on a map with its channels, and the network still runs
    seen, out = _call_counts(model, torch.empty(1, 3, 224, 224, device='meta'))
    assert {name: [s[1] for s in shapes] for name, shapes in seen.items()} == {n: [c] for n, c in layout}
    assert out.shape == (1, 1000)


# (builder, replace_existing, number of CBAM modules, the first three)
CBAM_LAYOUTS = {
    'timm resnet50': (lambda: _timm_meta('resnet50'), False, 16, [('layer1.0.se', 256), ('layer1.1.se', 256),
                                                                 ('layer1.2.se', 256)]),
    'timm mobilenetv1_100': (lambda: _timm_meta('mobilenetv1_100'), False, 13,
                             [('blocks.0.0.se', 32), ('blocks.1.0.se', 64), ('blocks.1.1.se', 128)]),
    'timm efficientnet_b0': (lambda: _timm_meta('efficientnet_b0'), True, 16,
                             [('blocks.0.0.se', 32), ('blocks.1.0.se', 96), ('blocks.1.1.se', 144)]),
    'timm regnetx_002': (lambda: _timm_meta('regnetx_002'), False, 13,
                         [('s1.b1.se', 24), ('s2.b1.se', 56), ('s3.b1.se', 152)]),
    'timm ghostnet_100': (lambda: _timm_meta('ghostnet_100'), True, 7,
                          [('blocks.3.0.se', 72), ('blocks.4.0.se', 120), ('blocks.6.3.se', 480)]),
    'torchvision efficientnet_b0': (lambda: _torchvision_meta(torchvision.models.efficientnet_b0), True, 16,
                                    [('features.1.0.block.1', 32), ('features.2.0.block.2', 96),
                                     ('features.2.1.block.2', 144)]),
    'torchvision mobilenet_v3_large': (lambda: _torchvision_meta(torchvision.models.mobilenet_v3_large), True, 8,
                                       [('features.4.block.2', 72), ('features.5.block.2', 120),
                                        ('features.6.block.2', 120)]),
}


@pytest.mark.parametrize('arch', list(CBAM_LAYOUTS))
def test_insert_cbam_fills_every_attention_slot(arch):
    builder, replace, count, first = CBAM_LAYOUTS[arch]
    model = insert_cbam(builder(), replace_existing=replace)
    found = _attention(model, CBAM)
    assert len(found) == count and found[:3] == first
    seen, out = _call_counts(model, torch.empty(1, 3, 224, 224, device='meta'))
    assert sorted(seen) == sorted(n for n, _ in found) and all(len(s) == 1 for s in seen.values())
    assert out.shape == (1, 1000)


def test_insert_cbam_replaces_se_modules_only_when_asked():
    with pytest.raises(ValueError, match=r'attention module \(SqueezeExcite in 16 of 16 slots\).*replace_existing'):
        insert_cbam(_timm_meta('efficientnet_b0'))
    with pytest.raises(ValueError, match='already have an attention'):
        insert_cbam(_timm_meta('seresnet50'))
    model = insert_cbam(_timm_meta('seresnet50'), replace_existing=True)
    assert _shapes(model) == _shapes(_timm_meta('resnet50_cbam'))


@pytest.mark.parametrize('builder, name', [
    (lambda: _timm_meta('convnext_atto'), 'ConvNeXt'),
    (lambda: _timm_meta('densenet121'), 'DenseNet'),
    (lambda: _torchvision_meta(torchvision.models.mobilenet_v2), 'MobileNetV2'),
    (lambda: _timm_meta('vit_tiny_patch16_224'), 'VisionTransformer'),
])
def test_insert_cbam_without_a_slot_says_which_and_why(builder, name):
    with pytest.raises(TypeError, match=rf'does not support .*{name}: none of its blocks has an attention slot.*'
                                        r'ConvNeXt, DenseNet, VGG.*no channel attention.*insert_bam'):
        insert_cbam(builder())


def test_insert_twice_and_unsupported_models_fail_clearly():
    model = insert_bam(torchvision.models.resnet18())
    with pytest.raises(ValueError, match='already has BAM'):
        insert_bam(model)
    with pytest.raises(ValueError, match='already have an attention module \\(CBAM\\)'):
        insert_cbam(insert_cbam(_timm_meta('efficientnet_b0'), replace_existing=True), replace_existing=True)
    with pytest.raises(TypeError, match='does not support .*VGG.*no stage of blocks followed by a downsampling'):
        insert_bam(_torchvision_meta(torchvision.models.vgg11))
    with pytest.raises(TypeError, match='does not support .*VisionTransformer'):
        insert_bam(_timm_meta('vit_tiny_patch16_224'))


def test_inserted_modules_follow_device_dtype_mode_and_args():
    model = insert_bam(torchvision.models.resnet18().double().eval(), bam_args=dict(fusion='sum'))
    assert not model.layer2.bam.training and model.layer2.bam.fusion == 'sum'
    assert {p.dtype for p in model.layer2.bam.parameters()} == {torch.float64}
    model = insert_cbam(_timm_meta('efficientnet_b0'), cbam_args=dict(rd_ratio=1 / 8), replace_existing=True)
    assert {m.rd_channels * 8 == m.channels for m in model.modules() if isinstance(m, CBAM)} == {True}
    assert {p.device.type for p in model.parameters()} == {'meta'}


@pytest.mark.parametrize('builder', [
    lambda: timm.create_model('convnext_atto'),
    lambda: _timm_meta('efficientnet_b0'),
    lambda: _torchvision_meta(torchvision.models.densenet121),
], ids=['convnext_atto', 'meta-efficientnet_b0', 'meta-tv_densenet121'])
def test_plain_checkpoint_loads_with_exactly_the_attention_keys_missing(builder):
    plain = builder()
    model = insert_bam(builder())
    result = model.load_state_dict(plain.state_dict(), strict=False)
    # (BatchNorm fills in a missing num_batches_tracked itself and does not report it)
    expected = [k for k in attention_keys(model) if not k.endswith('num_batches_tracked')]
    assert sorted(result.missing_keys) == sorted(expected) and expected
    assert not result.unexpected_keys
    if next(plain.parameters()).device.type != 'meta':  # the trunk weights are the plain checkpoint's
        for key, value in plain.state_dict().items():
            torch.testing.assert_close(model.state_dict()[key], value)


# ----------------------------------------------------------------------------------------- real models

@pytest.mark.parametrize('insert, builder', [
    (insert_bam, lambda: timm.create_model('convnext_atto')),
    (insert_bam, lambda: torchvision.models.mobilenet_v3_small()),
    (insert_cbam, lambda: timm.create_model('mobilenetv3_small_050')),
], ids=['bam-timm-convnext_atto', 'bam-tv-mobilenet_v3_small', 'cbam-timm-mobilenetv3_small_050'])
def test_training_step_at_a_non_square_size(insert, builder):
    torch.manual_seed(0)
    kwargs = dict(replace_existing=True) if insert is insert_cbam else {}
    model = insert(builder(), **kwargs).train()
    x = torch.randn(2, 3, 64, 96)
    model(x).logsumexp(1).mean().backward()
    attention = [m for m in model.modules() if isinstance(m, (BAM, CBAM))]
    assert attention
    for module in attention:
        grads = [p.grad for p in module.parameters() if p.requires_grad]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)
        assert any(g.abs().sum() > 0 for g in grads)


def test_features_only_and_forward_intermediates_return_refined_maps():
    torch.manual_seed(0)
    features = insert_bam(timm.create_model('convnext_atto', features_only=True)).eval()
    refined = {}
    for name, module in features.named_modules():
        if isinstance(module, BAM):
            module.register_forward_hook(lambda mod, args, out, n=name: refined.__setitem__(n, out.clone()))
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        maps = features(x)
    assert sorted(refined) == ['stages_0.bam', 'stages_1.bam', 'stages_2.bam']
    for index, name in enumerate(sorted(refined)):
        torch.testing.assert_close(maps[index], refined[name])
    # forward_intermediates of the full model gives the same refined maps
    model = insert_bam(timm.create_model('convnext_atto')).eval()
    # the features_only wrapper flattens `stem.0` / `stages.0` to `stem_0` / `stages_0`
    renamed = {re.sub(r'^(stem|stages)_(\d+)', r'\1.\2', k): v for k, v in features.state_dict().items()}
    result = model.load_state_dict(renamed, strict=False)
    assert not result.unexpected_keys and all(k.startswith('head.') for k in result.missing_keys)
    with torch.no_grad():
        intermediates = model.forward_intermediates(x, intermediates_only=True)
    for a, b in zip(intermediates, maps):
        torch.testing.assert_close(a, b)


def test_torchvision_feature_extractor_returns_refined_maps():
    model = insert_bam(torchvision.models.mobilenet_v3_small()).eval()
    extractor = create_feature_extractor(
        model, return_nodes={'features.3': 'stride8', 'features.8': 'stride16'},
        tracer_kwargs=dict(leaf_modules=[BAM, CBAM]))
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        seen, _ = _call_counts(model, x)
        maps = extractor(x)
    assert sorted(seen) == ['features.1.bam', 'features.3.bam', 'features.8.bam']
    # the map at features.3 is that block's output after its BAM: recompute it by hand
    with torch.no_grad():
        block_out = InvertedResidual.forward(model.features[3], model.features[:3](x))
        torch.testing.assert_close(maps['stride8'], model.features[3].bam(block_out))


# ----------------------------------------------------------------------------------- Hub folders and CLI

def test_insert_folder_loads_with_local_dir_and_rebuilds_the_attention(tmp_path):
    out = tmp_path / 'convnext_atto_bam'
    info = insert_into_folder('convnext_atto', 'bam', out)
    config = json.loads((out / 'config.json').read_text())
    assert config['architecture'] == 'with_attention'
    assert config['model_args']['base_model'] == 'convnext_atto' and config['model_args']['attention'] == 'bam'
    assert config['pretrained_cfg']['classifier'] == 'head.fc'  # the base model's cfg
    saved = safetensors.torch.load_file(out / 'model.safetensors')
    model = timm.create_model(f'local-dir:{out}', pretrained=True)
    assert _attention(model) == [('stages.0.bam', 40), ('stages.1.bam', 80), ('stages.2.bam', 160)]
    assert sum(p.numel() for p in model.parameters()) == info['num_params']
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, saved[key])
    ten = timm.create_model(f'local-dir:{out}', pretrained=True, num_classes=10)
    assert ten.get_classifier().out_features == 10
    torch.testing.assert_close(ten.state_dict()['stages.1.bam.channel_gate.fc1.weight'],
                               saved['stages.1.bam.channel_gate.fc1.weight'])
    features = timm.create_model(f'local-dir:{out}', features_only=True)
    assert [f.shape[1] for f in features(torch.randn(1, 3, 64, 96))] == [40, 80, 160, 320]


def test_with_attention_starts_from_a_plain_trunk_checkpoint(tmp_path):
    plain = timm.create_model('mobilenetv3_small_050')
    torch.save(plain.state_dict(), tmp_path / 'plain.pth')
    with pytest.warns(TrunkOnlyWeightsWarning, match='BAM/CBAM tensors are freshly initialised'):
        model = timm.create_model('with_attention', base_model='mobilenetv3_small_050', pretrained=True,
                                  pretrained_cfg_overlay=dict(file=str(tmp_path / 'plain.pth')))
    torch.testing.assert_close(model.conv_stem.weight, plain.conv_stem.weight)
    assert _attention(model)[0] == ('blocks.0.bam', 8)  # width 0.5: 8 channels at the first stage


def test_cli_insert_writes_a_folder_and_refuses_a_non_empty_one(tmp_path, capsys):
    out = tmp_path / 'out'
    assert main(['insert', 'mobilenetv3_small_050', str(out), '--attention', 'cbam', '--replace-existing']) == 0
    assert 'local-dir:' in capsys.readouterr().out
    model = timm.create_model(f'local-dir:{out}')
    assert len(_attention(model, CBAM)) == 11  # one per bneck block (MobileNetV3-Small has 11)
    assert main(['insert', 'mobilenetv3_small_050', str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith('error: ') and 'not an empty folder' in err and err.count('\n') == 1
    assert main(['insert', 'convnext_atto', str(tmp_path / 'cbam'), '--attention', 'cbam']) == 2
    assert 'none of its blocks has an attention slot' in capsys.readouterr().err
    assert main(['insert', 'convnext_tinyy', str(tmp_path / 'typo')]) == 2
    assert 'did you mean convnext_tiny' in capsys.readouterr().err


def test_training_config_accepts_an_inserted_folder(tmp_path):
    insert_into_folder('mobilenetv3_small_050', 'bam', tmp_path / 'hub')
    check_config(config_from_dict({'model': {'name': f'local-dir:{tmp_path / "hub"}'}}))
    with pytest.raises(ConfigError, match='has no config.json'):
        check_config(config_from_dict({'model': {'name': f'local-dir:{tmp_path / "missing"}'}}))


def test_training_cli_fine_tunes_an_inserted_folder(tmp_path):
    data = make_digits_folder(tmp_path / 'digits')
    insert_into_folder('mobilenetv3_small_050', 'bam', tmp_path / 'start')
    settings = [s for s in TINY_SETTINGS if not s.startswith(('model.name', 'schedule.epochs'))] + [
        f'model.name=local-dir:{tmp_path / "start"}', 'model.pretrained=true', f'data.dataset={data}',
        'data.val_split=val', 'schedule.epochs=1', f'train.output={tmp_path / "run"}']
    assert main(['train'] + [arg for s in settings for arg in ('--set', s)]) == 0
    hub = tmp_path / 'run' / 'hub'
    config = json.loads((hub / 'config.json').read_text())
    assert config['architecture'] == 'with_attention' and config['num_classes'] == 10
    assert config['model_args']['base_model'] == 'mobilenetv3_small_050'
    tuned = timm.create_model(f'local-dir:{hub}', pretrained=True)
    assert _attention(tuned) == _attention(timm.create_model(f'local-dir:{tmp_path / "start"}'))
    best = torch.load(tmp_path / 'run' / 'best.pth', weights_only=True)['state_dict']
    for key, value in tuned.state_dict().items():
        torch.testing.assert_close(value, best[key])

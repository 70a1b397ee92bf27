""" The timm model contract over the whole zoo, and parameter counts against independent computations. """
import fnmatch

import pytest
import timm
import torch
import torch.nn as nn
from pytorchcv.model_provider import get_model as pytorchcv_model
from timm.models import create_feature_extractor, get_graph_node_names, group_parameters

from timm.models.resnet import BasicBlock, Bottleneck

import bam_models
from bam_models._compat import DepthwiseSeparableConv
from bam_models.layers import BAM, CBAM, attention_keys
from bam_models.models import AttentionResNet
from bam_models.models.cifar_preresnet import PreActBasicAttn

_CIFAR_NETS = ['resnet18_cifar', 'resnet34_cifar', 'resnet50_cifar', 'resnet101_cifar',
               'resnext29_8x64d_cifar', 'resnext29_16x64d_cifar', 'preresnet110_cifar', 'wrn28_8_cifar',
               'wrn28_10_cifar']
PLAIN_MODELS = _CIFAR_NETS + ['wide_resnet18_150', 'wide_resnet18_200']
BAM_MODELS = [
    'resnet18_bam', 'resnet34_bam', 'resnet50_bam', 'resnet101_bam', 'resnet152_bam',
    'wide_resnet50_2_bam', 'wide_resnet101_2_bam',
    'resnext50_32x4d_bam', 'resnext101_32x4d_bam', 'resnext101_32x8d_bam',
    'mobilenetv1_100_bam', 'mobilenetv1_125_bam',
    'wide_resnet18_150_bam', 'wide_resnet18_200_bam',
] + [f'{n}_bam' for n in _CIFAR_NETS]
CBAM_MODELS = [
    'resnet18_cbam', 'resnet34_cbam', 'resnet50_cbam', 'resnet101_cbam', 'resnet152_cbam',
    'wide_resnet50_2_cbam', 'wide_resnet101_2_cbam', 'resnext50_32x4d_cbam', 'resnext101_32x4d_cbam',
    'resnext101_32x8d_cbam', 'mobilenetv1_100_cbam', 'wide_resnet18_150_cbam', 'wide_resnet18_200_cbam',
] + [f'{n}_cbam' for n in _CIFAR_NETS]
ZOO = BAM_MODELS + CBAM_MODELS + PLAIN_MODELS
ATTENTION_ZOO = BAM_MODELS + CBAM_MODELS
# the per-model contract runs over the first zoo and one representative of each family added since, which keeps
# the suite fast; the counts, placements and keys are checked for every model
CONTRACT = [
    'resnet18_bam', 'resnet34_bam', 'resnet50_bam', 'resnet101_bam', 'resnet152_bam', 'wide_resnet50_2_bam',
    'wide_resnet101_2_bam', 'resnext50_32x4d_bam', 'resnext101_32x4d_bam', 'resnext101_32x8d_bam',
    'mobilenetv1_100_bam', 'mobilenetv1_125_bam', 'resnet18_cbam', 'resnet34_cbam', 'resnet50_cbam',
    'resnet101_cbam', 'resnet152_cbam', 'wide_resnet50_2_cbam', 'resnext50_32x4d_cbam', 'resnext101_32x8d_cbam',
    # one per new family
    'wide_resnet18_150_bam', 'wide_resnet18_150_cbam', 'mobilenetv1_100_cbam', 'resnet18_cifar_bam',
    'resnet18_cifar_cbam', 'resnext29_8x64d_cifar_bam', 'preresnet110_cifar_bam', 'wrn28_8_cifar_cbam',
    'wrn28_8_cifar',
]
# one model per family for the expensive checks (real forward/backward, scripting, tracing); the CIFAR
# families: the authors' 4-stage CIFAR ResNet, the 3-stage ResNeXt, the pre-activation nets
FAMILIES = ['resnet18_bam', 'resnet18_cbam', 'resnext50_32x4d_bam', 'mobilenetv1_100_bam', 'mobilenetv1_100_cbam',
            'resnet18_cifar_cbam', 'resnext29_8x64d_cifar_bam', 'preresnet110_cifar_bam']
SMALL = (2, 3, 64, 64)
CIFAR_SMALL = (2, 3, 32, 32)  # the CIFAR networks' native size, a quarter of the compute


def _small(name: str):
    return CIFAR_SMALL if '_cifar' in name else SMALL
ATTENTION_BLOCKS = (BasicBlock, Bottleneck, PreActBasicAttn, DepthwiseSeparableConv)


def _plain_trunk(name: str) -> str:
    return name.rsplit('_', 1)[0]


def _bam_params(channels: int) -> int:
    """BAM as the authors released it, by hand: channel MLP with BN, spatial branch with two dilated 3x3 convs,
    all with biases."""
    c = channels // 16
    channel = channels * c + c + 2 * c + c * channels + channels
    spatial = (channels * c + c + 2 * c) + 2 * (c * c * 9 + c + 2 * c) + (c + 1)
    return channel + spatial


def _cbam_params(channels: int) -> int:
    """CBAM as the authors released it, by hand: shared MLP with biases, 7x7 conv 2->1 without bias, BN(1)."""
    c = channels // 16
    return channels * c + c + c * channels + channels + 2 * 49 + 2


def _resnet_params(block: str, layers, channels, stem_kernel: int, num_classes: int, cardinality: int = 1,
                   base_width: int = 64) -> int:
    """Closed-form count of a post-activation ResNet / ResNeXt (torchvision's layout): a stem conv with 64
    channels + BN, stages of basic or bottleneck blocks (1x1 conv + BN shortcut where the shape changes), fc."""
    total, in_chs = 3 * 64 * stem_kernel ** 2 + 2 * 64, 64
    for stage, (depth, planes) in enumerate(zip(layers, channels)):
        for index in range(depth):
            if block == 'basic':
                out = planes
                total += in_chs * out * 9 + out * out * 9 + 4 * out
            else:
                out, width = planes * 4, planes * base_width // 64 * cardinality
                total += in_chs * width + width * width // cardinality * 9 + width * out + 4 * width + 2 * out
            if index == 0 and (in_chs != out or stage > 0):
                total += in_chs * out + 2 * out
            in_chs = out
    return total + in_chs * num_classes + num_classes


def _preact_params(layers, channels, num_classes: int = 100) -> int:
    """Closed-form count of a CIFAR pre-activation ResNet: 3x3 stem conv (16 channels), blocks BN-conv-BN-conv
    with a 1x1 conv shortcut where the shape changes, final BN, fc."""
    total, in_chs = 3 * 16 * 9, 16
    for depth, out in zip(layers, channels):
        for _ in range(depth):
            total += 2 * in_chs + in_chs * out * 9 + 2 * out + out * out * 9 + (in_chs * out if in_chs != out else 0)
            in_chs = out
    return total + 2 * in_chs + in_chs * num_classes + num_classes


_DEPTHS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}
PLAIN_COUNTS = {
    **{f'resnet{d}_cifar': _resnet_params('basic' if d < 50 else 'bottleneck', layers, (64, 128, 256, 512), 3, 100)
       for d, layers in _DEPTHS.items()},
    **{f'resnext29_{c}x64d_cifar': _resnet_params('bottleneck', (3, 3, 3), (64, 128, 256), 3, 100, c, 64)
       for c in (8, 16)},
    'preresnet110_cifar': _preact_params((18, 18, 18), (16, 32, 64)),
    'wrn28_8_cifar': _preact_params((4, 4, 4), (128, 256, 512)),
    'wrn28_10_cifar': _preact_params((4, 4, 4), (160, 320, 640)),
    'wide_resnet18_150': _resnet_params('basic', (2, 2, 2, 2), (96, 192, 384, 768), 7, 1000),
    'wide_resnet18_200': _resnet_params('basic', (2, 2, 2, 2), (128, 256, 512, 1024), 7, 1000),
}


def _blocks(model: nn.Module):
    return [m for m in model.modules() if isinstance(m, ATTENTION_BLOCKS)]


def _cbam_widths(block: nn.Module) -> list:
    """Channels of each CBAM in a block: CBAM refines the residual branch's output, except in MobileNet, which
    has one after each convolution (the depthwise and the pointwise)."""
    if isinstance(block, DepthwiseSeparableConv):
        return [block.conv_dw.out_channels, block.conv_pw.out_channels]
    return [(block.conv3 if hasattr(block, 'conv3') else block.conv2).out_channels]


def _expected_params(name: str) -> int:
    plain = timm.create_model(_plain_trunk(name), device='meta')
    total = _count(plain)
    if name.endswith('_cbam'):
        return total + sum(_cbam_params(c) for b in _blocks(plain) for c in _cbam_widths(b))
    channels = [info['num_chs'] for info in plain.feature_info]
    if name.startswith('mobilenetv1'):
        stage_chs = channels[:4]  # before each stride-2 stage
    else:
        stage_chs = channels[1:-1]  # every stage but the last (the first entry is the stem)
    return total + sum(_bam_params(c) for c in stage_chs)


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _num_classes(name: str) -> int:
    return timm.create_model(name, device='meta').pretrained_cfg['num_classes']


def test_registry_lists_exactly_the_zoo():
    assert sorted(timm.list_models('*_bam')) == sorted(BAM_MODELS)
    assert sorted(timm.list_models('*_cbam')) == sorted(CBAM_MODELS)
    assert sorted(bam_models.list_zoo_models()) == sorted(ZOO)


@pytest.mark.parametrize('name', ATTENTION_ZOO)
def test_param_count_matches_independent_computation(name):
    model = timm.create_model(name, device='meta')
    assert _count(model) == _expected_params(name)


@pytest.mark.parametrize('name', PLAIN_MODELS)
def test_plain_trunk_count_matches_closed_form(name):
    assert _count(timm.create_model(name, device='meta')) == PLAIN_COUNTS[name]


@pytest.mark.parametrize('ours, reference, expected', [
    ('wrn28_10_cifar', 'wrn28_10_cifar100', 36_536_884),
    ('resnext29_16x64d_cifar', 'resnext29_16x64d_cifar100', 68_247_460),
    ('preresnet110_cifar', 'preresnet110_cifar100', 1_736_372),
])
def test_cifar_trunks_equal_pytorchcv_parameter_for_parameter(ours, reference, expected):
    with torch.device('meta'):
        theirs = pytorchcv_model(reference, pretrained=False)
    model = timm.create_model(ours, device='meta')
    assert _count(model) == _count(theirs) == expected
    # the same tensors up to naming: the multisets of parameter shapes agree
    assert sorted(tuple(p.shape) for p in model.parameters()) == \
        sorted(tuple(p.shape) for p in theirs.parameters())


@pytest.mark.parametrize('name, expected', [('wide_resnet18_150', 25_875_816), ('wide_resnet18_200', 45_618_216)])
def test_wide_resnet18_matches_the_papers_count(name, expected):
    """Both papers: WideResNet18 (widen=1.5) 25.88M, (widen=2.0) 45.62M parameters."""
    assert _count(timm.create_model(name, device='meta')) == expected


@pytest.mark.parametrize('name, expected', [
    ('resnet50_bam', 25_915_099), ('resnet50_cbam', 28_089_624), ('resnet18_bam', 11_712_503),
])
def test_param_count_matches_authors(name, expected):
    assert _count(timm.create_model(name, device='meta')) == expected


@pytest.mark.parametrize('depth', [18, 34, 50, 101, 152])
@pytest.mark.parametrize('attn', ['bam', 'cbam'])
def test_param_count_matches_pytorchcv(depth, attn):
    with torch.device('meta'):
        reference = pytorchcv_model(f'{attn}_resnet{depth}', pretrained=False)
    assert _count(timm.create_model(f'resnet{depth}_{attn}', device='meta')) == _count(reference)


def test_mobilenetv1_bam_matches_paper_count():
    count = _count(timm.create_model('mobilenetv1_100_bam', device='meta'))
    assert round(count / 1e6, 2) == 4.32
    assert round(_count(timm.create_model('mobilenetv1_100', device='meta')) / 1e6, 2) == 4.23


# MobileNetV1's 13 depthwise-separable blocks at width 1.0: the depthwise conv keeps the block's input width,
# the pointwise conv sets its output width
_MOBILENETV1_BLOCK_INPUTS = (32, 64, 128, 128, 256, 256, 512, 512, 512, 512, 512, 512, 1024)


def test_mobilenetv1_cbam_matches_paper_count():
    """The CBAM paper's MobileNet table: 4.23M plain, 5.07M with CBAM, matched only by a CBAM after both
    convolutions of every block (26 modules); by hand from the channel widths, plus the plain trunk."""
    outputs = _MOBILENETV1_BLOCK_INPUTS[1:] + (1024,)
    by_hand = 4_231_976 + sum(_cbam_params(c) for c in _MOBILENETV1_BLOCK_INPUTS + outputs)
    model = timm.create_model('mobilenetv1_100_cbam', device='meta')
    assert _count(timm.create_model('mobilenetv1_100', device='meta')) == 4_231_976
    assert _count(model) == by_hand == 5_074_714
    assert round(_count(model) / 1e6, 2) == 5.07
    assert sum(isinstance(m, CBAM) for m in model.modules()) == 26


def test_mobilenetv1_cbam_after_pointwise_conv_keeps_the_skip():
    """A block with a skip (stride 1, equal widths; MobileNetV1's own blocks have none) refines the pointwise
    branch before the add and leaves the shortcut alone, in place or not, in eval and in training."""
    from functools import partial
    from bam_models._compat import decode_arch_def
    from bam_models.models.bam_mobilenetv1 import BamMobileNetV1, DepthwiseSeparableAttnPw

    def build(inplace: bool) -> BamMobileNetV1:
        torch.manual_seed(0)
        return BamMobileNetV1(
            block_args=decode_arch_def([['ds_r2_k3_s1_c32_se0.0625']]), num_features=0, stem_size=32,
            num_classes=10, bam_stages=(), se_layer=partial(CBAM, inplace=inplace),
            pw_attn_layer=partial(CBAM, inplace=inplace)).eval()

    model, reference = build(True), build(False)
    block = model.blocks[0][1]
    assert isinstance(block, DepthwiseSeparableAttnPw) and block.has_skip and block.attn_pw.channels == 32
    x = torch.randn(2, 32, 16, 16)
    with torch.no_grad():
        branch = block.attn_pw(block.bn2(block.conv_pw(block.se(block.bn1(block.conv_dw(x))))))
        shortcut = x.clone()
        torch.testing.assert_close(block(x), shortcut + branch)
        torch.testing.assert_close(x, shortcut)  # the block input, which is the shortcut, is not written
        images = torch.randn(2, 3, 32, 32)
        torch.testing.assert_close(model(images), reference(images))
    model.train()(images).sum().backward()


@pytest.mark.parametrize('name', ZOO)
def test_attention_placement(name):
    model = timm.create_model(name, device='meta')
    if name.endswith('_cbam'):
        blocks = _blocks(model)
        assert blocks
        for block in blocks:
            if isinstance(block, DepthwiseSeparableConv):  # timm's MobileNet slot, after the depthwise conv
                assert isinstance(block.attn_pw, CBAM)  # and one after the pointwise conv
                assert block.attn_pw.channels == block.conv_pw.out_channels
            assert isinstance(block.se, CBAM) and block.se.channels == _cbam_widths(block)[0]
        assert not any(isinstance(m, BAM) for m in model.modules())
        return
    bams = {n: m for n, m in model.named_modules() if isinstance(m, BAM)}
    if name in PLAIN_MODELS:
        assert not bams and not any(isinstance(m, CBAM) for m in model.modules())
    elif name.startswith('mobilenetv1'):
        assert list(bams) == [f'blocks.{i}.bam' for i in range(4)]
        assert [m.channels for m in bams.values()] == [f['num_chs'] for f in model.feature_info][:4]
    elif name.startswith(('preresnet', 'wrn')):  # three stages: BAM after the first two
        assert list(bams) == ['stages.0.blocks.bam', 'stages.1.blocks.bam']
        assert [m.channels for m in bams.values()] == [f['num_chs'] for f in model.feature_info][1:3]
    else:  # BAM after every stage but the last
        stages = len(model.feature_info) - 1
        assert list(bams) == [f'layer{i}.bam' for i in range(1, stages)]
        assert [m.channels for m in bams.values()] == [f['num_chs'] for f in model.feature_info][1:stages]


@pytest.mark.parametrize('name', ATTENTION_ZOO)
def test_trunk_keys_are_timm_keys(name):
    """Every parameter outside the attention keeps the plain trunk's (timm's = torchvision's) name and shape."""
    ours = timm.create_model(name, device='meta').state_dict()
    plain = timm.create_model(_plain_trunk(name), device='meta').state_dict()
    attention = set(attention_keys(timm.create_model(name, device='meta')))
    trunk = {k: v.shape for k, v in ours.items() if k not in attention}
    assert trunk == {k: v.shape for k, v in plain.items()}


@pytest.mark.parametrize('name', CONTRACT)
def test_pretrained_cfg_and_head_contract(name):
    model = timm.create_model(name, device='meta')
    cfg = model.pretrained_cfg
    assert cfg['architecture'] == name
    if '_cifar' in name:  # CIFAR networks: 32x32 CIFAR-100 images
        assert (cfg['input_size'], cfg['num_classes'], cfg['mean']) == ((3, 32, 32), 100, (0.5071, 0.4865, 0.4409))
    for key in ('input_size', 'mean', 'std', 'crop_pct', 'interpolation', 'first_conv', 'classifier', 'num_classes'):
        assert key in cfg, key
    assert isinstance(model.get_submodule(cfg['first_conv']), nn.Conv2d)
    assert model.get_classifier() is model.get_submodule(cfg['classifier'])
    x = torch.empty(2, *cfg['input_size'], device='meta')
    assert model(x).shape == (2, 100 if '_cifar' in name else 1000)
    assert tuple(model.forward_features(x).shape[-2:]) == tuple(cfg['pool_size'])
    assert model.forward_head(model.forward_features(x), pre_logits=True).shape == (2, model.num_features)
    model.reset_classifier(7)
    assert model(x).shape == (2, 7)
    headless = timm.create_model(name, num_classes=0, device='meta')
    assert headless(x).shape == (2, headless.num_features)
    unpooled = timm.create_model(name, num_classes=0, global_pool='', device='meta')
    assert unpooled(x).shape[:2] == (2, unpooled.num_features) and unpooled(x).dim() == 4


@pytest.mark.parametrize('name', ZOO)
def test_unknown_kwarg_raises_type_error(name):
    with pytest.raises(TypeError):
        timm.create_model(name, device='meta', not_an_argument=1)


def _attention_owner(param: str) -> str:
    """The stage (for BAM) or block (for CBAM) prefix an attention parameter belongs to."""
    return param.split('.bam.')[0] if '.bam.' in param else param.split('.se.')[0]


@pytest.mark.parametrize('name', CONTRACT)
def test_group_matcher_groups_attention_with_its_stage(name):
    model = timm.create_model(name, device='meta')
    for coarse in (True, False):
        groups = group_parameters(model, model.group_matcher(coarse=coarse))
        assert len(groups) > 1
        group_of = {param: gid for gid, params in groups.items() for param in params}
        head = group_of[f"{model.pretrained_cfg['classifier']}.weight"]
        for param, gid in group_of.items():
            if '.bam.' not in param and '.se.' not in param:
                continue
            assert gid != head, f'{param} grouped with the head'
            owner = _attention_owner(param)
            trunk_groups = [g for p, g in group_of.items()
                            if p.startswith(owner + '.') and '.bam.' not in p and '.se.' not in p]
            # BAM joins its stage's last block; CBAM its own block
            assert gid == max(trunk_groups), f'{param} in group {gid}, its stage/block in {set(trunk_groups)}'


@pytest.mark.parametrize('name', FAMILIES)
def test_forward_backward_train_batch_one_and_non_square(name):
    model = timm.create_model(name, num_classes=5).train()
    x = torch.randn(1, 3, 32, 48) if '_cifar' in name else torch.randn(1, 3, 64, 96)
    out = model(x)
    assert out.shape == (1, 5)
    out.sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, missing


@pytest.mark.parametrize('name', FAMILIES)
def test_in_chans_and_input_errors(name):
    model = timm.create_model(name, in_chans=1, num_classes=3).eval()
    size = _small(name)[-1]
    assert model(torch.randn(2, 1, size, size)).shape == (2, 3)
    with pytest.raises(ValueError, match=r'\(B, 1, H, W\)'):
        model(torch.randn(2, 3, size, size))
    # the total stride: 32 for the ImageNet networks, 8 (4 stages) or 4 (3 stages) for the CIFAR ones
    stride = model.feature_info[-1]['reduction']
    assert stride == ((4 if name.startswith(('resnext29', 'preresnet', 'wrn')) else 8) if '_cifar' in name else 32)
    with pytest.raises(ValueError, match=f'at least {stride}'):
        model(torch.randn(2, 1, stride // 2, 64))
    with pytest.raises(ValueError, match=f'at least {stride}'):
        model.forward_intermediates(torch.randn(2, 1, 64, stride // 4))


@pytest.mark.parametrize('name', FAMILIES)
def test_grad_checkpointing_same_output(name):
    model = timm.create_model(name).eval()
    x = torch.randn(*_small(name))
    reference = model(x)
    model.set_grad_checkpointing(True)
    torch.testing.assert_close(model(x), reference)
    model.train()
    model(x).sum().backward()


@pytest.mark.parametrize('name', FAMILIES)
def test_features_only_all_wrappers_return_attention_refined_maps(name):
    # every wrapper builds the same model first, so the same seed gives the same weights; residual branches
    # must not start at zero (timm's zero_init_last) or CBAM would only ever see zeros
    kwargs = dict(zero_init_last=False) if isinstance(timm.create_model(name, device='meta'), AttentionResNet) else {}
    torch.manual_seed(1)
    reference = timm.create_model(name, **kwargs).eval()
    x = torch.randn(*_small(name))
    outputs = {}
    for feature_cls in ('list', 'dict', 'hook', 'getter', 'fx'):
        torch.manual_seed(1)
        features = timm.create_model(name, features_only=True, feature_cls=feature_cls, **kwargs).eval()
        out = features(x)
        outputs[feature_cls] = list(out.values()) if isinstance(out, dict) else list(out)
        assert [o.shape[1] for o in outputs[feature_cls]] == features.feature_info.channels()
    for feature_cls, maps in outputs.items():
        for a, b in zip(maps, outputs['list']):
            torch.testing.assert_close(a, b, msg=feature_cls)

    intermediates = reference.forward_intermediates(x, intermediates_only=True)
    refined = [m for m in reference.modules() if isinstance(m, (BAM, CBAM))]
    assert refined
    # the maps must include the attention: remove it and the same taps change
    for module in refined:
        module.forward = lambda t: t
    plain = reference.forward_intermediates(x, intermediates_only=True)
    taps = outputs['list']
    offset = len(intermediates) - len(taps)
    changed = [not torch.allclose(a, b) for a, b in zip(intermediates[offset:], plain[offset:])]
    assert any(changed)
    for a, b in zip(intermediates[offset:], taps):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize('name', FAMILIES)
def test_forward_intermediates_and_prune(name):
    model = timm.create_model(name).eval()
    x = torch.randn(*_small(name))
    final, intermediates = model.forward_intermediates(x)
    torch.testing.assert_close(final, model.forward_features(x))
    assert [t.shape[1] for t in intermediates] == [info['num_chs'] for info in model.feature_info]
    kept = model.prune_intermediate_layers(indices=[1, 2])
    assert list(kept) == [1, 2]
    pruned = model.forward_intermediates(x, indices=[1, 2], intermediates_only=True)
    for a, b in zip(pruned, intermediates[1:3]):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize('name', FAMILIES)
def test_torchscript_matches_eager(name):
    model = timm.create_model(name).eval()
    x = torch.randn(*_small(name))
    scripted = torch.jit.script(model)
    torch.testing.assert_close(scripted(x), model(x))


@pytest.mark.parametrize('name', FAMILIES)
def test_fx_trace_matches_eager(name):
    model = timm.create_model(name).eval()
    x = torch.randn(*_small(name))
    train_nodes, eval_nodes = get_graph_node_names(model)
    extractor = create_feature_extractor(model, return_nodes=[eval_nodes[-1]]).eval()
    torch.testing.assert_close(extractor(x)[eval_nodes[-1]], model(x))


@pytest.mark.parametrize('name', ['resnet18_bam', 'resnet18_cbam'])
@pytest.mark.slow  # a subprocess or torch.compile
def test_torch_compile_fullgraph(name):
    model = timm.create_model(name, num_classes=4).eval()
    x = torch.randn(*_small(name))
    compiled = torch.compile(model, fullgraph=True, dynamic=False)
    torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('name', bam_models.models.list_zoo_models())
def test_meta_device_construction_both_spellings(name):
    """`device='meta'` and `with torch.device('meta')` both build every zoo model, with the same parameters."""
    by_argument = timm.create_model(name, device='meta')
    with torch.device('meta'):
        by_context = timm.create_model(name)
    for model in (by_argument, by_context):
        assert all(t.is_meta for t in [*model.parameters(), *model.buffers()])
    assert _shapes(by_context) == _shapes(by_argument)
    assert sum(p.numel() for p in by_context.parameters()) == sum(p.numel() for p in by_argument.parameters())


def _shapes(model: nn.Module):
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.mark.parametrize('name', CONTRACT)
def test_meta_and_dtype_construction(name):
    meta = timm.create_model(name, device='meta')
    assert all(p.is_meta for p in meta.parameters())
    assert all(b.is_meta for b in meta.buffers())


def test_dtype_construction_runs_in_that_dtype():
    model = timm.create_model('resnet18_bam', dtype=torch.float64).eval()
    assert {p.dtype for p in model.parameters()} == {torch.float64}
    reference = timm.create_model('resnet18_bam').eval()
    reference.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    x = torch.randn(*SMALL, dtype=torch.float64)
    torch.testing.assert_close(model(x).float(), reference(x.float()), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('name', ['resnet50_bam', 'resnet18_bam', 'resnet50_cbam'])
def test_bam_config_kwargs_reach_the_layers(name):
    if name.endswith('_cbam'):
        model = timm.create_model(name, cbam_args=dict(rd_ratio=1 / 8), device='meta')
        assert {m.rd_channels * 8 for m in model.modules() if isinstance(m, CBAM)} == \
            {m.channels for m in model.modules() if isinstance(m, CBAM)}
    else:
        model = timm.create_model(name, bam_args=dict(fusion='sum'), device='meta')
        assert {m.fusion for m in model.modules() if isinstance(m, BAM)} == {'sum'}


def test_every_zoo_name_is_unique_to_us():
    ours = set(ZOO)
    timm_own = {n for n in timm.list_models() if n not in ours}
    assert not any(fnmatch.fnmatch(n, '*_bam') or fnmatch.fnmatch(n, '*_cbam') for n in timm_own)


@pytest.mark.parametrize('indices', [2, [1, 3]])
def test_mobilenetv1_prune_with_extra_blocks_keeps_bam(indices):
    model = timm.create_model('mobilenetv1_100_bam').eval()
    x = torch.randn(*SMALL)
    reference = model.forward_intermediates(x, indices=indices, extra_blocks=True, intermediates_only=True)
    kept = model.prune_intermediate_layers(indices, extra_blocks=True)
    assert all(hasattr(stage, 'bam') for stage in model.blocks[:4])
    pruned = model.forward_intermediates(x, indices=kept, extra_blocks=True, intermediates_only=True)
    assert len(pruned) == len(reference)
    for a, b in zip(pruned, reference):
        torch.testing.assert_close(a, b)


def test_docs_model_table_lists_every_model():
    """docs/models.md holds the generated table (scripts/update_readme_table.py): every zoo model, once, with
    its parameter count, and the papers' figure where they give one."""
    import pathlib
    import re
    text = (pathlib.Path(__file__).resolve().parents[1] / 'docs' / 'models.md').read_text()
    block = re.search(r'<!-- model-table:start -->\n(.*?)\n<!-- model-table:end -->', text, re.S)
    assert block, 'docs/models.md lost its model-table markers'
    rows = {m[1]: m for m in re.finditer(r'^\| `([\w.]+)` \| ([\d,]+) \|.*\| ([\d.]*M?) \|$', block.group(1), re.M)}
    assert sorted(rows) == sorted(ZOO), 'run `python scripts/update_readme_table.py`'
    for name in ('wide_resnet18_150', 'wrn28_10_cifar_bam', 'mobilenetv1_100_cbam'):
        assert int(rows[name][2].replace(',', '')) == _count(timm.create_model(name, device='meta'))
    assert rows['wide_resnet18_150'][3] == '25.88M' and rows['wrn28_10_cifar'][3] == '36.54M'

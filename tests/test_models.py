""" The timm model contract over the whole zoo, and parameter counts against independent computations. """
import fnmatch

import pytest
import timm
import torch
import torch.nn as nn
from pytorchcv.model_provider import get_model as pytorchcv_model
from timm.models import create_feature_extractor, get_graph_node_names
from timm.models._manipulate import group_parameters

import bam_models
from bam_models.layers import BAM, CBAM

BAM_MODELS = [
    'resnet18_bam', 'resnet34_bam', 'resnet50_bam', 'resnet101_bam', 'resnet152_bam',
    'wide_resnet50_2_bam', 'wide_resnet101_2_bam',
    'resnext50_32x4d_bam', 'resnext101_32x4d_bam', 'resnext101_32x8d_bam',
    'mobilenetv1_100_bam', 'mobilenetv1_125_bam',
]
CBAM_MODELS = [
    'resnet18_cbam', 'resnet34_cbam', 'resnet50_cbam', 'resnet101_cbam', 'resnet152_cbam',
    'wide_resnet50_2_cbam', 'resnext50_32x4d_cbam', 'resnext101_32x8d_cbam',
]
ZOO = BAM_MODELS + CBAM_MODELS
# one model per family for the expensive checks (real forward/backward, scripting, tracing)
FAMILIES = ['resnet18_bam', 'resnet18_cbam', 'resnext50_32x4d_bam', 'mobilenetv1_100_bam']
SMALL = (2, 3, 64, 64)


def _plain_trunk(name: str) -> str:
    return name.rsplit('_', 1)[0]


def _bam_params(channels: int) -> int:
    """FACTS §1 by hand: channel MLP with BN, spatial branch with two dilated 3x3 convs, all with biases."""
    c = channels // 16
    channel = channels * c + c + 2 * c + c * channels + channels
    spatial = (channels * c + c + 2 * c) + 2 * (c * c * 9 + c + 2 * c) + (c + 1)
    return channel + spatial


def _cbam_params(channels: int) -> int:
    """FACTS §2 by hand: shared MLP with biases, 7x7 conv 2->1 without bias, BN(1)."""
    c = channels // 16
    return channels * c + c + c * channels + channels + 2 * 49 + 2


def _expected_params(name: str) -> int:
    plain = sum(p.numel() for p in timm.create_model(_plain_trunk(name), device='meta').parameters())
    trunk = timm.create_model(_plain_trunk(name), features_only=True, device='meta')
    if name.startswith('mobilenetv1'):
        return plain + sum(_bam_params(c) for c in trunk.feature_info.channels()[:4])
    stage_chs = trunk.feature_info.channels()[1:]  # layer1-4 outputs
    if name.endswith('_bam'):
        return plain + sum(_bam_params(c) for c in stage_chs[:3])
    blocks_per_stage = [len(getattr(timm.create_model(_plain_trunk(name), device='meta'), f'layer{i}'))
                        for i in range(1, 5)]
    return plain + sum(n * _cbam_params(c) for n, c in zip(blocks_per_stage, stage_chs))


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_registry_lists_exactly_the_zoo():
    assert sorted(timm.list_models('*_bam')) == sorted(BAM_MODELS)
    assert sorted(timm.list_models('*_cbam')) == sorted(CBAM_MODELS)
    assert sorted(bam_models.list_zoo_models()) == sorted(ZOO)


@pytest.mark.parametrize('name', ZOO)
def test_param_count_matches_independent_computation(name):
    model = timm.create_model(name, device='meta')
    assert _count(model) == _expected_params(name)


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


@pytest.mark.parametrize('name', ZOO)
def test_attention_placement(name):
    model = timm.create_model(name, device='meta')
    if name.endswith('_cbam'):
        blocks = [b for i in range(1, 5) for b in getattr(model, f'layer{i}')]
        for block in blocks:
            last_conv = block.conv3 if hasattr(block, 'conv3') else block.conv2
            assert isinstance(block.se, CBAM) and block.se.channels == last_conv.out_channels
        assert not any(isinstance(m, BAM) for m in model.modules())
        return
    bams = {n: m for n, m in model.named_modules() if isinstance(m, BAM)}
    if name.startswith('mobilenetv1'):
        assert list(bams) == [f'blocks.{i}.bam' for i in range(4)]
        assert [m.channels for m in bams.values()] == [f['num_chs'] for f in model.feature_info][:4]
    else:
        assert list(bams) == ['layer1.bam', 'layer2.bam', 'layer3.bam']
        assert [m.channels for m in bams.values()] == [f['num_chs'] for f in model.feature_info][1:4]


@pytest.mark.parametrize('name', ZOO)
def test_trunk_keys_are_timm_keys(name):
    """Every parameter outside the attention keeps the plain timm (= torchvision) name and shape."""
    ours = timm.create_model(name, device='meta').state_dict()
    plain = timm.create_model(_plain_trunk(name), device='meta').state_dict()
    trunk = {k: v.shape for k, v in ours.items() if '.bam.' not in k and '.se.' not in k}
    assert trunk == {k: v.shape for k, v in plain.items()}


@pytest.mark.parametrize('name', ZOO)
def test_pretrained_cfg_and_head_contract(name):
    model = timm.create_model(name, device='meta')
    cfg = model.pretrained_cfg
    assert cfg['architecture'] == name
    for key in ('input_size', 'mean', 'std', 'crop_pct', 'interpolation', 'first_conv', 'classifier', 'num_classes'):
        assert key in cfg, key
    assert isinstance(model.get_submodule(cfg['first_conv']), nn.Conv2d)
    assert model.get_classifier() is model.get_submodule(cfg['classifier'])
    x = torch.empty(2, *cfg['input_size'], device='meta')
    assert model(x).shape == (2, 1000)
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


@pytest.mark.parametrize('name', ZOO)
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
    x = torch.randn(1, 3, 64, 96)
    out = model(x)
    assert out.shape == (1, 5)
    out.sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, missing


@pytest.mark.parametrize('name', FAMILIES)
def test_in_chans_and_input_errors(name):
    model = timm.create_model(name, in_chans=1, num_classes=3).eval()
    assert model(torch.randn(2, 1, 64, 64)).shape == (2, 3)
    with pytest.raises(ValueError, match=r'\(B, 1, H, W\)'):
        model(torch.randn(2, 3, 64, 64))
    with pytest.raises(ValueError, match='at least 32'):
        model(torch.randn(2, 1, 16, 64))
    with pytest.raises(ValueError, match='at least 32'):
        model.forward_intermediates(torch.randn(2, 1, 64, 8))


@pytest.mark.parametrize('name', FAMILIES)
def test_grad_checkpointing_same_output(name):
    model = timm.create_model(name).eval()
    x = torch.randn(*SMALL)
    reference = model(x)
    model.set_grad_checkpointing(True)
    torch.testing.assert_close(model(x), reference)
    model.train()
    model(x).sum().backward()


@pytest.mark.parametrize('name', FAMILIES)
def test_features_only_all_wrappers_return_attention_refined_maps(name):
    # every wrapper builds the same model first, so the same seed gives the same weights; residual branches
    # must not start at zero (timm's zero_init_last) or CBAM would only ever see zeros
    kwargs = {} if name.startswith('mobilenetv1') else dict(zero_init_last=False)
    torch.manual_seed(1)
    reference = timm.create_model(name, **kwargs).eval()
    x = torch.randn(*SMALL)
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
    x = torch.randn(*SMALL)
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
    x = torch.randn(*SMALL)
    scripted = torch.jit.script(model)
    torch.testing.assert_close(scripted(x), model(x))


@pytest.mark.parametrize('name', FAMILIES)
def test_fx_trace_matches_eager(name):
    model = timm.create_model(name).eval()
    x = torch.randn(*SMALL)
    train_nodes, eval_nodes = get_graph_node_names(model)
    extractor = create_feature_extractor(model, return_nodes=[eval_nodes[-1]]).eval()
    torch.testing.assert_close(extractor(x)[eval_nodes[-1]], model(x))


@pytest.mark.parametrize('name', ['resnet18_bam', 'resnet18_cbam'])
def test_torch_compile_fullgraph(name):
    model = timm.create_model(name, num_classes=4).eval()
    x = torch.randn(*SMALL)
    compiled = torch.compile(model, fullgraph=True, dynamic=False)
    torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('name', ZOO)
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

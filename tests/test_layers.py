""" BAM and CBAM layers against independent functional re-implementations of the authors' architecture. """
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import timm
from timm.layers import freeze_batch_norm_2d
from timm.layers.cbam import CbamModule
from timm.models.resnet import BasicBlock

from bam_models.layers import (
    BAM, BAM_DILATION, CBAM, GateBatchNorm2d, attention_keys, bam_stage_indices, cbam_layer, hand_final_relu_over,
    stage_bam, stage_dilation,
)


def _randomize(module: nn.Module) -> nn.Module:
    """Non-trivial weights and BN statistics so that every term of the formula matters."""
    with torch.no_grad():
        for name, tensor in module.state_dict().items():
            if name.endswith('num_batches_tracked'):
                continue
            if name.endswith('running_var'):
                tensor.uniform_(0.5, 2.0)
            else:
                tensor.normal_(0, 0.3)
    return module


def _bn(x, prefix, sd):
    return F.batch_norm(x, sd[f'{prefix}.running_mean'], sd[f'{prefix}.running_var'],
                        sd[f'{prefix}.weight'], sd[f'{prefix}.bias'], False, 0., 1e-5)


def _reference_bam(x, sd, fusion='product', dilation=4, num_dilated=2):
    """The authors' released BAM (channel MLP with BN on the pooled vector; 1x1 reduce, two dilated 3x3 convs and a
    1x1 conv to one map, each but the last followed by BN and ReLU; out = x * (1 + sigmoid(Mc * Ms)) for the product
    fusion) written out with functional ops from the state dict alone (eval mode)."""
    channels = x.shape[1]
    pooled = x.mean((2, 3))
    hidden = F.linear(pooled, sd['channel_gate.fc1.weight'].flatten(1), sd['channel_gate.fc1.bias'])
    hidden = F.relu(_bn(hidden[:, :, None, None], 'channel_gate.bn', sd))
    mc = F.conv2d(hidden, sd['channel_gate.fc2.weight'], sd['channel_gate.fc2.bias'])
    s = F.relu(_bn(F.conv2d(x, sd['spatial_gate.conv_reduce.weight'], sd['spatial_gate.conv_reduce.bias']),
                   'spatial_gate.bn_reduce', sd))
    for i in range(num_dilated):
        s = F.conv2d(s, sd[f'spatial_gate.conv_dil{i}.weight'], sd[f'spatial_gate.conv_dil{i}.bias'],
                     padding=dilation, dilation=dilation)
        s = F.relu(_bn(s, f'spatial_gate.bn_dil{i}', sd))
    ms = F.conv2d(s, sd['spatial_gate.conv_out.weight'], sd['spatial_gate.conv_out.bias'])
    if fusion == 'product':
        att = torch.sigmoid(mc * ms)
    else:
        mc = _bn(mc, 'channel_gate.bn_out', sd)
        ms = _bn(ms, 'spatial_gate.bn_out', sd)
        att = torch.sigmoid(mc + ms if fusion == 'sum' else torch.maximum(mc.expand_as(x), ms.expand_as(x)))
    assert att.shape[1] in (1, channels)
    return x + x * att


@pytest.mark.parametrize('fusion', ['product', 'sum', 'max'])
def test_bam_matches_functional_reference(fusion):
    bam = _randomize(BAM(64, fusion=fusion, dtype=torch.float64)).eval()
    x = torch.randn(2, 64, 12, 20, dtype=torch.float64)  # H != W
    expected = _reference_bam(x, bam.state_dict(), fusion)
    torch.testing.assert_close(bam(x), expected, rtol=1e-10, atol=1e-10)


def test_bam_released_architecture_shapes():
    bam = BAM(256)
    shapes = {k: tuple(v.shape) for k, v in bam.state_dict().items() if not k.endswith('num_batches_tracked')}
    assert shapes['channel_gate.fc1.weight'] == (16, 256, 1, 1)
    assert shapes['channel_gate.fc2.weight'] == (256, 16, 1, 1)
    assert shapes['spatial_gate.conv_dil0.weight'] == (16, 16, 3, 3)
    assert shapes['spatial_gate.conv_out.weight'] == (1, 16, 1, 1)
    # the released product form has no BN after either branch's last layer
    assert not any('bn_out' in k for k in shapes)
    assert bam.spatial_gate.conv_dil0.dilation == (4, 4) and bam.spatial_gate.conv_dil0.padding == (4, 4)
    # authors' init: every bias zero, BN weights one
    assert all(v.abs().sum() == 0 for k, v in bam.state_dict().items() if k.endswith('.bias'))


@pytest.mark.parametrize('gates', ['channel', 'spatial'])
def test_bam_single_branch_ablations(gates):
    bam = _randomize(BAM(32, gates=gates)).eval()
    assert (bam.channel_gate is None) == (gates == 'spatial')
    assert (bam.spatial_gate is None) == (gates == 'channel')
    x = torch.randn(2, 32, 9, 7)
    gate = bam.channel_gate if gates == 'channel' else bam.spatial_gate
    torch.testing.assert_close(bam(x), x * (1 + torch.sigmoid(gate(x))))


def test_bam_rejects_bad_options():
    with pytest.raises(ValueError, match='fusion'):
        BAM(64, fusion='mean')
    with pytest.raises(ValueError, match='gates'):
        BAM(64, gates='none')
    with pytest.raises(ValueError, match='single|keeps one'):
        BAM(64, gates='channel', fusion='sum')


@pytest.mark.parametrize('layer_cls', [BAM, CBAM])
def test_small_channel_counts_keep_a_hidden_width(layer_cls):
    layer = layer_cls(8)
    assert layer.rd_channels == 1
    x = torch.randn(2, 8, 5, 11)
    out = layer(x)
    assert out.shape == x.shape
    out.sum().backward()


@pytest.mark.parametrize('layer_cls', [BAM, CBAM])
def test_device_dtype_kwargs(layer_cls):
    layer = layer_cls(32, device='cpu', dtype=torch.float64)
    assert {p.dtype for p in layer.parameters()} == {torch.float64}
    meta = layer_cls(32, device='meta')
    assert all(p.is_meta for p in meta.parameters())


@pytest.mark.parametrize('layer_cls', [BAM, CBAM])
def test_trains_at_batch_size_one(layer_cls):
    layer = layer_cls(64).train()
    x = torch.randn(1, 64, 6, 10, requires_grad=True)
    layer(x).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_gate_batchnorm_matches_batchnorm_and_freezes_stats_at_one_value():
    gate_bn, plain_bn = GateBatchNorm2d(16).train(), nn.BatchNorm2d(16).train()
    x = torch.randn(4, 16, 1, 1)
    torch.testing.assert_close(gate_bn(x), plain_bn(x))
    torch.testing.assert_close(gate_bn.running_mean, plain_bn.running_mean)
    assert gate_bn.num_batches_tracked.item() == 1

    # a single value per channel: normalised with running statistics, which stay unchanged
    single = torch.randn(1, 16, 1, 1)
    running_mean = gate_bn.running_mean.clone()
    expected = F.batch_norm(single, gate_bn.running_mean, gate_bn.running_var, gate_bn.weight, gate_bn.bias,
                            False, 0., gate_bn.eps)
    torch.testing.assert_close(gate_bn(single), expected)
    torch.testing.assert_close(gate_bn.running_mean, running_mean)
    assert gate_bn.num_batches_tracked.item() == 1
    with pytest.raises(ValueError, match='more than 1 value'):
        plain_bn(single)


def test_cbam_matches_timm_cbam_with_swapped_spatial_order():
    """timm's CbamModule is an independent implementation with [mean, max] stacked in the other order."""
    ours = _randomize(CBAM(64, dtype=torch.float64)).eval()
    theirs = CbamModule(64, mlp_bias=True, dtype=torch.float64).eval()
    sd = ours.state_dict()
    mapped = {
        'channel.fc1.weight': sd['channel_gate.fc1.weight'], 'channel.fc1.bias': sd['channel_gate.fc1.bias'],
        'channel.fc2.weight': sd['channel_gate.fc2.weight'], 'channel.fc2.bias': sd['channel_gate.fc2.bias'],
        'spatial.conv.conv.weight': sd['spatial_gate.conv.weight'].flip(1),  # [max, mean] -> [mean, max]
    }
    for k in ('weight', 'bias', 'running_mean', 'running_var', 'num_batches_tracked'):
        mapped[f'spatial.conv.bn.{k}'] = sd[f'spatial_gate.bn.{k}']
    theirs.load_state_dict(mapped)
    x = torch.randn(2, 64, 7, 13, dtype=torch.float64)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-10, atol=1e-10)


def test_cbam_released_architecture():
    cbam = CBAM(256)
    assert cbam.rd_channels == 16
    assert cbam.channel_gate.fc1.bias is not None and cbam.spatial_gate.conv.bias is None
    assert cbam.spatial_gate.bn.momentum == 0.01
    # authors' init: spatial BN weight zero, so a fresh spatial map is exactly 0.5 in eval mode
    x = torch.randn(2, 256, 5, 9)
    torch.testing.assert_close(cbam.eval().spatial_gate(x), torch.full((2, 1, 5, 9), 0.5))


@pytest.mark.parametrize('layer_cls', [BAM, CBAM])
def test_freeze_batch_norm_covers_attention(layer_cls):
    layer = freeze_batch_norm_2d(_randomize(layer_cls(32)).eval())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in layer.modules())
    x = torch.randn(1, 32, 6, 6)
    assert layer.train()(x).shape == x.shape  # frozen BN trains at batch size 1 too


# ------------------------------------------------------------------------------ placement (layers/placement.py)

def test_bam_stage_indices_follow_natural_downsampling():
    assert bam_stage_indices((4, 8, 16, 32)) == (0, 1, 2)  # a ResNet's layer1-3
    assert bam_stage_indices((2, 4, 8, 16, 32)) == (0, 1, 2, 3)  # MobileNetV1's blocks.0-3
    assert bam_stage_indices((1, 2, 4)) == (0, 1)  # CIFAR pre-activation nets
    assert bam_stage_indices((4, 4, 8, 8, 16)) == (1, 3)  # only where the next stage reduces further
    assert bam_stage_indices((4,)) == ()


@pytest.mark.parametrize('output_stride, dilations', [(32, [1, 1, 1, 1]), (16, [1, 1, 1, 2]), (8, [1, 1, 2, 4])])
def test_stage_dilation_reads_the_dilation_output_stride_applied(output_stride, dilations):
    model = timm.create_model('resnet18', output_stride=output_stride, device='meta')
    assert [stage_dilation(getattr(model, f'layer{i}')) for i in range(1, 5)] == dilations


def test_stage_bam_configures_the_stage_bam():
    model = timm.create_model('resnet50', output_stride=8, device='meta')
    bam = stage_bam(model.layer3, 1024, dict(fusion='sum'), device='meta')
    assert bam.spatial_gate.conv_dil0.dilation == (BAM_DILATION * 2,) * 2  # layer3 is dilated 2x at stride 8
    assert bam.inplace and bam.input_relu and bam.fusion == 'sum'
    assert isinstance(model.layer3[-1].act3, nn.Identity)  # BAM took over the block's closing ReLU
    kept = stage_bam(model.layer2, 512, dict(input_relu=False, inplace=False, dilation=2), device='meta')
    assert not kept.input_relu and not kept.inplace and kept.spatial_gate.conv_dil0.dilation == (2, 2)
    assert isinstance(model.layer2[-1].act3, nn.ReLU)


def test_hand_final_relu_over_only_a_timm_resnet_block_with_its_own_relu():
    block = BasicBlock(8, 8)
    x = torch.randn(2, 8, 6, 6)
    expected = block.eval()(x)
    assert hand_final_relu_over(block) and isinstance(block.act2, nn.Identity)
    torch.testing.assert_close(F.relu(block(x)), expected)
    assert not hand_final_relu_over(BasicBlock(8, 8, act_layer=nn.SiLU))
    assert not hand_final_relu_over(nn.Sequential(nn.Conv2d(8, 8, 3), nn.ReLU()))


def test_cbam_layer_is_in_place_unless_told():
    assert cbam_layer()(32).inplace
    cbam = cbam_layer(dict(inplace=False, rd_ratio=1 / 8))(32, device='meta')
    assert not cbam.inplace and cbam.channel_gate.fc1.out_channels == 4


def test_attention_keys_are_the_bam_and_cbam_modules_keys():
    model = nn.Sequential(nn.Conv2d(3, 16, 3), BAM(16), nn.Sequential(nn.Conv2d(16, 16, 1), CBAM(16)))
    keys = attention_keys(model)
    assert keys and all(k.startswith(('1.', '2.1.')) for k in keys)
    assert set(model.state_dict()) - set(keys) == {'0.weight', '0.bias', '2.0.weight', '2.0.bias'}
    assert attention_keys(nn.Conv2d(3, 3, 1)) == []

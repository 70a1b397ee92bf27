""" Conversion from pytorchcv (independent reference implementation), the authors' layout and torchvision. """
import functools
import re

import pytest
import timm
import torch
import torch.nn as nn
from safetensors.torch import load_file

import bam_models  # noqa: F401
from bam_models.cli import main as cli_main
from bam_models.convert import ConversionError, convert_state_dict, read_checkpoint, to_official_state_dict
from bam_models.models.cifar_preresnet import CifarPreActResNet
from bam_models.hub import TrunkOnlyWeightsWarning
from bam_models.layers import attention_keys

from _weights import randomize_

pytorchcv_provider = pytest.importorskip('pytorchcv.model_provider')

PYTORCHCV_TO_OURS = {
    'bam_resnet18': 'resnet18_bam',
    'bam_resnet50': 'resnet50_bam',
    'bam_resnet101': 'resnet101_bam',
    'cbam_resnet50': 'resnet50_cbam',
}


@functools.lru_cache(maxsize=None)
def pytorchcv_model(name: str) -> nn.Module:
    model = pytorchcv_provider.get_model(name, pretrained=False)
    # its 7x7 average pool needs 224 px inputs; adaptive pooling is identical there and lets tests run at 128 px
    model.features.final_pool = nn.AdaptiveAvgPool2d(1)
    return randomize_(model)


@pytest.mark.parametrize('pytorchcv_name', list(PYTORCHCV_TO_OURS))
def test_pytorchcv_conversion_gives_same_logits(pytorchcv_name):
    reference = pytorchcv_model(pytorchcv_name)
    arch = PYTORCHCV_TO_OURS[pytorchcv_name]
    model = timm.create_model(arch).eval()
    model.load_state_dict(convert_state_dict(reference.state_dict(), 'pytorchcv', arch))
    x = torch.randn(2, 3, 64, 48)  # non-square: catches pooling over the wrong dims
    with torch.no_grad():
        expected, actual = reference(x), model(x)
    assert expected.abs().max() > 0.1  # a dead net would compare equal for any mapping
    assert (actual - expected).abs().max().item() <= 1e-4


# the authors' key layout (their released checkpoints: a `module.` prefix on every key, FC weights 2-D), built
# here from a pytorchcv model by a mapping written independently of bam_models.convert
_AUTHORS_FROM_PYTORCHCV = (
    (r'features\.init_block\.conv\.conv\.', lambda m: 'conv1.'),
    (r'features\.init_block\.conv\.bn\.', lambda m: 'bn1.'),
    (r'features\.stage(\d)\.unit(\d+)\.(?:res_unit\.)?body\.conv(\d)\.conv\.',
     lambda m: f'layer{m[1]}.{int(m[2]) - 1}.conv{m[3]}.'),
    (r'features\.stage(\d)\.unit(\d+)\.(?:res_unit\.)?body\.conv(\d)\.bn\.',
     lambda m: f'layer{m[1]}.{int(m[2]) - 1}.bn{m[3]}.'),
    (r'features\.stage(\d)\.unit(\d+)\.(?:res_unit\.)?identity_conv\.conv\.',
     lambda m: f'layer{m[1]}.{int(m[2]) - 1}.downsample.0.'),
    (r'features\.stage(\d)\.unit(\d+)\.(?:res_unit\.)?identity_conv\.bn\.',
     lambda m: f'layer{m[1]}.{int(m[2]) - 1}.downsample.1.'),
    (r'features\.stage(\d)\.unit1\.bam\.ch_att\.init_fc\.fc\.',
     lambda m: f'bam{int(m[1]) - 1}.channel_att.gate_c.gate_c_fc_0.'),
    (r'features\.stage(\d)\.unit1\.bam\.ch_att\.init_fc\.bn\.',
     lambda m: f'bam{int(m[1]) - 1}.channel_att.gate_c.gate_c_bn_1.'),
    (r'features\.stage(\d)\.unit1\.bam\.ch_att\.final_fc\.',
     lambda m: f'bam{int(m[1]) - 1}.channel_att.gate_c.gate_c_fc_final.'),
    (r'features\.stage(\d)\.unit1\.bam\.sp_att\.init_conv\.conv\.',
     lambda m: f'bam{int(m[1]) - 1}.spatial_att.gate_s.gate_s_conv_reduce0.'),
    (r'features\.stage(\d)\.unit1\.bam\.sp_att\.init_conv\.bn\.',
     lambda m: f'bam{int(m[1]) - 1}.spatial_att.gate_s.gate_s_bn_reduce0.'),
    (r'features\.stage(\d)\.unit1\.bam\.sp_att\.dil_convs\.conv(\d)\.conv\.',
     lambda m: f'bam{int(m[1]) - 1}.spatial_att.gate_s.gate_s_conv_di_{int(m[2]) - 1}.'),
    (r'features\.stage(\d)\.unit1\.bam\.sp_att\.dil_convs\.conv(\d)\.bn\.',
     lambda m: f'bam{int(m[1]) - 1}.spatial_att.gate_s.gate_s_bn_di_{int(m[2]) - 1}.'),
    (r'features\.stage(\d)\.unit1\.bam\.sp_att\.final_conv\.',
     lambda m: f'bam{int(m[1]) - 1}.spatial_att.gate_s.gate_s_conv_final.'),
    (r'features\.stage(\d)\.unit(\d+)\.cbam\.ch_gate\.mlp\.fc1\.',
     lambda m: f'layer{m[1]}.{int(m[2]) - 1}.cbam.ChannelGate.mlp.1.'),
    (r'features\.stage(\d)\.unit(\d+)\.cbam\.ch_gate\.mlp\.fc2\.',
     lambda m: f'layer{m[1]}.{int(m[2]) - 1}.cbam.ChannelGate.mlp.3.'),
    (r'features\.stage(\d)\.unit(\d+)\.cbam\.sp_gate\.conv\.conv\.',
     lambda m: f'layer{m[1]}.{int(m[2]) - 1}.cbam.SpatialGate.spatial.conv.'),
    (r'features\.stage(\d)\.unit(\d+)\.cbam\.sp_gate\.conv\.bn\.',
     lambda m: f'layer{m[1]}.{int(m[2]) - 1}.cbam.SpatialGate.spatial.bn.'),
    (r'output\.', lambda m: 'fc.'),
)

# the key patterns of the authors' released checkpoints after `module.` (trunk as torchvision's, BAM as
# bam{1,2,3}.channel_att / spatial_att, CBAM as layerL.i.cbam.ChannelGate / SpatialGate)
_AUTHORS_PATTERNS = [re.compile(p + '$') for p in (
    r'(conv1|fc)\.(weight|bias)', r'bn1\.\w+', r'layer\d\.\d+\.conv\d\.weight', r'layer\d\.\d+\.bn\d\.\w+',
    r'layer\d\.0\.downsample\.0\.weight', r'layer\d\.0\.downsample\.1\.\w+',
    r'bam[123]\.channel_att\.gate_c\.gate_c_fc_(0|final)\.(weight|bias)',
    r'bam[123]\.channel_att\.gate_c\.gate_c_bn_1\.\w+',
    r'bam[123]\.spatial_att\.gate_s\.gate_s_(conv_reduce0|conv_di_[01]|conv_final)\.(weight|bias)',
    r'bam[123]\.spatial_att\.gate_s\.gate_s_(bn_reduce0|bn_di_[01])\.\w+',
    r'layer\d\.\d+\.cbam\.ChannelGate\.mlp\.[13]\.(weight|bias)',
    r'layer\d\.\d+\.cbam\.SpatialGate\.spatial\.conv\.weight',
    r'layer\d\.\d+\.cbam\.SpatialGate\.spatial\.bn\.\w+',
)]


def authors_state_dict(reference: nn.Module, num_batches_tracked: bool = True):
    out = {}
    for key, value in reference.state_dict().items():
        if key.endswith('num_batches_tracked') and not num_batches_tracked:
            continue
        for pattern, rename in _AUTHORS_FROM_PYTORCHCV:
            match = re.match(pattern, key)
            if match:
                out['module.' + rename(match) + key[match.end():]] = value.clone()
                break
        else:
            raise AssertionError(f'test mapping misses {key}')
    return out


@pytest.mark.parametrize('pytorchcv_name, arch, num_keys', [
    ('bam_resnet50', 'resnet50_bam', 416), ('cbam_resnet50', 'resnet50_cbam', 480)])
@pytest.mark.parametrize('num_batches_tracked', [True, False])
def test_authors_layout_round_trip_and_logits(pytorchcv_name, arch, num_keys, num_batches_tracked, tmp_path):
    reference = pytorchcv_model(pytorchcv_name)
    official = authors_state_dict(reference, num_batches_tracked)
    # the layout is exactly the released one: 416 keys for ResNet50+BAM, 480 for ResNet50+CBAM (with the
    # BN counters), these names, 2-D FC weights
    num_bn = sum(k.endswith('num_batches_tracked') for k in reference.state_dict())
    assert len(official) == (num_keys if num_batches_tracked else num_keys - num_bn)
    for key, value in official.items():
        name = key[len('module.'):]
        assert any(p.match(name) for p in _AUTHORS_PATTERNS), key
        if re.search(r'gate_c_fc_0\.weight$|mlp\.1\.weight$', name):
            assert value.dim() == 2 and value.shape[0] < value.shape[1]
    torch.save({'epoch': 90, 'arch': 'resnet', 'best_prec1': torch.tensor(76.86), 'state_dict': official},
               tmp_path / 'authors.pth.tar')

    converted = convert_state_dict(read_checkpoint(tmp_path / 'authors.pth.tar'), 'official', arch)
    back = to_official_state_dict(converted, num_batches_tracked=num_batches_tracked)
    assert back.keys() == official.keys()
    for key in official:
        assert torch.equal(back[key], official[key]), key

    if num_batches_tracked:  # the logits do not depend on the counters: compare them once per model
        model = timm.create_model(arch).eval()
        model.load_state_dict(converted)
        x = torch.randn(1, 3, 48, 64)
        with torch.no_grad():
            assert (model(x) - reference(x)).abs().max().item() <= 1e-4


def test_convert_cli_writes_hub_folder_and_aborts_on_foreign_keys(tmp_path, capsys):
    reference = pytorchcv_model('bam_resnet18')
    torch.save(reference.state_dict(), tmp_path / 'cv.pth')
    assert cli_main(['convert', '--from', 'pytorchcv', '--arch', 'resnet18_bam', str(tmp_path / 'cv.pth'),
                     str(tmp_path / 'out')]) == 0
    assert 'sha256' in capsys.readouterr().out
    assert {p.name for p in (tmp_path / 'out').iterdir()} == {'model.safetensors', 'config.json', 'README.md'}
    # the one rule of every folder bam_models writes: new or empty, else nothing is touched
    assert cli_main(['convert', '--from', 'pytorchcv', '--arch', 'resnet18_bam', str(tmp_path / 'cv.pth'),
                     str(tmp_path / 'out')]) == 2
    assert re.match(r'error: output .*out is not an empty folder; .*pass a new or empty folder\n$',
                    capsys.readouterr().err)
    # the written folder loads through timm's local-dir source with equal logits
    model = timm.create_model(f"local-dir:{tmp_path / 'out'}", pretrained=True).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert (model(x) - reference(x)).abs().max().item() <= 1e-4

    state = reference.state_dict()
    state['features.stage2.unit1.bam.extra.weight'] = torch.zeros(1)
    del state['features.stage3.unit1.bam.ch_att.final_fc.bias']
    torch.save(state, tmp_path / 'bad.pth')
    assert cli_main(['convert', '--from', 'pytorchcv', '--arch', 'resnet18_bam', str(tmp_path / 'bad.pth'),
                     str(tmp_path / 'bad')]) == 2
    error = capsys.readouterr().err
    assert error.startswith('error: pytorchcv checkpoint does not fit resnet18_bam: ')
    assert '1 missing key (e.g. layer2.bam.channel_gate.fc2.bias)' in error
    assert '1 unexpected key (e.g. features.stage2.unit1.bam.extra.weight)' in error
    assert not (tmp_path / 'bad').exists()
    del state['features.stage2.unit1.bam.extra.weight']
    with pytest.raises(ConversionError, match=r'1 missing key \(e\.g\. layer2\.bam\.channel_gate\.fc2\.bias\)'):
        convert_state_dict(state, 'pytorchcv', 'resnet18_bam')
    # a checkpoint of another depth fails on shapes/keys, never loads half-way
    with pytest.raises(ConversionError):
        convert_state_dict(state, 'pytorchcv', 'resnet34_bam')


def test_untrusted_pickles_are_refused(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ('pwned',))
    torch.save({'state_dict': {'conv1.weight': torch.zeros(1)}, 'evil': Payload()}, tmp_path / 'evil.pth')
    with pytest.raises(ConversionError, match='weights_only=True'):
        read_checkpoint(tmp_path / 'evil.pth')


def test_torchvision_trunk_conversion(tmp_path):
    plain = timm.create_model('resnet18')  # torchvision's key layout
    torch.save(plain.state_dict(), tmp_path / 'tv.pth')
    assert cli_main(['convert', '--from', 'torchvision', '--arch', 'resnet18_cbam', '--tag', 'tv_in1k',
                     str(tmp_path / 'tv.pth'), str(tmp_path / 'out')]) == 0
    written = load_file(tmp_path / 'out' / 'model.safetensors')
    assert written.keys() == plain.state_dict().keys()  # the trunk only: no random attention is written
    with pytest.warns(TrunkOnlyWeightsWarning, match='freshly initialised'):
        model = timm.create_model(
            'resnet18_cbam', pretrained=True,
            pretrained_cfg_overlay=dict(file=str(tmp_path / 'out' / 'model.safetensors')))
    assert torch.equal(model.layer3[1].conv2.weight,
                       plain.layer3[1].conv2.weight)
    assert len(attention_keys(model)) == 8 * 10  # 8 blocks x (fc1, fc2: weight+bias; conv; bn: 5)
    assert model.layer1[0].se.spatial_gate.bn.weight.eq(0).all()  # CBAM's own init, untouched


# pytorchcv's CIFAR-100 trunks, the BAM paper's CIFAR baselines: the pre-activation layout and the ResNeXt one
@pytest.mark.parametrize('pytorchcv_name, arch', [
    ('preresnet110_cifar100', 'preresnet110_cifar'), ('resnext29_16x64d_cifar100', 'resnext29_16x64d_cifar')])
def test_pytorchcv_cifar_trunks_convert_with_equal_logits(pytorchcv_name, arch):
    reference = randomize_(pytorchcv_provider.get_model(pytorchcv_name, pretrained=False))
    model = timm.create_model(arch).eval()
    model.load_state_dict(convert_state_dict(reference.state_dict(), 'pytorchcv', arch))
    x = torch.randn(1, 3, 32, 32)  # pytorchcv's CIFAR models pool with a fixed 8x8 kernel: 32 px only
    with torch.no_grad():
        expected, actual = reference(x), model(x)
    assert expected.abs().max() > 0.1
    assert (actual - expected).abs().max().item() <= 1e-4 * max(1.0, expected.abs().max().item())
    assert isinstance(model, CifarPreActResNet) == arch.startswith('preresnet')


def _authors_cifar_layout(state_dict):
    """Our CIFAR ResNet keys -> the authors' `ResidualNet('CIFAR100', ...)` keys, renamed here by hand: the same
    scheme as their ImageNet networks (bam1..3 at the top level, layerL.i.cbam, 2-D FC weights, `module.`)."""
    renames = (
        (r'layer(\d)\.bam\.channel_gate\.fc1\.', r'bam\1.channel_att.gate_c.gate_c_fc_0.'),
        (r'layer(\d)\.bam\.channel_gate\.bn\.', r'bam\1.channel_att.gate_c.gate_c_bn_1.'),
        (r'layer(\d)\.bam\.channel_gate\.fc2\.', r'bam\1.channel_att.gate_c.gate_c_fc_final.'),
        (r'layer(\d)\.bam\.spatial_gate\.conv_reduce\.', r'bam\1.spatial_att.gate_s.gate_s_conv_reduce0.'),
        (r'layer(\d)\.bam\.spatial_gate\.bn_reduce\.', r'bam\1.spatial_att.gate_s.gate_s_bn_reduce0.'),
        (r'layer(\d)\.bam\.spatial_gate\.conv_dil(\d)\.', r'bam\1.spatial_att.gate_s.gate_s_conv_di_\2.'),
        (r'layer(\d)\.bam\.spatial_gate\.bn_dil(\d)\.', r'bam\1.spatial_att.gate_s.gate_s_bn_di_\2.'),
        (r'layer(\d)\.bam\.spatial_gate\.conv_out\.', r'bam\1.spatial_att.gate_s.gate_s_conv_final.'),
        (r'\.se\.channel_gate\.fc1\.', '.cbam.ChannelGate.mlp.1.'),
        (r'\.se\.channel_gate\.fc2\.', '.cbam.ChannelGate.mlp.3.'),
        (r'\.se\.spatial_gate\.', '.cbam.SpatialGate.spatial.'),
    )
    out = {}
    for key, value in state_dict.items():
        for pattern, replacement in renames:
            key = re.sub(pattern, replacement, key)
        if re.search(r'(gate_c_fc_0|gate_c_fc_final|mlp\.[13])\.weight$', key):
            value = value.flatten(1)
        out['module.' + key] = value.clone()
    return out


@pytest.mark.parametrize('arch', ['resnet18_cifar_bam', 'resnet18_cifar_cbam'])
def test_authors_cifar_layout_converts_with_equal_logits(arch, tmp_path):
    torch.manual_seed(0)
    source = randomize_(timm.create_model(arch, zero_init_last=False))
    official = _authors_cifar_layout(source.state_dict())
    assert any(k.startswith('module.bam1.') for k in official) == arch.endswith('_bam')
    torch.save({'epoch': 200, 'state_dict': official}, tmp_path / 'authors_cifar.pth.tar')
    assert cli_main(['convert', '--from', 'official', '--arch', arch, str(tmp_path / 'authors_cifar.pth.tar'),
                     str(tmp_path / 'out')]) == 0
    model = timm.create_model(f"local-dir:{tmp_path / 'out'}", pretrained=True).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), source(x))
    assert model.pretrained_cfg['input_size'] == (3, 32, 32)


def test_authors_cifar_resnet50_bam_has_the_imagenet_key_count():
    """The authors' CIFAR ResNet50+BAM differs from their ImageNet one only in tensor shapes: 416 keys."""
    official = _authors_cifar_layout(timm.create_model('resnet50_cifar_bam', device='meta').state_dict())
    assert len(official) == 416
    assert set(convert_state_dict(official, 'official', 'resnet50_cifar_bam')) == \
        set(timm.create_model('resnet50_cifar_bam', device='meta').state_dict())


def test_convert_sizes_the_head_from_the_checkpoint(tmp_path, capsys):
    """A 10-class checkpoint converts into a 10-class model (it used to fail on fc.weight (10, 512) vs
    (1000, 512))."""
    reference = pytorchcv_model('bam_resnet18')
    state = dict(reference.state_dict())
    state['output.weight'], state['output.bias'] = state['output.weight'][:10].clone(), state['output.bias'][:10]
    torch.save(state, tmp_path / 'ten.pth')
    assert cli_main(['convert', '--from', 'pytorchcv', '--arch', 'resnet18_bam', str(tmp_path / 'ten.pth'),
                     str(tmp_path / 'out')]) == 0, capsys.readouterr().err
    model = timm.create_model(f"local-dir:{tmp_path / 'out'}", pretrained=True).eval()
    assert model.num_classes == 10
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x)[:, :10], rtol=1e-4, atol=1e-4)


def test_convert_with_the_wrong_arch_names_counts_examples_and_the_right_arch(tmp_path, capsys):
    torch.save(pytorchcv_model('bam_resnet50').state_dict(), tmp_path / 'cv50.pth')
    assert cli_main(['convert', '--from', 'pytorchcv', '--arch', 'resnet18_bam', str(tmp_path / 'cv50.pth'),
                     str(tmp_path / 'out')]) == 2
    error = capsys.readouterr().err
    assert len(error.strip().splitlines()) == 1 and len(error) < 1200, error
    # ResNet-50 has bottlenecks where ResNet-18 has basic blocks: every conv3/bn3 key is extra
    assert re.search(r': 198 unexpected keys \(e\.g\. layer1\.0\.bn3\.[^)]*, \.\.\. \(195 more\)\)', error), error
    assert re.search(r'; \d+ mismatched tensors \(e\.g\. layer1\.0\.conv1\.weight: checkpoint \(64, 64, 1, 1\), '
                     r'model \(64, 64, 3, 3\)', error), error
    assert error.rstrip().endswith('the keys fit resnet50_bam: pass --arch resnet50_bam'), error

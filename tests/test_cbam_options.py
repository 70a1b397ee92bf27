""" Every option of the authors' CBAM and every row of the CBAM paper's ablations: parameter counts against a
closed form, outputs against a transcription of the authors' formulas (written here, independently of
gating_reference), the path each configuration takes, and the options reaching the zoo and insert_cbam. """
import itertools
import math
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision

import bam_models  # noqa: F401  (registers the zoo)
from bam_models import insert_cbam
from bam_models.layers import CBAM, fused_gating
from bam_models.benchmark import count_flops, count_params
from bam_models.layers.gating_reference import cbam_channel_descriptors
from bam_models.train.build import attention_kwargs, check_config
from bam_models.train.config import ConfigError, load_config

C, RD = 32, 4
POOL_SUBSETS = [p for n in range(1, 5) for p in itertools.combinations(('avg', 'max', 'lp', 'lse'), n)]


def _randomize(module: CBAM) -> CBAM:
    with torch.no_grad():
        for name, tensor in module.state_dict().items():
            if name.endswith('running_var'):
                tensor.uniform_(0.5, 2.0)
            elif not name.endswith('num_batches_tracked'):
                tensor.normal_(0, 0.3)
    return module.eval()


def _authors_channel_gate(x, cbam, pool_types):
    """The authors' ChannelGate: each pool type over the full map, through the MLP, summed, sigmoid."""
    gate = cbam.channel_gate
    mlp = lambda v: F.linear(F.relu(F.linear(v, gate.fc1.weight.flatten(1), gate.fc1.bias)),  # noqa: E731
                             gate.fc2.weight.flatten(1), gate.fc2.bias)
    total = 0
    for pool in pool_types:
        if pool == 'avg':
            v = F.avg_pool2d(x, (x.size(2), x.size(3)), stride=(x.size(2), x.size(3)))
        elif pool == 'max':
            v = F.max_pool2d(x, (x.size(2), x.size(3)), stride=(x.size(2), x.size(3)))
        elif pool == 'lp':
            v = F.lp_pool2d(x, 2, (x.size(2), x.size(3)), stride=(x.size(2), x.size(3)))
        else:  # their logsumexp_2d: max-shifted
            flat = x.view(x.size(0), x.size(1), -1)
            s, _ = torch.max(flat, dim=2, keepdim=True)
            v = s + (flat - s).exp().sum(dim=2, keepdim=True).log()
        total = total + mlp(v.flatten(1))
    return torch.sigmoid(total)[:, :, None, None]


def _authors_spatial_gate(x, cbam):
    gate = cbam.spatial_gate
    pooled = torch.cat((torch.max(x, 1)[0].unsqueeze(1), torch.mean(x, 1).unsqueeze(1)), dim=1)
    return torch.sigmoid(F.batch_norm(F.conv2d(pooled, gate.conv.weight, padding=gate.conv.padding),
                                      gate.bn.running_mean, gate.bn.running_var, gate.bn.weight, gate.bn.bias,
                                      False, 0., gate.bn.eps))


def _authors_cbam(x, cbam, pool_types, no_spatial):
    out = x * _authors_channel_gate(x, cbam, pool_types)
    return out if no_spatial else out * _authors_spatial_gate(out, cbam)


@pytest.mark.parametrize('no_spatial', [False, True])
@pytest.mark.parametrize('pool_types', POOL_SUBSETS, ids='-'.join)
def test_every_pool_types_and_no_spatial_equal_the_authors_cbam(pool_types, no_spatial):
    cbam = _randomize(CBAM(C, rd_channels=RD, pool_types=pool_types, no_spatial=no_spatial))
    x = torch.randn(2, C, 7, 5) * 2  # odd, non-square map: no square-only pooling
    expected = _authors_cbam(x, cbam, pool_types, no_spatial)
    torch.testing.assert_close(cbam(x.clone()), expected, rtol=1e-5, atol=1e-5)
    assert cbam.path == ('fused' if pool_types == ('avg', 'max') and not no_spatial else 'reference')


def test_lp_is_the_root_of_the_sum_not_the_mean_and_lse_is_shift_free():
    x = torch.ones(1, 4, 3, 4)  # 12 pixels of 1: sum of squares 12, mean of squares 1
    torch.testing.assert_close(cbam_channel_descriptors(x, ['lp']), torch.full((1, 4), 12 ** 0.5))
    big = torch.full((1, 4, 3, 4), 1000.)  # exp(1000) overflows; the max-shifted form does not
    torch.testing.assert_close(cbam_channel_descriptors(big, ['lse']), torch.full((1, 4), 1000 + math.log(12)))


def _count(channels, rd, pools=1, spatial=True, channel=True, kernel=7, descriptor='pool'):
    """Closed form: MLP C*r + r + r*C + C; spatial conv k*k*(2 or 1) (+ C for the 1x1 'conv' descriptor) + BN 2."""
    count = (2 * channels * rd + rd + channels) if channel else 0
    if spatial:
        count += kernel * kernel * (2 if descriptor == 'pool' else 1) + 2 + (channels if descriptor == 'conv' else 0)
    return count


@pytest.mark.parametrize('kwargs, expected', [
    (dict(), _count(64, 4)),
    (dict(pool_types=('avg',)), _count(64, 4)),  # pooling adds no parameters
    (dict(pool_types=('avg', 'max', 'lp', 'lse')), _count(64, 4)),
    (dict(no_spatial=True), _count(64, 4, spatial=False)),
    (dict(no_channel=True), _count(64, 4, channel=False)),
    (dict(spatial_kernel_size=3), _count(64, 4, kernel=3)),
    (dict(spatial_descriptor='conv'), _count(64, 4, descriptor='conv')),
    (dict(spatial_descriptor='conv', spatial_kernel_size=3), _count(64, 4, kernel=3, descriptor='conv')),
    (dict(arrangement='spatial_first'), _count(64, 4)),
    (dict(arrangement='parallel'), _count(64, 4)),
])
def test_parameter_count_of_every_variant_is_the_closed_form(kwargs, expected):
    module = CBAM(64, rd_channels=4, device='meta', **kwargs)
    assert sum(p.numel() for p in module.parameters()) == expected


def test_arrangements_follow_their_definitions():
    x = torch.randn(2, C, 6, 6)
    for arrangement in ('channel_first', 'spatial_first', 'parallel'):
        cbam = _randomize(CBAM(C, rd_channels=RD, arrangement=arrangement))
        mc, ms = cbam.channel_gate, cbam.spatial_gate
        if arrangement == 'channel_first':
            expected = (x * mc(x)) * ms(x * mc(x))
        elif arrangement == 'spatial_first':
            expected = (x * ms(x)) * mc(x * ms(x))
        else:
            expected = x * mc(x) * ms(x)
        torch.testing.assert_close(cbam(x.clone()), expected)
    outputs = [_randomize(CBAM(C, rd_channels=RD, arrangement=a))(x) for a in ('channel_first', 'spatial_first')]
    assert not torch.allclose(*outputs)  # the order matters with the same weights (same seed per module)


def test_spatial_only_and_conv_descriptor_compute_their_formulas():
    x = torch.randn(2, C, 5, 7)
    spatial_only = _randomize(CBAM(C, no_channel=True))
    torch.testing.assert_close(spatial_only(x), x * _authors_spatial_gate(x, spatial_only))
    assert spatial_only.channel_gate is None and spatial_only.path == 'reference'
    conv = _randomize(CBAM(C, rd_channels=RD, no_channel=True, spatial_descriptor='conv', spatial_kernel_size=3))
    gate = conv.spatial_gate
    logits = F.batch_norm(F.conv2d(F.conv2d(x, gate.reduce.weight), gate.conv.weight, padding=1),
                          gate.bn.running_mean, gate.bn.running_var, gate.bn.weight, gate.bn.bias, False, 0., 1e-5)
    torch.testing.assert_close(conv(x), x * torch.sigmoid(logits))


@pytest.mark.parametrize('kwargs, message', [
    (dict(pool_types=()), 'non-empty subset'),
    (dict(pool_types=('avg', 'mean')), 'non-empty subset'),
    (dict(arrangement='spatial'), 'arrangement'),
    (dict(spatial_descriptor='learned'), 'spatial_descriptor'),
    (dict(spatial_kernel_size=4), 'odd'),
    (dict(no_spatial=True, no_channel=True), 'at least one gate'),
])
def test_impossible_options_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CBAM(16, **kwargs)


def test_fused_and_reference_agree_in_training_on_every_path():
    x = torch.randn(2, C, 6, 5, requires_grad=True)
    for kwargs in (dict(), dict(pool_types=('lp', 'lse')), dict(arrangement='parallel')):
        cbam = _randomize(CBAM(C, rd_channels=RD, **kwargs)).train()
        with fused_gating(True):
            fused = cbam(x)
        with fused_gating(False):
            reference = cbam(x)
        torch.testing.assert_close(fused, reference, rtol=1e-5, atol=1e-5)
        fused.sum().backward()


@pytest.mark.parametrize('cbam_args', [
    dict(pool_types=('avg',)), dict(no_spatial=True), dict(spatial_descriptor='conv', spatial_kernel_size=3),
    dict(arrangement='spatial_first'),
])
def test_options_reach_the_zoo_and_insert_cbam_with_the_same_keys(cbam_args):
    zoo = timm.create_model('resnet18_cbam', cbam_args=cbam_args)
    inserted = insert_cbam(torchvision.models.resnet18(), cbam_args=cbam_args)
    assert sorted(k for k in zoo.state_dict() if '.se.' in k) == sorted(k for k in inserted.state_dict()
                                                                        if '.se.' in k)
    assert all(m.arrangement == cbam_args.get('arrangement', 'channel_first')
               for m in zoo.modules() if isinstance(m, CBAM))
    with torch.device('meta'):
        meta = timm.create_model('resnet18_cbam', cbam_args=cbam_args)
    assert sum(p.numel() for p in meta.parameters()) == sum(p.numel() for p in zoo.parameters())
    out = zoo(torch.randn(2, 3, 64, 64))
    out.sum().backward()
    assert out.shape == (2, 1000)


@pytest.mark.parametrize('kwargs', [dict(pool_types=('avg', 'max', 'lp', 'lse')),
                                    dict(arrangement='parallel', spatial_descriptor='conv'), dict(no_channel=True)])
def test_every_option_scripts(kwargs):
    cbam = _randomize(CBAM(C, rd_channels=RD, **kwargs))
    x = torch.randn(1, C, 5, 6)
    torch.testing.assert_close(torch.jit.script(cbam)(x), cbam(x))


@pytest.mark.parametrize('kwargs', [dict(pool_types=('avg', 'max', 'lp', 'lse')),
                                    dict(arrangement='spatial_first', spatial_descriptor='conv')])
def test_every_option_exports_to_onnx_and_matches_in_onnxruntime(kwargs, tmp_path):
    ort = pytest.importorskip('onnxruntime')
    cbam = _randomize(CBAM(C, rd_channels=RD, **kwargs))
    x = torch.randn(2, C, 7, 5)
    path = tmp_path / 'cbam.onnx'
    torch.onnx.export(cbam, (x,), str(path), input_names=['x'], output_names=['y'], dynamo=False,
                      dynamic_axes={'x': {0: 'b', 2: 'h', 3: 'w'}})
    session = ort.InferenceSession(str(path), providers=['CPUExecutionProvider'])
    other = torch.randn(1, C, 9, 4)  # another batch and map size than the export's
    for sample in (x, other):
        got = session.run(None, {'x': sample.numpy()})[0]
        torch.testing.assert_close(torch.from_numpy(got), cbam(sample), rtol=1e-4, atol=1e-4)


ROOT = Path(__file__).resolve().parents[1]


def _ablation_rows():
    text = (ROOT / 'docs/layers.md').read_text()
    table = text[text.index('<!-- cbam-ablations:start -->'):text.index('<!-- cbam-ablations:end -->')]
    for line in table.splitlines()[3:]:
        cells = [c.strip() for c in line.strip('|').split('|')]
        yield cells[1].strip('`'), int(cells[3].replace(',', '')), float(cells[4])


@pytest.mark.parametrize('config, params, gmacs', list(_ablation_rows()), ids=lambda v: str(v))
def test_every_ablation_config_passes_the_check_and_builds_the_documented_model(config, params, gmacs):
    if config.startswith('—'):
        model = timm.create_model('resnet50', device='meta')
    else:
        cfg = load_config(str(ROOT / 'configs' / config), ['data.dataset=digits', 'model.num_classes=null'])
        check_config(cfg)  # the check a run makes before any work
        model = timm.create_model(cfg.model.name, device='meta', num_classes=1000, **attention_kwargs(cfg))
    assert count_params(model) == params
    assert round(count_flops(model, (3, 224, 224)) / 2e9, 3) == gmacs


def test_every_ablation_config_is_in_the_table():
    documented = {row[0] for row in _ablation_rows()}
    assert {p.name for p in (ROOT / 'configs').glob('resnet50_cbam_ablation_*.yaml')} <= documented


@pytest.mark.parametrize('sets, message', [
    (['model.name=resnet18_cbam', 'model.cbam_args={pool_types: [median]}'], 'pool_types must be a non-empty subset'),
    (['model.name=resnet18_cbam', 'model.cbam_args={kernel: 3}'],
     r"model\.cbam_args key 'kernel' is not an argument of CBAM"),
    (['model.bam_args={num_dilated: 100000}'],
     r"model\.bam_args 'num_dilated' is 100000; use a value in \[0, 16\]"),
    (['model.name=resnet18_cbam', 'model.cbam_args={pool_types: avg}'], "CBAM takes a list of str there"),
    (['model.name=resnet18_cbam', 'model.cbam_args={act_layer: os.system}'], 'name an activation timm knows'),
    (['model.name=resnet18', 'model.cbam_args={arrangement: parallel}'], 'cannot build resnet18:'),
])
def test_bad_cbam_args_in_a_config_are_one_line(sets, message, tmp_path):
    with pytest.raises(ConfigError, match=message):
        check_config(load_config(None, ['data.dataset=digits', *sets]))


@pytest.mark.parametrize('cbam_args', [dict(no_spatial=True), dict(no_channel=True)])
def test_single_gate_cbam_attention_maps_and_figure(cbam_args, tmp_path):
    from bam_models.visualize import capture_attention, save_attention_figure
    model = timm.create_model('resnet18_cbam', cbam_args=cbam_args, num_classes=10).eval()
    images = torch.randn(2, 3, 64, 64)
    attention = capture_attention(model, images).modules['layer1.0.se']
    assert (attention.spatial is None) == cbam_args.get('no_spatial', False)
    assert (attention.channel is None) == cbam_args.get('no_channel', False)
    save_attention_figure(model, images, str(tmp_path / 'maps.png'))
    assert (tmp_path / 'maps.png').stat().st_size > 0


def test_attention_args_in_a_config_resolve_an_activation_name():
    cfg = load_config(None, ['data.dataset=digits', 'model.name=resnet18_cbam', 'model.cbam_args={act_layer: silu}'])
    check_config(cfg)
    model = timm.create_model(cfg.model.name, device='meta', **attention_kwargs(cfg))
    assert isinstance(model.layer1[0].se.channel_gate.act, torch.nn.SiLU)

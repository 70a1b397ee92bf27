""" Attention capture, Grad-CAM and the attention figure (bam_models.visualize, `bam-models visualize`). """
import copy
import re

import numpy as np
import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from PIL import Image

import bam_models
from bam_models import BAM, CBAM, insert_bam, insert_cbam
from bam_models.cli import main as cli_main
from bam_models.visualize import capture_attention, choose_cam_layer, grad_cam, save_attention_figure

SIZE = 64
# stage -> (modules, channels, spatial size) at 64 px
EXPECTED_STAGES = {
    'resnet18_bam': {'layer1': (1, 64, 16), 'layer2': (1, 128, 8), 'layer3': (1, 256, 4)},
    'resnet18_cbam': {'layer1': (2, 64, 16), 'layer2': (2, 128, 8), 'layer3': (2, 256, 4), 'layer4': (2, 512, 2)},
    'mobilenetv1_100_bam': {'blocks.0': (1, 64, 32), 'blocks.1': (1, 128, 16), 'blocks.2': (1, 256, 8),
                            'blocks.3': (1, 512, 4)},
}


def _randomise_attention(model: nn.Module) -> nn.Module:
    """Non-trivial gates: random BN affine and running stats in every BAM/CBAM (CBAM's spatial BN starts at
    weight 0, which makes every spatial map exactly 0.5), and no zero-initialised BN in the trunk (timm's
    zero_init_last would feed CBAM an all-zero map)."""
    generator = torch.Generator().manual_seed(1)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.weight.data = 0.5 + torch.rand(module.num_features, generator=generator)
    for module in model.modules():
        if isinstance(module, (BAM, CBAM)):
            for bn in module.modules():
                if isinstance(bn, nn.BatchNorm2d):
                    bn.weight.data = torch.randn(bn.num_features, generator=generator)
                    bn.bias.data = torch.randn(bn.num_features, generator=generator)
                    bn.running_mean.data = 0.1 * torch.randn(bn.num_features, generator=generator)
    return model


def _model(name: str, **kwargs) -> nn.Module:
    return _randomise_attention(timm.create_model(name, **{'num_classes': 10, **kwargs}))


def _hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.mark.parametrize('name,train', [
    ('resnet18_bam', True), ('resnet18_cbam', False), ('resnet18_cbam', True), ('mobilenetv1_100_bam', False),
])
def test_capture_shapes_ranges_and_identical_output(name, train):
    model = _model(name).train(train)
    reference = copy.deepcopy(model)  # train mode updates BN running stats: compare against an untouched copy
    images = torch.randn(2, 3, SIZE, SIZE)
    expected_output = reference(images)

    capture = capture_attention(model, images)

    if train and name.endswith('_cbam'):
        # the hooks on each CBAM make its block call BatchNorm and CBAM separately, not as one node
        torch.testing.assert_close(capture.output, expected_output, rtol=1e-5, atol=1e-5)
    else:
        assert torch.equal(capture.output, expected_output)
    assert _hook_count(model) == 0
    assert list(capture.stages) == list(EXPECTED_STAGES[name])
    for stage_name, (num_modules, channels, size) in EXPECTED_STAGES[name].items():
        stage = capture.stages[stage_name]
        assert len(stage.modules) == num_modules
        assert stage.spatial.shape == (2, size, size) and stage.size == (size, size)
        assert stage.channel.shape == (2, channels)
        for values in (stage.spatial, stage.channel):
            assert values.dtype == torch.float32 and not values.requires_grad
            assert 0. <= values.min() and values.max() <= 1.
            assert values.std() > 1e-5, 'randomised gates must give non-constant maps'
    assert sum(len(s.modules) for s in capture.stages.values()) == len(capture.modules)
    if name.endswith('_cbam'):
        layer = capture.stages['layer2']
        members = [capture.modules[m] for m in layer.modules]
        assert layer.modules == ('layer2.0.se', 'layer2.1.se')
        torch.testing.assert_close(layer.spatial, (members[0].spatial + members[1].spatial) / 2)
    if train:  # the capture pass is an ordinary training forward: it also updates running stats
        bn = next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d))
        bn_ref = next(m for m in reference.modules() if isinstance(m, nn.BatchNorm2d))
        torch.testing.assert_close(bn.running_mean, bn_ref.running_mean)
    model.eval()
    assert torch.equal(model(images), copy.deepcopy(model)(images))


def _module_io(model: nn.Module, module_type, images):
    """(input, output) of every module of `module_type`, recorded independently of bam_models.visualize."""
    inputs, records = {}, {}

    # copies: in inference the zoo's attention overwrites its input, and the block adds the shortcut into the
    # attention output in place afterwards
    def record_input(name):
        return lambda module, args: inputs.__setitem__(name, args[0].clone())

    def record(name):
        return lambda module, args, out: records.__setitem__(name, (inputs[name], out.clone()))
    handles = []
    for n, m in model.named_modules():
        if isinstance(m, module_type):
            handles += [m.register_forward_pre_hook(record_input(n)), m.register_forward_hook(record(n))]
    with torch.no_grad():
        model(images)
    for handle in handles:
        handle.remove()
    return records


@pytest.mark.parametrize('bam_args', [
    dict(), dict(fusion='sum'), dict(fusion='max'), dict(gates='channel'), dict(gates='spatial'),
], ids=['product', 'sum', 'max', 'channel_only', 'spatial_only'])
def test_bam_maps_are_the_applied_attention(bam_args):
    model = _model('resnet18_bam', bam_args=bam_args).eval()
    images = torch.randn(2, 3, SIZE, SIZE)
    capture = capture_attention(model, images)
    for name, (x, out) in _module_io(model, BAM, images).items():
        if model.get_submodule(name).input_relu:  # the zoo's BAM applies the ReLU that ends the block before it
            x = x.relu()
        # the attention BAM actually applied, read off its input and output: out = x * (1 + A)
        nonzero = x.abs() > 1e-2
        applied = torch.where(nonzero, out / x - 1, torch.zeros_like(x))
        assert 0 <= applied.min() and applied.max() <= 1
        attention = torch.sigmoid(model.get_submodule(name).attention_logits(x)).expand_as(x)
        torch.testing.assert_close(attention[nonzero], applied[nonzero], atol=1e-4, rtol=1e-4)
        maps = capture.modules[name]
        if 'gates' in bam_args and bam_args['gates'] == 'channel':
            assert maps.spatial is None
        else:
            torch.testing.assert_close(maps.spatial, attention.mean(1))
        if 'gates' in bam_args and bam_args['gates'] == 'spatial':
            assert maps.channel is None
        else:
            torch.testing.assert_close(maps.channel, attention.mean((2, 3)))


def test_cbam_maps_are_the_applied_gates():
    model = _model('resnet18_cbam').eval()
    images = torch.randn(2, 3, SIZE, SIZE)
    capture = capture_attention(model, images)
    for name, (x, out) in _module_io(model, CBAM, images).items():
        cbam = model.get_submodule(name)
        def mlp(v, gate=cbam.channel_gate):
            return F.conv2d(F.relu(F.conv2d(v, gate.fc1.weight, gate.fc1.bias)), gate.fc2.weight, gate.fc2.bias)
        channel = torch.sigmoid(mlp(x.mean((2, 3), keepdim=True)) + mlp(x.amax((2, 3), keepdim=True)))
        refined = x * channel
        pooled = torch.cat([refined.amax(1, keepdim=True), refined.mean(1, keepdim=True)], 1)
        spatial = torch.sigmoid(cbam.spatial_gate.bn(F.conv2d(pooled, cbam.spatial_gate.conv.weight, padding=3)))
        torch.testing.assert_close(out, refined * spatial)
        torch.testing.assert_close(capture.modules[name].channel, channel.flatten(1))
        torch.testing.assert_close(capture.modules[name].spatial, spatial[:, 0])


# one model per distinct structure (block type, widths, block counts); deeper variants repeat these
@pytest.mark.parametrize('name', [
    n for n in bam_models.list_zoo_models() if n.endswith(('_bam', '_cbam')) and '101' not in n and '152' not in n])
def test_capture_every_zoo_model_on_meta(name):
    model = timm.create_model(name, device='meta')
    capture = capture_attention(model, torch.empty(1, 3, SIZE, SIZE, device='meta'))
    feature_info = {info['module']: info for info in model.feature_info}
    assert len(capture.modules) == sum(isinstance(m, (BAM, CBAM)) for m in model.modules())
    for stage_name, stage in capture.stages.items():
        info = feature_info[stage_name]
        assert stage.channel.shape == (1, info['num_chs'])
        assert stage.size == (SIZE // info['reduction'],) * 2


@pytest.mark.parametrize('insert', [insert_bam, insert_cbam])
def test_capture_torchvision_model_with_inserted_attention(insert):
    model = _randomise_attention(insert(torchvision.models.resnet18(num_classes=10))).eval()
    images = torch.randn(1, 3, SIZE, SIZE)
    capture = capture_attention(model, images)
    assert torch.equal(capture.output, model(images))
    expected = ['layer1', 'layer2', 'layer3'] if insert is insert_bam else ['layer1', 'layer2', 'layer3', 'layer4']
    assert list(capture.stages) == expected


def test_capture_removes_hooks_when_forward_raises():
    model = _model('resnet18_bam').eval()
    with pytest.raises(ValueError, match='expected an image batch'):
        capture_attention(model, torch.randn(1, 1, SIZE, SIZE))
    assert _hook_count(model) == 0

    def fail(module, args, output):
        raise RuntimeError('fails after layer1.bam ran')
    handle = model.layer2.register_forward_hook(fail)
    with pytest.raises(RuntimeError, match='fails after'):
        capture_attention(model, torch.randn(1, 3, SIZE, SIZE))
    handle.remove()
    assert _hook_count(model) == 0


def test_capture_rejects_model_without_attention():
    with pytest.raises(ValueError, match='no BAM or CBAM'):
        capture_attention(timm.create_model('resnet18', num_classes=10), torch.randn(1, 3, SIZE, SIZE))


def test_grad_cam_matches_hand_computation_and_restores_model():
    model = _model('resnet18_bam').train()
    sentinel = torch.full_like(model.fc.weight, 3.)
    model.fc.weight.grad = sentinel
    images = torch.randn(2, 3, SIZE, SIZE)

    heatmaps, classes = grad_cam(model, images)

    assert model.training and model.fc.weight.grad is sentinel
    assert all(p.grad is None for n, p in model.named_parameters() if n != 'fc.weight')
    # the textbook Grad-CAM, computed here by hand: ReLU(sum_k mean(dy_c/dA_k) A_k) at layer3 (the deepest stage
    # whose map is 4x4 at 64 px; layer4's is 2x2), min-max normalised, resized bilinearly to the input and
    # normalised again, as pytorch_grad_cam does
    ref = copy.deepcopy(model).eval()
    activations = []
    handle = ref.layer3.register_forward_hook(lambda m, a, out: activations.append(out))
    logits = ref(images)
    handle.remove()
    assert classes == logits.argmax(1).tolist()
    score = logits.gather(1, torch.tensor(classes)[:, None]).sum()
    (grads,) = torch.autograd.grad(score, activations[0])
    cam = F.relu((grads.mean((2, 3), keepdim=True) * activations[0]).sum(1)).detach()
    for resize in (True, False):  # min-max, resize, and min-max again: interior peaks of a 4x4 map blur
        low, high = cam.amin((1, 2), keepdim=True), cam.amax((1, 2), keepdim=True)
        cam = (cam - low) / (high - low + 1e-7)
        if resize:
            cam = F.interpolate(cam[:, None], size=(SIZE, SIZE), mode='bilinear', align_corners=False)[:, 0]
    assert heatmaps.shape == (2, SIZE, SIZE)
    np.testing.assert_allclose(heatmaps, cam.numpy(), atol=1e-4)


@pytest.mark.parametrize('size, layer, side', [(224, 'layer4', 7), (64, 'layer3', 4), (48, 'layer2', 6),
                                              (32, 'layer2', 4)])
def test_the_default_grad_cam_layer_is_the_deepest_with_a_map_of_at_least_4x4(size, layer, side):
    model = _model('resnet18_bam').train()
    running_mean = model.layer1[0].bn1.running_mean.clone()
    cam = choose_cam_layer(model, torch.randn(2, 3, size, size))
    assert (cam.name, cam.size, cam.note) == (layer, (side, side), None)
    assert cam.module is model.get_submodule(layer)
    assert model.training and torch.equal(model.layer1[0].bn1.running_mean, running_mean)  # measured unchanged


def test_grad_cam_layers_below_4x4_say_why():
    model = _model('resnet18_bam').eval()
    asked = choose_cam_layer(model, torch.randn(1, 3, 32, 32), target_layer='layer4')
    assert (asked.name, asked.size) == ('layer4', (1, 1))  # drawn as asked, with the reason it is blank
    assert asked.note == ("Grad-CAM at layer4 is 1x1 at input 32x32, too coarse to show where the model looks "
                          "(below 4x4); the default target, layer2, is 4x4")
    inserted = insert_bam(timm.create_model('resnet18', num_classes=10)).eval()  # takes 4 px, as timm's does
    tiny = choose_cam_layer(inserted, torch.randn(1, 3, 4, 4))
    assert (tiny.name, tiny.size) == ('act1', (2, 2))
    assert tiny.note == ("no feature stage reaches 4x4 at input 4x4: Grad-CAM uses act1, the largest map (2x2); "
                         "a larger input size gives a finer one")
    with pytest.raises(ValueError, match='fc puts out no .B, C, H, W. feature map for Grad-CAM; pass a feature '
                                         'stage such as layer2'):
        choose_cam_layer(model, torch.randn(1, 3, 32, 32), target_layer='fc')


def test_cli_visualize_of_a_32_px_checkpoint_draws_grad_cam_at_4x4(tmp_path, image_files, capsys):
    model = _model('resnet18_bam', num_classes=7)
    checkpoint = tmp_path / 'best.pth'  # as `bam-models train` writes it: with the preprocessing it trained at
    torch.save({'state_dict': model.state_dict(), 'data_config': {'input_size': (3, 32, 32), 'crop_pct': 1.0}},
               checkpoint)
    argv = ['visualize', '--model', 'resnet18_bam', '--checkpoint', str(checkpoint), '--image', *image_files]
    assert cli_main([*argv, '--out', str(tmp_path / 'default.png')]) == 0
    out, err = capsys.readouterr()
    assert 'layer3: 1 BAM, 2x2' in out and 'Grad-CAM: layer2, 4x4' in out and err == ''
    cam_panel = _panels(tmp_path / 'default.png', 2 + 3)[1][-1]
    assert cam_panel.std() > 10
    assert cli_main([*argv, '--out', str(tmp_path / 'layer4.png'), '--target-layer', 'layer4']) == 0
    out, err = capsys.readouterr()
    assert 'Grad-CAM: layer4, 1x1' in out
    assert err == ('warning: Grad-CAM at layer4 is 1x1 at input 32x32, too coarse to show where the model looks '
                   '(below 4x4); the default target, layer2, is 4x4\n')


def _panels(path, columns):
    """The PNG as an RGB array split into `columns` equal-width panels."""
    pixels = np.asarray(Image.open(path).convert('RGB'), dtype=np.float32)
    width = pixels.shape[1] // columns
    return pixels, [pixels[:, i * width:(i + 1) * width] for i in range(columns)]


def _assert_distinct_panels(panels):
    for i in range(len(panels)):
        assert panels[i].std() > 10, f'panel {i} is (nearly) a single colour'
        for j in range(i):
            assert np.abs(panels[i] - panels[j]).mean() > 2, f'panels {j} and {i} look the same'


def test_save_attention_figure_writes_distinct_panels(tmp_path):
    model = _model('resnet18_cbam').train()
    images = torch.randn(3, 3, SIZE, SIZE)
    out = tmp_path / 'maps.png'

    capture = save_attention_figure(model, images, str(out), titles=['a', 'b', 'c'], panel_inches=2., dpi=50)

    assert model.training and _hook_count(model) == 0
    assert list(capture.stages) == list(EXPECTED_STAGES['resnet18_cbam'])
    columns = 2 + len(capture.stages)  # input, one per stage, Grad-CAM
    pixels, panels = _panels(out, columns)
    assert pixels.shape == (round(3 * 2. * 1.15 * 50), columns * 2 * 50, 3)
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 1000
    _assert_distinct_panels(panels)


def test_save_attention_figure_accepts_display_images(tmp_path):
    model = _model('mobilenetv1_100_bam').eval()
    digits = torch.rand(2, SIZE, SIZE)  # what a demo would show: grey images, values in [0, 1]
    images = (digits[:, None].expand(-1, 3, -1, -1) - 0.45) / 0.22
    out = tmp_path / 'digits.png'
    save_attention_figure(model, images, str(out), display_images=digits, class_names=[str(i) for i in range(10)])
    _, panels = _panels(out, 2 + 4)
    _assert_distinct_panels(panels)
    with pytest.raises(ValueError, match='one display image per input'):
        save_attention_figure(model, images, str(out), display_images=digits[:1])


@pytest.fixture(scope='module')
def image_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp('images')
    yy, xx = np.mgrid[:80, :96]
    pattern = np.stack([(xx * 2) % 256, (yy * 3) % 256, ((xx + yy) * 4) % 256], -1).astype(np.uint8)
    paths = [folder / 'a.png', folder / 'b.jpg']
    Image.fromarray(pattern).save(paths[0])
    Image.fromarray(255 - pattern).save(paths[1])
    return [str(p) for p in paths]


@pytest.mark.parametrize('fmt', ['safetensors', 'torch'])
def test_cli_visualize_with_checkpoint(tmp_path, image_files, capsys, fmt):
    from safetensors.torch import save_file
    model = _model('resnet18_bam', num_classes=7)
    checkpoint = tmp_path / f'weights.{"safetensors" if fmt == "safetensors" else "pth"}'
    if fmt == 'safetensors':
        save_file(model.state_dict(), str(checkpoint))
    else:
        torch.save({'state_dict': model.state_dict(), 'epoch': 3}, checkpoint)
    out = tmp_path / 'maps.png'

    assert cli_main(['visualize', '--model', 'resnet18_bam', '--checkpoint', str(checkpoint),
                     '--image', *image_files, '--out', str(out), '--img-size', str(SIZE)]) == 0

    printed = capsys.readouterr().out
    for stage, (_, _, size) in EXPECTED_STAGES['resnet18_bam'].items():
        assert f'{stage}: 1 BAM, {size}x{size}' in printed
    pixels, panels = _panels(out, 2 + 3)
    assert pixels.shape[0] == round(2 * 2. * 1.15 * 100)
    _assert_distinct_panels(panels)


def test_cli_visualize_local_dir_model(tmp_path, image_files, capsys):
    model = _model('mobilenetv1_100_bam', num_classes=3)
    timm.models.save_for_hf(model, str(tmp_path / 'model'), model_config={'label_names': ['cat', 'dog', 'fox']})
    out = tmp_path / 'maps.png'
    assert cli_main(['visualize', '--model', f'local-dir:{tmp_path / "model"}', '--image', image_files[0],
                     '--out', str(out), '--img-size', str(SIZE)]) == 0
    assert 'blocks.3: 1 BAM, 4x4' in capsys.readouterr().out
    _assert_distinct_panels(_panels(out, 2 + 4)[1])


def test_cli_visualize_explains_missing_or_mismatched_weights(tmp_path, image_files, capsys):
    from safetensors.torch import save_file
    out = str(tmp_path / 'maps.png')
    assert cli_main(['visualize', '--model', 'resnet18_bam', '--image', image_files[0], '--out', out]) == 2
    error = capsys.readouterr().err.strip()
    assert re.fullmatch(r'error: resnet18_bam has no pretrained weights.*; .*--checkpoint.*--random-init.*', error)
    save_file(timm.create_model('resnet18_cbam', num_classes=7).state_dict(), str(tmp_path / 'cbam.safetensors'))
    assert cli_main(['visualize', '--model', 'resnet18_bam', '--checkpoint', str(tmp_path / 'cbam.safetensors'),
                     '--image', image_files[0], '--out', out]) == 2
    error = capsys.readouterr().err.strip()
    assert re.fullmatch(r'error: checkpoint .*cbam.safetensors does not fit resnet18_bam: 96 missing keys .*; '
                        r'80 unexpected keys .*', error)
    assert not (tmp_path / 'maps.png').exists()


def test_capture_refuses_a_bam_that_bypasses_its_gate_modules():
    model = _model('resnet18_bam').eval()
    bam = model.layer2.bam
    # a forward computing the gates without calling them as modules would silently hide them from hooks
    bam.forward = lambda x: x * (1 + torch.sigmoid(bam.channel_gate.forward(x) * bam.spatial_gate.forward(x)))
    with pytest.raises(RuntimeError, match='layer2.bam .BAM. ran without calling its gate submodules'):
        capture_attention(model, torch.randn(1, 3, SIZE, SIZE))
    assert _hook_count(model) == 0


def test_figure_needs_a_classifier(tmp_path):
    model = _model('resnet18_bam', num_classes=0).eval()
    with pytest.raises(ValueError, match='needs classifier logits.*num_classes > 0'):
        save_attention_figure(model, torch.randn(1, 3, SIZE, SIZE), str(tmp_path / 'x.png'))

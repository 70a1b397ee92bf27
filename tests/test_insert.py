""" insert_bam / insert_cbam turn plain torchvision and timm models into the zoo's architectures. """
import pytest
import timm
import torch
import torchvision

import bam_models
from bam_models import insert_bam, insert_cbam


def _shapes(model: torch.nn.Module):
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.mark.parametrize('builder, zoo_name', [
    (lambda: torchvision.models.resnet50(), 'resnet50_bam'),
    (lambda: torchvision.models.resnext50_32x4d(), 'resnext50_32x4d_bam'),
    (lambda: timm.create_model('resnet34'), 'resnet34_bam'),
    (lambda: timm.create_model('mobilenetv1_100'), 'mobilenetv1_100_bam'),
])
def test_insert_bam_gives_the_zoo_architecture(builder, zoo_name):
    model = insert_bam(builder())
    assert _shapes(model) == _shapes(timm.create_model(zoo_name, device='meta'))


@pytest.mark.parametrize('builder, zoo_name', [
    (lambda: torchvision.models.resnet50(), 'resnet50_cbam'),
    (lambda: torchvision.models.resnet18(), 'resnet18_cbam'),
    (lambda: timm.create_model('wide_resnet50_2'), 'wide_resnet50_2_cbam'),
])
def test_insert_cbam_gives_the_zoo_architecture(builder, zoo_name):
    model = insert_cbam(builder())
    assert _shapes(model) == _shapes(timm.create_model(zoo_name, device='meta'))


@pytest.mark.parametrize('insert, zoo_name, tv_builder', [
    (insert_bam, 'resnet18_bam', torchvision.models.resnet18),
    (insert_cbam, 'resnet18_cbam', torchvision.models.resnet18),
    (insert_cbam, 'resnet50_cbam', torchvision.models.resnet50),
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
    # the inserted attention is part of the computation: disabling it changes the output
    for module in converted.modules():
        if isinstance(module, (bam_models.BAM, bam_models.CBAM)):
            module.forward = lambda t: t
    assert not torch.allclose(converted(x), zoo(x), atol=1e-3)


def test_inserted_modules_follow_device_dtype_and_mode():
    model = torchvision.models.resnet18().double().eval()
    insert_bam(model)
    bam = model.layer2.bam
    assert not bam.training
    assert {p.dtype for p in bam.parameters()} == {torch.float64}


def test_insert_twice_and_unsupported_models_fail_clearly():
    model = insert_bam(torchvision.models.resnet18())
    with pytest.raises(ValueError, match='already has BAM'):
        insert_bam(model)
    cbam_model = insert_cbam(torchvision.models.resnet18())
    with pytest.raises(ValueError, match='already have an attention'):
        insert_cbam(cbam_model)
    with pytest.raises(ValueError, match='already have an attention'):
        insert_cbam(timm.create_model('seresnet50', device='meta'))
    with pytest.raises(TypeError, match='does not support .*VGG.*supported'):
        insert_bam(torchvision.models.vgg11())
    with pytest.raises(TypeError, match='MobileNetV1 has none'):
        insert_cbam(timm.create_model('mobilenetv1_100', device='meta'))
    with pytest.raises(TypeError, match='does not support'):
        insert_cbam(timm.create_model('vit_tiny_patch16_224', device='meta'))

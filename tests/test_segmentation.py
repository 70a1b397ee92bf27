""" Zoo models as segmentation_models_pytorch timm-universal encoders ('tu-<name>'), dilated included. """
import pytest
import segmentation_models_pytorch as smp
import timm
import torch

import bam_models  # noqa: F401  (registers the zoo)

X = (2, 3, 64, 96)


def _train_step(model):
    x = torch.randn(X)
    out = model.train()(x)
    assert out.shape == (2, 3, 64, 96)
    torch.nn.functional.cross_entropy(out, torch.randint(0, 3, (2, 64, 96))).backward()
    return out


def test_unet_with_bam_encoder():
    model = smp.Unet('tu-resnet18_bam', encoder_weights=None, classes=3)
    _train_step(model)
    bam = model.encoder.model.layer1.bam
    assert bam.spatial_gate.conv_dil0.weight.grad.abs().sum() > 0


@pytest.mark.parametrize('name,output_stride,bam_path,refined_stride', [
    ('resnet18_bam', 8, 'layer3.bam', 8),
    ('mobilenetv1_100_bam', 16, 'blocks_3.bam', 16),
])
def test_deeplabv3plus_with_dilated_encoder(name, output_stride, bam_path, refined_stride):
    model = smp.DeepLabV3Plus(
        f'tu-{name}', encoder_weights=None, classes=3, encoder_output_stride=output_stride)
    refined = {}
    model.encoder.model.get_submodule(bam_path).register_forward_hook(lambda m, i, o: refined.setdefault('out', o))
    _train_step(model)
    features = model.encoder(torch.randn(X))
    assert [f.shape[-1] for f in features] == [96, 48, 24, 12, 96 // min(16, output_stride), 96 // output_stride]
    # the BAM refines its stage's output, now at the dilated stride, and its parameters get gradients
    assert refined['out'].shape[-1] == 96 // refined_stride
    assert model.encoder.model.get_submodule(bam_path).channel_gate.fc1.weight.grad is not None


def test_dilated_bam_keeps_its_receptive_field():
    """At output_stride 8, layer3 samples its maps twice as densely; BAM's spatial gate dilates with it, so on
    the dense map it computes exactly what the undilated network's gate computes on every other pixel."""
    plain = timm.create_model('resnet18_bam').eval()
    dilated = timm.create_model('resnet18_bam', output_stride=8).eval()
    dilated.load_state_dict(plain.state_dict())  # same keys and shapes: pretrained weights transfer
    dense = torch.randn(1, 256, 16, 24)
    with torch.no_grad():
        expected = plain.layer3.bam.spatial_gate(dense[..., ::2, ::2])
        got = dilated.layer3.bam.spatial_gate(dense)[..., ::2, ::2]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert dilated.layer2.bam.spatial_gate.conv_dil0.dilation == (4, 4)  # layer2 is not dilated at stride 8

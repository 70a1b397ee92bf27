""" Zoo models as torchvision detection backbones: FPN wiring, frozen stages and norms, and real training. """
import pytest
import timm
import torch
import torch.nn as nn
from torchvision.ops.misc import FrozenBatchNorm2d

import bam_models  # noqa: F401  (registers the zoo)
from bam_models.detection import backbone_with_fpn, fasterrcnn_fpn, maskrcnn_fpn, retinanet_fpn
from synthetic_detection import make_dataset

# small images, a narrow FPN and few proposals keep a CPU training step well under a second; these are all
# torchvision kwargs (and one backbone_with_fpn kwarg), so the builders' pass-through is exercised as well
SMALL = dict(
    min_size=128, max_size=160, out_channels=64,
    rpn_batch_size_per_image=64, rpn_pre_nms_top_n_train=200, rpn_post_nms_top_n_train=100,
    rpn_pre_nms_top_n_test=100, rpn_post_nms_top_n_test=50, box_batch_size_per_image=64,
)
RETINA_SMALL = dict(min_size=128, max_size=160, out_channels=64, topk_candidates=100)


def _trainable(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def _expected_trainable(name: str, prefixes, include_norm: bool) -> int:
    """Parameters of the classification model under `prefixes`, counted without the detection code."""
    model = timm.create_model(name)
    total = 0
    for module_name, module in model.named_modules():
        if not any(module_name == p or module_name.startswith(p + '.') for p in prefixes):
            continue
        if isinstance(module, nn.BatchNorm2d) and not include_norm:
            continue
        total += sum(p.numel() for p in module.parameters(recurse=False))
    return total


@pytest.mark.parametrize('name,trainable_stages,norm,prefixes', [
    ('resnet18_bam', 3, 'frozen', ('layer2', 'layer3', 'layer4')),
    ('resnet18_bam', 5, 'frozen', ('conv1', 'bn1', 'layer1', 'layer2', 'layer3', 'layer4')),
    ('resnet18_bam', 1, 'batchnorm', ('layer4',)),
    ('resnet18_cbam', 2, 'frozen', ('layer3', 'layer4')),
    ('mobilenetv1_100_bam', 3, 'frozen', ('blocks.2', 'blocks.3', 'blocks.4')),
    ('resnet18', 0, 'frozen', ()),
])
def test_trainable_stages_are_exact(name, trainable_stages, norm, prefixes):
    backbone = backbone_with_fpn(name, trainable_stages=trainable_stages, norm=norm)
    expected = _expected_trainable(name, prefixes, include_norm=norm == 'batchnorm')
    assert _trainable(backbone.body) == expected
    assert _trainable(backbone.fpn) == sum(p.numel() for p in backbone.fpn.parameters()) > 0
    if norm == 'frozen':
        # every norm of the trunk, the attention modules' included, is frozen
        assert not any(isinstance(m, nn.BatchNorm2d) for m in backbone.body.modules())
        assert any(isinstance(m, FrozenBatchNorm2d) for m in backbone.body.modules())


def test_frozen_stage_freezes_its_attention():
    backbone = backbone_with_fpn('resnet18_bam', trainable_stages=3)
    bam1 = backbone.body.layer1.bam
    assert isinstance(bam1.channel_gate.bn, FrozenBatchNorm2d)
    assert not any(p.requires_grad for p in bam1.parameters())
    assert all(p.requires_grad for p in backbone.body.layer2.bam.parameters())


def test_features_are_attention_refined_and_stride_ordered():
    backbone = backbone_with_fpn('resnet18_bam', returned_stages=(1, 2, 3, 4)).eval()
    refined = {}
    backbone.body.layer1.bam.register_forward_hook(lambda m, i, o: refined.setdefault('layer1', o))
    x = torch.randn(1, 3, 64, 96)
    features = backbone.body(x)
    torch.testing.assert_close(features[0], refined['layer1'], rtol=0, atol=0)
    assert [tuple(f.shape[-2:]) for f in features] == [(16, 24), (8, 12), (4, 6), (2, 3)]
    pyramid = backbone(x)
    assert list(pyramid) == ['0', '1', '2', '3', 'pool']
    assert all(level.shape[1] == backbone.out_channels == 256 for level in pyramid.values())


def test_returned_stages_truncate_the_trunk():
    backbone = backbone_with_fpn('resnet18_bam', returned_stages=(1, 2, 3))
    assert not hasattr(backbone.body, 'layer4')
    assert backbone.body.feature_info.reduction() == [4, 8, 16]
    with pytest.raises(ValueError, match='returned_stages'):
        backbone_with_fpn('resnet18_bam', returned_stages=(0, 1))
    with pytest.raises(ValueError, match='trainable_stages'):
        backbone_with_fpn('resnet18_bam', trainable_stages=6)


def _batches(samples, batch_size):
    for i in range(0, len(samples), batch_size):
        chunk = samples[i:i + batch_size]
        yield [image for image, _ in chunk], [dict(target) for _, target in chunk]


def test_fasterrcnn_training_lowers_the_loss_and_evaluates():
    torch.manual_seed(0)
    model = fasterrcnn_fpn('resnet18_bam', num_classes=4, **SMALL)
    # 8 images of four different non-square and square sizes, two per batch: every batch mixes sizes
    samples = make_dataset(8, seed=0)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=1e-4)
    model.train()
    losses = []
    for step in range(30):
        batch = list(_batches(samples, 2))[step % 4]
        loss = sum(model(*batch).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    # the first and the last four steps see the same four batches; measured ratio about 0.55 (seeds 0, 1)
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    assert last < 0.7 * first, f"loss went from {first:.3f} to {last:.3f}: {losses}"

    # 30 steps from random weights leave class scores low; keep every scored box so the types are checked
    model.roi_heads.score_thresh = 0.0
    model.eval()
    with torch.no_grad():
        detections = model([samples[0][0], samples[1][0][:, :100, :]])
    assert len(detections) == 2
    for det in detections:
        assert det['boxes'].dtype == torch.float32 and det['boxes'].shape[1:] == (4,)
        assert det['labels'].dtype == torch.int64 and det['scores'].dtype == torch.float32
        assert len(det['boxes']) == len(det['labels']) == len(det['scores'])
        assert ((det['labels'] >= 1) & (det['labels'] <= 3)).all()
    assert len(detections[0]['boxes']) > 0


def test_batch_size_one_trains_with_trainable_batchnorm():
    # norm='batchnorm' keeps BAM's channel-gate BN live: a single image gives it one value per channel
    model = fasterrcnn_fpn('resnet18_bam', num_classes=4, norm='batchnorm', **SMALL).train()
    image, target = make_dataset(1, seed=1)[0]
    losses = model([image], [target])
    sum(losses.values()).backward()
    assert model.backbone.body.layer3.bam.channel_gate.fc1.weight.grad is not None


def test_retinanet_one_step():
    model = retinanet_fpn('resnet18_cbam', num_classes=4, **RETINA_SMALL).train()
    assert list(model.backbone(torch.randn(1, 3, 64, 64))) == ['0', '1', '2', 'p6', 'p7']
    images, targets = next(_batches(make_dataset(2, seed=2), 2))
    losses = model(images, targets)
    assert set(losses) == {'classification', 'bbox_regression'}
    sum(losses.values()).backward()
    model.eval()
    with torch.no_grad():
        assert set(model(images)[0]) == {'boxes', 'labels', 'scores'}


def test_maskrcnn_one_step():
    model = maskrcnn_fpn('mobilenetv1_100_bam', num_classes=4, **SMALL).train()
    images, targets = next(_batches(make_dataset(2, seed=3), 2))
    losses = model(images, targets)
    assert 'loss_mask' in losses
    sum(losses.values()).backward()
    model.eval()
    with torch.no_grad():
        out = model(images)[0]
    assert out['masks'].shape[1:] == (1, *images[0].shape[-2:])


def test_fewer_levels_get_matching_anchors_and_roi_pools():
    model = fasterrcnn_fpn('resnet18_bam', num_classes=4, returned_stages=(2, 3, 4), **SMALL).eval()
    assert model.roi_heads.box_roi_pool.featmap_names == ['0', '1', '2']
    with torch.no_grad():
        out = model([torch.rand(3, 96, 128)])
    assert set(out[0]) == {'boxes', 'labels', 'scores'}

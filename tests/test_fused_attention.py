""" The memory-lean BAM/CBAM gating equals the plain formulation and keeps no extra full-size tensor. """
import copy

import pytest
import timm
import torch
import torch.nn.functional as F

import bam_models  # noqa: F401  registers the zoo models
from bam_models.layers import BAM, CBAM, DilatedConv2d, space_to_batch_conv2d
from bam_models.layers import fused_gates, gating_tuning


BAM_CONFIGS = [
    dict(fusion='product'),
    dict(fusion='sum'),
    dict(fusion='max'),
    dict(gates='channel'),
    dict(gates='spatial'),
    dict(fusion='product', input_relu=True),
    dict(gates='spatial', input_relu=True),
]


def _gradcheck_module_and_params(module, x):
    assert torch.autograd.gradcheck(module, (x,))
    # fast mode (random projections of the Jacobian) keeps the check of every parameter affordable
    # and for every parameter, through the gates' own small networks
    names = [n for n, _ in module.named_parameters()]

    def with_params(x, *values):
        return torch.func.functional_call(module, dict(zip(names, values)), x)
    assert torch.autograd.gradcheck(with_params, (x, *module.parameters()), fast_mode=True)


@pytest.mark.parametrize('fusion,input_relu,reduction', [
    ('product', False, 'conv'), ('product', True, 'matmul'), ('sum', True, 'conv'), ('max', False, 'conv'),
])
def test_bam_gradcheck(fusion, input_relu, reduction):
    with gating_tuning.forced_kernel('bam_reduce_1x1', reduction):  # the 1x1 reduction's two kernels
        _bam_gradcheck(fusion, input_relu)


def _bam_gradcheck(fusion, input_relu):
    module = BAM(6, rd_channels=3, dilation=1, fusion=fusion, input_relu=input_relu).double().train()
    for p in module.parameters():
        torch.nn.init.normal_(p, std=0.5)
    x = torch.randn(3, 6, 4, 5, dtype=torch.double, requires_grad=True)
    _gradcheck_module_and_params(module, x)


@pytest.mark.parametrize('cls', [BAM, CBAM])
def test_inplace_attention_overwrites_its_input_only_when_autograd_records_nothing(cls):
    module = cls(16, inplace=True).eval()
    reference = copy.deepcopy(module)
    reference.inplace = False
    x = torch.randn(4, 16, 9, 7)
    expected = reference(x)
    x_grad = x.clone().requires_grad_()
    torch.testing.assert_close(module(x_grad), expected)
    torch.testing.assert_close(x_grad.detach(), x)  # recorded for autograd: input untouched
    with torch.no_grad():
        out = module(x)
    assert out.data_ptr() == x.data_ptr()
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize('name', ['resnet18_bam', 'mobilenetv1_100_bam', 'resnet18_cbam'])
def test_zoo_attention_overwrites_its_input_in_inference_with_the_same_result(name):
    model = timm.create_model(name).eval()
    attention = [m for m in model.modules() if isinstance(m, (BAM, CBAM))]
    assert attention and all(m.inplace for m in attention)
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        overwritten = model(x)
        for m in attention:
            m.inplace = False
        torch.testing.assert_close(overwritten, model(x), rtol=0, atol=0)


def test_bam_max_splits_ties_like_torch_maximum():
    module = BAM(8, rd_channels=2, fusion='max').double().train()
    for p in module.parameters():
        torch.nn.init.normal_(p, std=0.5)
    # both branches end in zero-initialised BNs: their logits are 0 everywhere, every element a tie
    for bn in (module.channel_gate.bn_out, module.spatial_gate.bn_out):
        torch.nn.init.zeros_(bn.weight)
        torch.nn.init.zeros_(bn.bias)
    x = torch.randn(2, 8, 5, 4, dtype=torch.double, requires_grad=True)
    _compare(module, _plain_bam, x, train=True)
    assert module.channel_gate.bn_out.weight.grad.abs().sum() > 0


def test_cbam_gradcheck():
    module = CBAM(6, rd_channels=3).double().train()
    for p in module.parameters():
        torch.nn.init.normal_(p, std=0.5)
    x = torch.randn(3, 6, 4, 5, dtype=torch.double, requires_grad=True)
    _gradcheck_module_and_params(module, x)


def test_cbam_splits_tied_maxima_like_amax():
    # few distinct values: many ties in the maxima over H, W and over channels
    module = CBAM(8, rd_channels=2).double().train()
    for p in module.parameters():
        torch.nn.init.normal_(p, std=0.5)
    x = torch.randint(-2, 3, (2, 8, 5, 4)).double().requires_grad_()
    assert (x == x.amax((2, 3), keepdim=True)).sum() > x.shape[0] * x.shape[1]
    _compare(module, _plain_cbam, x, train=True)


@pytest.mark.parametrize('shape', [(2, 64, 7, 7), (3, 48, 5, 6), (2, 2048, 1, 1), (2, 24, 4, 4), (1, 16, 3, 3)])
@pytest.mark.parametrize('channels_last', [False, True])
def test_channel_amax_equals_amax(shape, channels_last):
    x = torch.randint(-3, 4, shape).float()  # ties across channel groups
    x[0, -1, 0, 0] = float('nan')  # propagated like amax
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    torch.testing.assert_close(fused_gates.channel_amax(x), x.amax(1, keepdim=True), rtol=0, atol=0, equal_nan=True)


def test_channel_amax_under_autograd_splits_ties_like_amax():
    x = torch.zeros(1, 32, 1, 1, requires_grad=True)
    x.data[0, [0, 1, 16], 0, 0] = 1.  # tied maxima: two in one 16-channel group, one in the other
    fused_gates.channel_amax(x).sum().backward()
    assert torch.equal(x.grad[0, [0, 1, 16], 0, 0], torch.full((3,), 1 / 3))


@pytest.mark.parametrize('shape,dilation', [
    ((1, 5, 14, 14), 4),  # H, W not multiples of d
    ((2, 3, 16, 12), 4),  # multiples of d, batch > 1
    ((3, 4, 9, 7), 2),  # odd sizes
    ((1, 3, 3, 5), 4),  # smaller than d: every tap but the centre reads padding
    ((2, 3, 6, 6), 1),
], ids=str)
def test_space_to_batch_conv_equals_dilated_conv(shape, dilation):
    x = torch.randn(*shape, dtype=torch.double, requires_grad=True)
    weight = torch.randn(6, shape[1], 3, 3, dtype=torch.double, requires_grad=True)
    bias = torch.randn(6, dtype=torch.double, requires_grad=True)
    out = space_to_batch_conv2d(x, weight, bias, dilation)
    grads = torch.autograd.grad(out.square().sum(), (x, weight, bias))
    out_ref = F.conv2d(x, weight, bias, padding=dilation, dilation=dilation)
    grads_ref = torch.autograd.grad(out_ref.square().sum(), (x, weight, bias))
    torch.testing.assert_close(out, out_ref, rtol=1e-12, atol=1e-12)
    for got, expected in zip(grads, grads_ref):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


@gating_tuning.gating_autotune(False)  # the table's defaults
def test_dilated_conv_module_takes_space_to_batch_only_where_aten_is_slow():
    conv = DilatedConv2d(8, 8, dilation=4).double()
    assert isinstance(conv, torch.nn.Conv2d) and conv.padding == (4, 4) and conv.dilation == (4, 4)
    assert list(conv.state_dict()) == ['weight', 'bias']

    def kernels(x):
        with torch.profiler.profile() as prof:
            out = conv(x)
        torch.testing.assert_close(out, F.conv2d(x, conv.weight, conv.bias, padding=4, dilation=4))
        return {e.key for e in prof.key_averages()}

    assert 'aten::permute' in kernels(torch.randn(1, 8, 13, 10, dtype=torch.double))
    assert 'aten::permute' not in kernels(torch.randn(2, 8, 13, 10, dtype=torch.double))
    assert 'aten::permute' not in kernels(torch.randn(1, 8, 64, 64, dtype=torch.double))


def _plain_bam(module: BAM, x: torch.Tensor) -> torch.Tensor:
    features = F.relu(x) if module.input_relu else x
    return features * (1. + torch.sigmoid(module.attention_logits(x)))


def _plain_cbam(module: CBAM, x: torch.Tensor) -> torch.Tensor:
    """CBAM written out with the plain ops of the authors' formulation, reading the module's parameters."""
    cg, sg = module.channel_gate, module.spatial_gate

    def mlp(v):
        return F.conv2d(F.relu(F.conv2d(v, cg.fc1.weight, cg.fc1.bias)), cg.fc2.weight, cg.fc2.bias)

    x = x * torch.sigmoid(mlp(x.mean((2, 3), keepdim=True)) + mlp(x.amax((2, 3), keepdim=True)))
    pooled = torch.cat([x.amax(1, keepdim=True), x.mean(1, keepdim=True)], dim=1)
    logits = sg.bn(F.conv2d(pooled, sg.conv.weight, padding=sg.conv.padding))
    return x * torch.sigmoid(logits)


def _compare(module, plain_fn, x, train):
    reference = copy.deepcopy(module)
    module.train(train)
    reference.train(train)
    x_ref = x.detach().clone().requires_grad_()
    out = module(x)
    out_ref = plain_fn(reference, x_ref)
    grad = torch.randn_like(out)
    out.backward(grad)
    out_ref.backward(grad)
    tol = dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, out_ref, **tol)
    torch.testing.assert_close(x.grad, x_ref.grad, **tol)
    for (name, p), p_ref in zip(module.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad, **tol, msg=lambda m, name=name: f'{name}: {m}')
    for b, b_ref in zip(module.buffers(), reference.buffers()):
        torch.testing.assert_close(b, b_ref, **tol)


def test_bam_with_matmul_reduction_equals_plain_formulation():
    with gating_tuning.forced_kernel('bam_reduce_1x1', 'matmul'):
        test_bam_equals_plain_formulation(BAM_CONFIGS[0], train=True)


@pytest.mark.parametrize('train', [True, False], ids=['train', 'eval'])
@pytest.mark.parametrize('config', BAM_CONFIGS, ids=lambda c: '-'.join(f'{k}={v}' for k, v in c.items()))
def test_bam_equals_plain_formulation(config, train):
    module = BAM(32, **config).double()
    for p in module.parameters():  # non-trivial BN affine and biases so every term matters
        torch.nn.init.normal_(p, std=0.5)
    x = torch.randn(3, 32, 9, 7, dtype=torch.double, requires_grad=True)
    _compare(module, _plain_bam, x, train)


@pytest.mark.parametrize('train', [True, False], ids=['train', 'eval'])
def test_cbam_equals_plain_formulation(train):
    module = CBAM(32).double()
    for p in module.parameters():
        torch.nn.init.normal_(p, std=0.5)
    x = torch.randn(3, 32, 9, 7, dtype=torch.double, requires_grad=True)
    _compare(module, _plain_cbam, x, train)


def _full_size_saved(module, x) -> set:
    """The distinct full-size (x-sized) storages autograd keeps for backward, x itself included."""
    storages = set()

    def pack(t):
        if t.numel() == x.numel():
            storages.add(t.untyped_storage().data_ptr())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(x)
    return storages


@pytest.mark.parametrize('fusion', ['product', 'sum', 'max'])
def test_bam_keeps_only_its_input_for_backward(fusion):
    module = BAM(32, fusion=fusion).train()
    x = torch.randn(2, 32, 8, 8, requires_grad=True)
    assert _full_size_saved(module, x) == {x.untyped_storage().data_ptr()}
    # the plain formulation keeps the sigmoid and 1 + sigmoid as well: the measurement can tell
    assert len(_full_size_saved(lambda t: _plain_bam(module, t), x)) == 3


def test_bam_taking_over_the_relu_keeps_only_its_output_for_backward():
    module = BAM(32, input_relu=True).train()
    x = torch.randn(2, 32, 8, 8, requires_grad=True)
    out = []
    saved = _full_size_saved(lambda t: out.append(module(t)), x)
    assert saved == {out[0].untyped_storage().data_ptr()}
    # the ReLU before a plain BAM keeps its output, which BAM keeps as its input
    relu_then_bam = BAM(32).train()
    assert len(_full_size_saved(lambda t: relu_then_bam(F.relu(t)), x)) == 1
    assert len(_full_size_saved(lambda t: _plain_bam(module, t), x)) == 4


def _saved_bytes(model, x) -> int:
    """Bytes of the distinct storages autograd keeps for backward, parameters aside."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x)
    return sum(n for ptr, n in storages.items() if ptr not in params)


def test_zoo_bam_resnet_keeps_little_more_for_backward_than_its_trunk():
    x = torch.randn(2, 3, 128, 128)
    trunk = _saved_bytes(timm.create_model('resnet50').train(), x)
    bam = _saved_bytes(timm.create_model('resnet50_bam').train(), x)
    # three BAM outputs would be 4.3 % of the trunk's; BAM's small branches are under 1 %
    assert trunk < bam < 1.01 * trunk


def test_bam_spatial_gate_recomputes_its_activations_in_backward():
    module = BAM(64).train()
    x = torch.randn(2, 64, 8, 8, requires_grad=True)
    params = {p.untyped_storage().data_ptr() for p in module.parameters()}
    saved = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params and ptr != x.untyped_storage().data_ptr():
            saved[ptr] = t.numel()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(x)
    # of the spatial branch's six reduced-width (B x C/16 x H x W = 2 x 4 x 8 x 8) activations only the first
    # convolution's output, the recomputation's starting point, remains; besides it only small gates (pooled
    # vectors, B x C x 1 x 1 and B x 1 x H x W logits, BN statistics)
    reduced_width = 2 * 4 * 8 * 8
    assert list(saved.values()).count(reduced_width) == 1
    assert sum(saved.values()) < 2 * reduced_width
    # the recomputation in backward must not update the running statistics a second time
    module(x).sum().backward()
    tracked = [b for name, b in module.spatial_gate.named_buffers() if name.endswith('num_batches_tracked')]
    assert len(tracked) == 3 and all(int(b) == 2 for b in tracked)


def test_cbam_keeps_only_its_input_for_backward():
    module = CBAM(32).train()
    x = torch.randn(2, 32, 8, 8, requires_grad=True)
    assert _full_size_saved(module, x) == {x.untyped_storage().data_ptr()}
    assert len(_full_size_saved(lambda t: _plain_cbam(module, t), x)) == 2


def test_zoo_cbam_resnet_keeps_little_more_for_backward_than_its_trunk():
    x = torch.randn(2, 3, 128, 128)
    trunk = _saved_bytes(timm.create_model('resnet50').train(), x)
    cbam = _saved_bytes(timm.create_model('resnet50_cbam').train(), x)
    # each CBAM applies its block's last BN and keeps the BN's input, not its output besides (1.267x before;
    # seresnet50 keeps 1.259x); what remains is the gates' small tensors
    assert trunk < cbam < 1.02 * trunk
    # insert_cbam gives torchvision's blocks the same
    import torchvision
    from bam_models import insert_cbam
    assert _saved_bytes(insert_cbam(torchvision.models.resnet50()).train(), x) == cbam


def _cbam_block(block_cls, **norm_kwargs):
    """A timm block with CBAM and its `bam_models` twin, the same random weights in both, in double precision."""
    from timm.models.resnet import BasicBlock
    from bam_models.models.attention_resnet import cbam_resnet_args

    torch.manual_seed(0)
    width = 32 if block_cls is BasicBlock else 8  # Bottleneck widens by 4
    args = cbam_resnet_args(block_cls, (1,), cbam_args=dict(rd_ratio=1 / 4))
    ours = args['block'](32, width, **args['block_args'])
    plain = block_cls(32, width, **args['block_args'])
    for block in (ours, plain):
        for module in block.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.momentum = norm_kwargs.get('momentum', module.momentum)
    with torch.no_grad():
        for p in plain.parameters():
            p.normal_(0, 0.5)
    ours.load_state_dict(plain.state_dict())
    return ours.double().train(), plain.double().train()


@pytest.mark.parametrize('block', ['BasicBlock', 'Bottleneck'])
@pytest.mark.parametrize('channels_last', [False, True])
@pytest.mark.parametrize('momentum', [0.1, None], ids=['momentum', 'cumulative'])
def test_cbam_applying_the_blocks_last_norm_equals_timms_block(block, channels_last, momentum):
    from timm.models import resnet

    ours, plain = _cbam_block(getattr(resnet, block), momentum=momentum)
    last_norm = ours.bn3 if block == 'Bottleneck' else ours.bn2
    x = torch.randn(3, 32, 6, 5, dtype=torch.double)
    if channels_last:
        ours, plain = ours.to(memory_format=torch.channels_last), plain.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    results = []
    for module in (ours, plain, ours, plain):  # two steps each: the batch count matters
        inputs = x.detach().clone().requires_grad_()
        out = module(inputs)
        out.square().mean().backward()
        results.append((out, inputs.grad))
    for (out, grad), (out_ref, grad_ref) in ((results[0], results[1]), (results[2], results[3])):
        torch.testing.assert_close(out, out_ref, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(grad, grad_ref, rtol=1e-10, atol=1e-10)
    if channels_last:
        assert results[2][0].is_contiguous(memory_format=torch.channels_last)
    for (name, p), q in zip(ours.named_parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-9, atol=1e-10, msg=name)
    for (name, b), c in zip(ours.named_buffers(), plain.buffers(), strict=True):
        torch.testing.assert_close(b, c, rtol=1e-10, atol=1e-12, msg=name)
    assert int(last_norm.num_batches_tracked) == 2
    # the node applied the norm: the CBAM's input (the BN's output) is no longer kept, only the BN's input
    assert _saved_bytes(ours, x.requires_grad_()) < _saved_bytes(plain, x)


def test_cbam_leaves_norms_it_cannot_apply_to_themselves():
    from timm.models.resnet import Bottleneck
    from torchvision.ops import FrozenBatchNorm2d

    ours, plain = _cbam_block(Bottleneck)
    x = torch.randn(2, 32, 4, 4, dtype=torch.double)
    # eval-mode statistics (fine-tuning with frozen BN), frozen norms (detection backbones), SyncBatchNorm
    # (DDP's conversion) and one value per channel (BatchNorm's own error) stay BatchNorm's
    for norm in (copy.deepcopy(ours.bn3).eval(), FrozenBatchNorm2d(8),
                 torch.nn.SyncBatchNorm(8).double(), torch.nn.BatchNorm2d(8).float()):
        assert not fused_gates.takes_norm(x, norm)
    assert not fused_gates.takes_norm(x[:1, :, :1, :1], ours.bn3)
    assert fused_gates.takes_norm(x, ours.bn3)
    hooked, seen = copy.deepcopy(ours), []
    hooked.bn3.register_forward_hook(lambda module, args, out: seen.append(out.shape))
    assert not fused_gates.takes_norm(x, hooked.bn3)
    hooked(x.clone().requires_grad_()).sum().backward()
    assert seen == [(2, 32, 4, 4)]  # a hook on the norm still runs
    # a hook on the CBAM too, and it sees the norm's output, as in timm's block
    hooked, inputs_seen = copy.deepcopy(ours), []
    hooked.se.register_forward_hook(lambda module, args, out: inputs_seen.append(args[0]))
    hooked(x.clone().requires_grad_()).sum().backward()
    reference, bn_outputs = copy.deepcopy(plain), []
    reference.bn3.register_forward_hook(lambda module, args, out: bn_outputs.append(out))
    reference(x)
    torch.testing.assert_close(inputs_seen[0], bn_outputs[0])
    ours.bn3.eval()
    plain.bn3.eval()
    inputs = x.clone().requires_grad_()
    torch.testing.assert_close(ours(inputs), plain(x))
    with pytest.raises(ValueError, match='more than 1 value per channel'):
        ours.train()(x[:1, :, :1, :1])


@pytest.mark.parametrize('cls', [BAM, CBAM])
def test_channels_last(cls):
    module = cls(32).train()
    x = torch.randn(2, 32, 8, 6)
    x_cl = x.to(memory_format=torch.channels_last).requires_grad_()
    x = x.requires_grad_()
    out = module(x)
    out_cl = copy.deepcopy(module).to(memory_format=torch.channels_last)(x_cl)
    assert out_cl.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out_cl, out, rtol=1e-5, atol=1e-5)
    out.square().sum().backward()
    out_cl.square().sum().backward()
    torch.testing.assert_close(x_cl.grad, x.grad, rtol=1e-4, atol=1e-4)


def test_autocast_bf16_train_step():
    # under autocast the convolutions run in bf16, so the gates see bf16 logits next to fp32 or bf16 maps
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 32, 3, padding=1), BAM(32), BAM(32, input_relu=True), CBAM(32),
        torch.nn.Conv2d(32, 4, 1)).train()
    x = torch.randn(2, 3, 16, 16)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = model(x)
    assert out.dtype == torch.bfloat16
    out.float().square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.dtype == p.dtype and torch.isfinite(p.grad).all(), name
    model.eval()
    with torch.no_grad():
        with torch.autocast('cpu', dtype=torch.bfloat16):
            bf16 = model(x).float()
        torch.testing.assert_close(bf16, model(x), rtol=0.05, atol=0.05)


@pytest.mark.parametrize('cls', [BAM, CBAM])
def test_scripted_module_matches_eager(cls):
    module = cls(32).eval()
    x = torch.randn(2, 32, 8, 8)
    scripted = torch.jit.script(module)
    torch.testing.assert_close(scripted(x), module(x))


@pytest.mark.parametrize('cls', [BAM, CBAM])
@pytest.mark.slow  # a subprocess or torch.compile
def test_compiled_module_matches_eager(cls):
    torch._dynamo.reset()
    module = cls(16).train()
    reference = copy.deepcopy(module)
    compiled = torch.compile(module, backend='aot_eager', fullgraph=True)
    x = torch.randn(2, 16, 8, 8, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    out, out_ref = compiled(x), reference(x_ref)
    out.sum().backward()
    out_ref.sum().backward()
    torch.testing.assert_close(out, out_ref)
    torch.testing.assert_close(x.grad, x_ref.grad)


@pytest.mark.parametrize('name', ['resnet18_bam', 'resnet18_cbam'])
def test_fx_tracing_keeps_attention_modules_as_leaves(name):
    from timm.layers._fx import create_feature_extractor
    stage = timm.create_model(name).layer1.eval()  # a stage holding BAM (layer1.bam) or CBAM (layer1.*.se)
    last = list(stage.named_children())[-1][0]  # 'bam' after the blocks, or the last block holding CBAM
    extractor = create_feature_extractor(stage, {last: 'out'})
    leaf = 'bam' if name.endswith('_bam') else '.se'
    assert any(node.target.endswith(leaf) for node in extractor.graph.nodes if node.op == 'call_module')
    x = torch.randn(1, 64, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(extractor(x)['out'], stage(x))


# fused vs reference (`forward_reference`, the plain formulas) on the same weights and inputs
_PRECISIONS = {
    'fp32': (None, 1e-5),
    'bf16': (torch.bfloat16, 2e-2),
    'fp16': (torch.float16, 2e-3),
}
_FUSED_VS_REFERENCE = [
    pytest.param(lambda: BAM(16, rd_channels=4, dilation=2), id='bam-product'),
    pytest.param(lambda: BAM(16, rd_channels=4, dilation=2, fusion='max', input_relu=True), id='bam-max-relu'),
    pytest.param(lambda: BAM(16, rd_channels=4, gates='spatial', dilation=2), id='bam-spatial'),
    pytest.param(lambda: CBAM(16, rd_channels=4), id='cbam'),
]


def _fused_and_reference_step(module, x, dtype, channels_last=False):
    """Output, input gradient and parameter gradients of one training step, fused and by the reference."""
    results = []
    for fused in (True, False):
        m = copy.deepcopy(module).train()
        inputs = x.detach().clone()
        if channels_last:
            m, inputs = m.to(memory_format=torch.channels_last), inputs.to(memory_format=torch.channels_last)
        inputs.requires_grad_()
        with torch.autocast('cpu', dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            out = m(inputs) if fused else m.forward_reference(inputs)
            one_node = fused and getattr(m, 'gates', 'both') == 'both'  # a single BAM branch is plain autograd
            assert (type(out.grad_fn).__name__ in ('_BamBackward', '_CbamBackward')) == one_node
            if channels_last:
                assert out.is_contiguous(memory_format=torch.channels_last)
        out.float().square().mean().backward()
        results.append((out.float(), inputs.grad.float(), [p.grad.float() for p in m.parameters()]))
    return results


@pytest.mark.parametrize('precision', list(_PRECISIONS))
@pytest.mark.parametrize('make', _FUSED_VS_REFERENCE)
def test_fused_equals_reference_under_autocast(make, precision):
    dtype, tol = _PRECISIONS[precision]
    torch.manual_seed(0)
    module = make()
    conv = torch.nn.Conv2d(3, 16, 3, padding=1)  # autocast runs it in half precision: the gates see its output
    with torch.autocast('cpu', dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        x = conv(torch.randn(3, 3, 7, 5)).detach()  # odd, non-square
    (out, grad_x, grads), (out_ref, grad_x_ref, grads_ref) = _fused_and_reference_step(module, x, dtype)
    assert out.dtype == out_ref.dtype
    torch.testing.assert_close(out, out_ref, rtol=tol, atol=tol)
    scale = grad_x_ref.abs().max()
    torch.testing.assert_close(grad_x / scale, grad_x_ref / scale, rtol=tol, atol=tol)
    # biases right before a train-mode BN have an exact gradient of 0: only rounding noise, so each parameter's
    # scale is floored at a hundredth of the largest gradient
    floor = 1e-2 * max(float(g.abs().max()) for g in grads_ref)
    for got, expected in zip(grads, grads_ref):
        scale = max(float(expected.abs().max()), floor)
        torch.testing.assert_close(got / scale, expected / scale, rtol=20 * tol, atol=20 * tol)


@pytest.mark.parametrize('batch', [1, 2])
@pytest.mark.parametrize('make', _FUSED_VS_REFERENCE)
def test_fused_equals_reference_channels_last_and_small_batches(make, batch):
    module = make().double()
    for p in module.parameters():
        torch.nn.init.normal_(p, std=0.5)
    x = torch.randn(batch, 16, 5, 9, dtype=torch.double)
    for channels_last in (False, True):
        (out, grad_x, grads), (out_ref, grad_x_ref, grads_ref) = _fused_and_reference_step(
            module, x, None, channels_last)
        torch.testing.assert_close(out, out_ref, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(grad_x, grad_x_ref, rtol=1e-10, atol=1e-10)
        for got, expected in zip(grads, grads_ref):
            torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


def test_whole_batch_tuning_of_other_devices_equals_reference(monkeypatch):
    # the row every device kind without a measurement gets (CUDA included), exercised here on CPU
    assert gating_tuning.tuning_for(torch.device('cuda')) == gating_tuning.WHOLE_BATCH
    assert gating_tuning.tuning_for(torch.device('meta')) == gating_tuning.WHOLE_BATCH
    monkeypatch.setitem(gating_tuning.TUNING, 'cpu', gating_tuning.WHOLE_BATCH)
    x = torch.randn(5, 32, 6, 7, dtype=torch.double)
    assert fused_gates._batch_slices(x, gating_tuning.WHOLE_BATCH) == [slice(None)]
    for make in (lambda: BAM(32, input_relu=True), lambda: CBAM(32)):
        module = make().double()
        for p in module.parameters():
            torch.nn.init.normal_(p, std=0.5)
        (out, grad_x, grads), (out_ref, grad_x_ref, grads_ref) = _fused_and_reference_step(module, x, None)
        torch.testing.assert_close(out, out_ref, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(grad_x, grad_x_ref, rtol=1e-10, atol=1e-10)
        for got, expected in zip(grads, grads_ref):
            torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


@gating_tuning.gating_autotune(False)  # the table's defaults
def test_cpu_heuristics_stay_off_on_unmeasured_devices():
    conv = DilatedConv2d(4, 4, dilation=4)
    assert conv._space_to_batch_pays(torch.empty(1, 4, 8, 8))
    assert not conv._space_to_batch_pays(torch.empty(1, 4, 8, 8, device='meta'))
    assert not DilatedConv2d(4, 4, dilation=4, fused=False)._space_to_batch_pays(torch.empty(1, 4, 8, 8))
    x = torch.randn(2, 64, 7, 7)
    assert torch.equal(fused_gates.channel_amax(x), x.amax(1, keepdim=True))
    # the spatial branch's recomputation is a CPU choice: without it the fused node keeps the branch's graph
    assert gating_tuning.TUNING['cpu'].recompute_spatial and not gating_tuning.WHOLE_BATCH.recompute_spatial

""" The fast paths where the fused gating meets compilers and deployment: BAM's and CBAM's whole refinement as the
`bam_models::bam_refine` / `bam_models::cbam_refine` custom ops under torch.compile, and what the exported ONNX graphs
are made of. """
import copy

import pytest
import timm
import torch
import torch.nn.functional as F

import bam_models  # noqa: F401  (registers the zoo)
from bam_models.benchmark import peak_cpu_tensor_bytes
from bam_models.layers import BAM, CBAM, fused_gating
from bam_models.layers.gating_tuning import gating_autotune
from bam_models.layers.fused_gates import bam_op_config, bam_refine_op, cbam_op_config, cbam_refine_op

from _weights import with_nontrivial_norms

MODULES = {
    'bam': lambda: BAM(16, input_relu=True),  # as the zoo's ResNets place it: r = relu(x) rebuilt from the output
    'bam_sum': lambda: BAM(16, fusion='sum'),  # the paper's form: a closing BN per branch, r = x
    'cbam': lambda: CBAM(16),
}


def _op_args(module, x):
    """The custom op of a BAM or CBAM and its arguments, as the module's compiled forward passes them."""
    channel, spatial = module.channel_gate, module.spatial_gate
    states = ([*channel.parameters(), *channel.buffers()], [*spatial.parameters(), *spatial.buffers()])
    if isinstance(module, BAM):
        config = bam_op_config(channel, spatial, module.fusion)
        return bam_refine_op, (x, *states, config, module.training, module.fusion, module.input_relu)
    return cbam_refine_op, (x, *states, cbam_op_config(channel, spatial), module.training)


def _grads(module, x):
    return [x.grad] + [p.grad for p in module.parameters()]


def _assert_grads_close(actual, expected):
    # relative to each tensor's norm, with a floor for the biases right before a train-mode BN, whose exact
    # gradient is 0
    for got, want in zip(actual, expected, strict=True):
        assert (got - want).norm() <= 1e-4 * want.norm() + 1e-4, (got, want)


@pytest.mark.parametrize('name', MODULES)
def test_refinement_op_equals_the_reference_and_passes_opcheck(name):
    module = with_nontrivial_norms(MODULES[name]()).train()
    reference = copy.deepcopy(module)
    x = torch.randn(3, 16, 9, 7, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    op, args = _op_args(module, x)
    assert args[3] is not None  # the gates fit the op's templates
    outputs = op(*args)
    expected = reference.forward_reference(x_ref)
    grad = torch.randn_like(expected)
    outputs[0].backward(grad)
    expected.backward(grad)
    torch.testing.assert_close(outputs[0], expected, rtol=1e-5, atol=1e-5)
    _assert_grads_close(_grads(module, x), _grads(reference, x_ref))
    # the BatchNorm buffers after the step come back as the op's last outputs, the module's untouched
    buffers = [b for gate in (module.channel_gate, module.spatial_gate) for b in gate.buffers()]
    torch.testing.assert_close(outputs[-len(buffers):], list(reference.buffers()))
    assert not torch.equal(buffers[0], outputs[-len(buffers)])
    # schema, fake (meta) kernel, autograd registration and tracing with dynamic shapes agree with the real kernel
    torch.library.opcheck(op, args)


def test_gates_without_a_template_keep_the_plain_formulas():
    bam = BAM(16, act_layer=torch.nn.SiLU)
    cbam = CBAM(16, spatial_bn_momentum=0.1)
    assert bam_op_config(bam.channel_gate, bam.spatial_gate, bam.fusion) is None
    assert cbam_op_config(cbam.channel_gate, cbam.spatial_gate) is None


def _graph_ops(module, *args):
    """The targets of every node torch.compile(fullgraph=True) hands its backend, and the compiled output."""
    targets = []

    def recording_backend(gm, example_inputs):
        targets.extend(node.target for node in gm.graph.nodes)
        return gm

    torch._dynamo.reset()
    out = torch.compile(module, backend=recording_backend, fullgraph=True)(*args)
    return targets, out


@pytest.mark.parametrize('name', ['bam', 'cbam'])
def test_compile_takes_the_refinement_op_in_training_and_the_reference_otherwise(name):
    module = with_nontrivial_norms(MODULES[name]()).train()
    op = bam_refine_op if name == 'bam' else cbam_refine_op
    x = torch.randn(2, 16, 12, 10, requires_grad=True)
    eager = copy.deepcopy(module)(x)
    with fused_gating(False):
        reference_targets, compiled_reference = _graph_ops(copy.deepcopy(module), x)
    targets, compiled = _graph_ops(copy.deepcopy(module), x)
    with torch.no_grad():
        inference_targets, _ = _graph_ops(copy.deepcopy(module), x)
    torch._dynamo.reset()
    # the switch on and autograd recording: the op, not the plain formulas, is what the compiler sees
    assert op._opoverload in targets
    assert not any('bam_models' in str(t) for t in reference_targets + inference_targets)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(compiled_reference, eager, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize('name', ['resnet18_bam', 'resnet18_cbam'])
def test_inductor_compiled_fused_equals_compiled_reference_and_eager_in_training(name):
    torch.manual_seed(0)
    eager = timm.create_model(name, num_classes=10).train()
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([1, 7, 3, 0])
    results = {}
    for variant in ('eager', 'fused', 'reference'):
        model = copy.deepcopy(eager)
        # the table's kernels in eager mode too: the compiled ops take them, and a measured choice rounds otherwise
        with fused_gating(variant != 'reference'), gating_autotune(False):
            torch._dynamo.reset()
            run = model if variant == 'eager' else torch.compile(model, fullgraph=True)
            loss = F.cross_entropy(run(x), y)
            loss.backward()
        results[variant] = loss.detach(), {n: p.grad for n, p in model.named_parameters()}, list(model.buffers())
    torch._dynamo.reset()
    loss, grads, buffers = results['eager']
    for variant in ('fused', 'reference'):
        other_loss, other_grads, other_buffers = results[variant]
        torch.testing.assert_close(other_loss, loss, rtol=1e-4, atol=1e-5)
        for name, grad in grads.items():
            # inductor reorders reductions: relative to each tensor's norm, with a floor for the biases before a
            # train-mode BN, whose exact gradient is 0
            assert (other_grads[name] - grad).norm() <= 2e-3 * grad.norm() + 1e-4, (variant, name)
        # BatchNorm running statistics, the gates' included, advance as in eager mode
        torch.testing.assert_close(other_buffers, buffers, rtol=1e-4, atol=1e-5)


def _compiled_step_peak(name: str) -> int:
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10).train()
    torch._dynamo.reset()
    # inductor's decompositions and its min-cut partitioner, which decide what a compiled step keeps for backward,
    # without generating C++ (three inductor compiles of resnet50 take longer than the whole rest of the suite)
    compiled = torch.compile(model, fullgraph=True, backend='aot_eager_decomp_partition')
    x, y = torch.randn(4, 3, 64, 64), torch.randint(0, 10, (4,))

    def step():
        F.cross_entropy(compiled(x), y).backward()

    step()  # compiles
    for p in model.parameters():
        p.grad = None
    return peak_cpu_tensor_bytes(step)


@pytest.mark.slow
def test_compiled_training_step_keeps_the_fused_paths_tensor_peak():
    # the tensor peak of one compiled training step, BAM's and CBAM's against their trunk's, all compiled: BAM's
    # op keeps its output instead of relu(x) beside it (the plain formulas: 1.023x), CBAM's its input and the
    # small gates (the plain formulas: 1.061x)
    trunk = _compiled_step_peak('resnet50')
    bam, cbam = _compiled_step_peak('resnet50_bam') / trunk, _compiled_step_peak('resnet50_cbam') / trunk
    torch._dynamo.reset()
    assert bam <= 1.02 and cbam <= 1.20, (bam, cbam)


# resnet18's graph: 20 convolutions (every BatchNorm folded in), 17 ReLUs, 8 residual Adds, the stem's MaxPool, the
# head's GlobalAveragePool, Reshape and Gemm
RESNET18 = {'Conv': 20, 'Relu': 17, 'Add': 8, 'MaxPool': 1, 'GlobalAveragePool': 1, 'Reshape': 1, 'Gemm': 1}


@pytest.mark.slow
@pytest.mark.parametrize('name,gates,per_gate', [
    # each BAM: its channel gate's GlobalAveragePool and two 1x1 convolutions, its spatial gate's four
    # convolutions, ReLU after every convolution but the last (its own input ReLU replaces the block's), then
    # x * (1 + sigmoid(Mc * Ms))
    ('resnet18_bam', 3, {'GlobalAveragePool': 1, 'Conv': 6, 'Relu': 4, 'Mul': 2, 'Sigmoid': 1, 'Add': 1}),
    # each CBAM: the two global pools side by side through one pass of the shared MLP (two 1x1 convolutions and
    # a ReLU) and a ReduceSum over the two, then the channel max and the channel mean (a 1x1 convolution with
    # weights 1 / C, no strided ReduceMean) side by side through the 7x7 convolution
    ('resnet18_cbam', 8, {'GlobalAveragePool': 1, 'GlobalMaxPool': 1, 'Concat': 2, 'Conv': 4, 'Relu': 1,
                          'ReduceSum': 1, 'ReduceMax': 1, 'Sigmoid': 2, 'Mul': 2}),
])
def test_onnx_graph_is_one_onnxruntime_runs_well(tmp_path, name, gates, per_gate):
    import collections

    import onnx

    from bam_models.export import compare_with_pytorch, export_model

    model = with_nontrivial_norms(timm.create_model(name, num_classes=10))
    path = tmp_path / f'{name}.onnx'
    export_model(model, path, 'onnx', input_size=(64, 96))
    ops = collections.Counter(node.op_type for node in onnx.load(str(path)).graph.node)
    # the trunk's nodes and exactly these per gate: global pooling as global pools, every BatchNorm folded into its
    # convolution, nothing per channel, no stacking and slicing along the batch, no transposes
    expected = collections.Counter(RESNET18)
    for op, count in per_gate.items():
        expected[op] += gates * count
    assert ops == expected
    assert max(compare_with_pytorch(model, path, 'onnx', ((1, 3, 96, 64), (3, 3, 64, 128)))) <= 1e-4


@pytest.mark.slow
def test_benchmark_times_exported_and_compiled_models_against_their_own_trunk(tmp_path, capsys):
    import json

    from bam_models.cli import main

    out = tmp_path / 'bench.json'
    rc = main(['benchmark', '--models', 'resnet18', 'resnet18_bam', '--img-size', '64', '--batch-size', '2',
               '--rounds', '1', '--latency-iters', '1', '--threads', '1', '--measure', 'latency', 'train',
               '--allocator', 'caching', '--onnxruntime', '--compile', '--json', str(out)])
    torch._dynamo.reset()
    assert rc == 0
    table = capsys.readouterr().out
    rows = {row['model']: row for row in json.loads(out.read_text())['rows']}
    assert set(rows) == {f'{m}{way}' for m in ('resnet18', 'resnet18_bam') for way in ('', '@compile', '@onnxruntime')}
    for way in ('@compile', '@onnxruntime'):
        bam, trunk = rows[f'resnet18_bam{way}'], rows[f'resnet18{way}']
        # each way against the trunk measured the same way
        assert bam['trunk'] == f'resnet18{way}' and trunk['latency_ratio'] == 1.0
        assert bam['latency_ratio'] == pytest.approx(bam['latency_s'] / trunk['latency_s'])
        assert bam['params'] == rows['resnet18_bam']['params']
    # onnxruntime runs inference only; the compiled models train too
    assert 'train_s' not in rows['resnet18_bam@onnxruntime'] and rows['resnet18_bam@compile']['train_s'] > 0
    assert '| `resnet18_bam@onnxruntime` |' in table


def test_reparameterize_model_folds_the_gates_norms_with_equal_outputs():
    from timm.utils import reparameterize_model

    from bam_models.errors import UsageError

    model = with_nontrivial_norms(timm.create_model('resnet18_bam', num_classes=10))
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        expected = model(x)
        fused = reparameterize_model(model)
        bams = [m for m in fused.modules() if isinstance(m, BAM)]
        assert len(bams) == 3
        assert not any(isinstance(m, torch.nn.BatchNorm2d) for bam in bams for m in bam.modules())
        torch.testing.assert_close(fused(x), expected, rtol=1e-5, atol=1e-5)
        # fused and reference paths alike; the paper's sum form has a closing BN per branch to fold too
        with fused_gating(False):
            torch.testing.assert_close(fused(x), expected, rtol=1e-5, atol=1e-5)
        bam_sum = with_nontrivial_norms(BAM(32, fusion='sum'))
        features = torch.randn(2, 32, 9, 7)
        torch.testing.assert_close(reparameterize_model(bam_sum)(features), bam_sum(features), rtol=1e-5, atol=1e-5)
    with pytest.raises(UsageError, match='call model.eval'):
        reparameterize_model(model.train())

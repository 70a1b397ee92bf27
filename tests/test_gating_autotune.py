""" Kernel choices measured at first use (`gating_tuning.choose_kernel`): equivalent candidates, one measurement
per key kept for the process, the table's defaults where the switch is off or nothing may be measured. """
import collections
import time

import pytest
import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

import bam_models  # noqa: F401  registers the zoo models
from bam_models.errors import UsageError
from bam_models.layers import BAM, CBAM, gating_autotune, gating_tuning, kernel_choices, set_gating_autotune
from bam_models.layers.gating_tuning import AUTOTUNE_ENV, choose_kernel, forced_kernel

KERNELS = {
    'bam_reduce_1x1': ('conv', 'matmul'),
    'bam_dilated_conv3x3': ('dilated', 'space-to-batch'),
    'cbam_channel_max': ('amax', 'two-step/8', 'two-step/16', 'two-step/32'),
}


@pytest.fixture
def measured(monkeypatch):
    """Every measurement the test makes, as (op, candidates, inputs, backward), from an empty process cache with
    the switch on."""
    monkeypatch.setattr(gating_tuning, '_CHOICES', {})
    calls = []
    measure = gating_tuning._measure

    def counting(op, candidates, inputs, backward):
        calls.append((op, candidates, inputs, backward))
        return measure(op, candidates, inputs, backward)
    monkeypatch.setattr(gating_tuning, '_measure', counting)
    with gating_autotune(True):
        yield calls


def _randomized(module):
    for p in module.parameters():
        torch.nn.init.normal_(p, std=0.5)
    return module


def _train_step(module, x):
    x = x.detach().clone().requires_grad_()
    out = module(x)
    out.backward(torch.ones_like(out))
    return out.detach(), x.grad


def _attention_steps():
    """A BAM training step at batch 1 (its dilated convolutions inside the recomputed branch) and a CBAM
    inference step: between them every op with a kernel choice."""
    bam = _randomized(BAM(64, rd_channels=8))
    _train_step(bam, torch.randn(1, 64, 12, 12))
    with torch.no_grad():
        _randomized(CBAM(64))(torch.randn(2, 64, 6, 6))


def _results(fn, inputs, backward):
    if not backward:
        with torch.no_grad():
            return [fn(*inputs)]
    leaves = [None if t is None else t.detach().requires_grad_(t.requires_grad) for t in inputs]
    out = fn(*leaves)
    return [out.detach(), *torch.autograd.grad(out, [t for t in leaves if t is not None and t.requires_grad],
                                                torch.ones_like(out))]


def test_every_choice_is_between_equivalent_candidates(measured):
    _attention_steps()
    assert {op for op, *_ in measured} == set(KERNELS)
    assert ('bam_dilated_conv3x3', True) in {(op, backward) for op, _, _, backward in measured}
    for op, candidates, inputs, backward in measured:
        assert set(candidates) <= set(KERNELS[op]) and len(candidates) >= 2
        first, *others = candidates
        expected = _results(candidates[first], inputs, backward)
        for name in others:
            for got, want in zip(_results(candidates[name], inputs, backward), expected, strict=True):
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=f'{op}: {name} differs from {first}')


def _forward_ops(model, x):
    with torch.no_grad(), torch.profiler.profile() as prof:
        model(x)
    return collections.Counter({e.key: e.count for e in prof.key_averages()})


@pytest.mark.parametrize('op', list(KERNELS))
def test_forcing_each_candidate_gives_the_same_model(op):
    name = 'resnet18_cbam' if op.startswith('cbam') else 'resnet18_bam'
    model = timm.create_model(name).eval()
    x = torch.randn(1, 3, 64, 64)
    results, ops = {}, {}
    for kernel in KERNELS[op]:
        with forced_kernel(op, kernel):
            ops[kernel] = _forward_ops(model, x)
            model.zero_grad(set_to_none=True)
            out, grad_x = _train_step(model, x)
            results[kernel] = [out, grad_x, *(p.grad for p in model.parameters())]
    first, *others = KERNELS[op]
    for kernel in others:
        for got, want in zip(results[kernel], results[first], strict=True):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    # each kernel ran: the matrix product, the sub-images' permutes, the second step of each maximum
    if op == 'bam_reduce_1x1':
        assert ops['matmul']['aten::bmm'] == 3 and ops['conv']['aten::bmm'] == 0
    elif op == 'bam_dilated_conv3x3':
        assert ops['space-to-batch']['aten::permute'] > 0 == ops['dilated']['aten::permute']
    else:
        assert ops['two-step/16']['aten::amax'] == ops['amax']['aten::amax'] + 8  # eight CBAMs


def test_a_choice_is_measured_once_per_key_and_kept(measured, monkeypatch):
    _attention_steps()
    first = kernel_choices()
    assert len(first) == len(measured) and all(str(c).startswith(c.op) for c in first)
    # the same shapes again, with measurements that would now favour the other candidate: nothing changes
    monkeypatch.setattr(gating_tuning, '_time_candidates', lambda runs: {n: float(i) for i, n in
                                                                        enumerate(reversed(list(runs)))})
    _attention_steps()
    assert kernel_choices() == first and len(measured) == len(first)
    # a new shape is a new key
    with torch.no_grad():
        CBAM(64)(torch.randn(2, 64, 5, 5))
    assert len(measured) == len(first) + 1


def test_a_new_thread_count_is_a_new_choice(measured):
    threads = torch.get_num_threads()
    x = torch.randn(2, 64, 6, 6)
    cbam = CBAM(64)
    try:
        for n in (1, 2, 1):
            torch.set_num_threads(n)
            with torch.no_grad():
                cbam(x)
    finally:
        torch.set_num_threads(threads)
    assert [c.threads for c in kernel_choices()] == [1, 2]
    assert len(measured) == 2


def test_measurement_keeps_the_faster_candidate(measured):
    x = torch.randn(4)

    def slow(t):
        time.sleep(0.002)
        return t

    assert choose_kernel('toy', (x,), {'slow': slow, 'fast': torch.clone}, default='slow') == 'fast'
    choice, = kernel_choices()
    assert (choice.op, choice.kernel, choice.default, choice.shape) == ('toy', 'fast', 'slow', (4,))
    assert dict(choice.seconds)['slow'] >= 0.002 > dict(choice.seconds)['fast']


def test_switch_off_takes_the_table_and_measures_nothing(measured, monkeypatch):
    model = timm.create_model('resnet18_bam').eval()
    x = torch.randn(1, 3, 64, 64)
    with gating_autotune(False):
        # the table: the matrix product only from 32 MiB, space-to-batch for small batch-1 inputs
        ops = _forward_ops(model, x)
        assert ops['aten::bmm'] == 0 and ops['aten::permute'] > 0
        monkeypatch.setitem(gating_tuning.TUNING, 'cpu', gating_tuning.GatingTuning(matmul_min_bytes=0))
        ops = _forward_ops(model, x)
        assert ops['aten::bmm'] == 3 and ops['aten::permute'] == 0
        _attention_steps()
    assert measured == [] and kernel_choices() == []


def test_deterministic_algorithms_take_the_table(measured):
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        _attention_steps()
    finally:
        torch.use_deterministic_algorithms(deterministic)
    assert measured == []


def test_switch_from_the_environment_read_on_first_use(monkeypatch):
    monkeypatch.setattr(gating_tuning.AUTOTUNE, '_value', None)
    monkeypatch.setenv(AUTOTUNE_ENV, '0')
    assert not gating_tuning.use_gating_autotune()
    set_gating_autotune(True)
    assert gating_tuning.use_gating_autotune()
    monkeypatch.setattr(gating_tuning.AUTOTUNE, '_value', None)
    monkeypatch.setenv(AUTOTUNE_ENV, 'yes')
    with pytest.raises(UsageError, match=f"{AUTOTUNE_ENV}='yes' is not a valid setting; set it to 1"):
        gating_tuning.use_gating_autotune()


class _ChoosesInForward(torch.nn.Module):
    """Asks for a kernel choice on a real tensor whatever its input is, as FX tracing calls forward."""

    def forward(self, x):
        choose_kernel('toy', (torch.ones(4),), {'a': torch.clone, 'b': torch.neg}, default='a')
        return x + 1


def test_nothing_is_measured_while_tracing_scripting_transforming_or_counting(measured):
    bam, cbam = BAM(64, rd_channels=8).eval(), CBAM(64).eval()
    x = torch.randn(1, 64, 12, 12)
    for module in (bam, cbam):
        torch.jit.trace(module, x, check_trace=False)  # the check would run the module eagerly, untraced
        torch.jit.script(module)(x)
        torch.func.vmap(module)(x.unsqueeze(1))
        torch.func.grad(lambda t, m=module: m(t).sum())(x)
        with FlopCounterMode(display=False):
            module(x)
    torch.fx.symbolic_trace(_ChoosesInForward())
    assert measured == []


@pytest.mark.slow  # a subprocess or torch.compile
def test_nothing_is_measured_under_torch_compile_or_export(measured):
    torch._dynamo.reset()
    x = torch.randn(1, 64, 12, 12, requires_grad=True)
    for module in (BAM(64, rd_channels=8), CBAM(64)):
        torch.compile(module, backend='aot_eager', fullgraph=True)(x).sum().backward()
        torch.export.export(module.eval(), (x.detach(),))
    assert measured == []

""" The fused-gating switch: process-wide, per module and by environment; what each setting supports. """
import copy
import os
import subprocess
import sys

import pytest
import timm
import torch

import bam_models  # noqa: F401  registers the zoo models
from bam_models.layers import BAM, CBAM, FusedGatingError, fused_gating, set_fused_gating, use_fused_gating
from bam_models.layers.config import FUSED_GATING_ENV

LAYERS = [
    pytest.param(lambda **kw: BAM(4, rd_channels=2, dilation=1, **kw), id='bam'),
    pytest.param(lambda **kw: BAM(4, rd_channels=2, dilation=1, input_relu=True, fusion='sum', **kw), id='bam-relu'),
    pytest.param(lambda **kw: CBAM(4, rd_channels=2, **kw), id='cbam'),
]


def _randomized(module):
    for p in module.parameters():
        torch.nn.init.normal_(p, std=0.5)
    return module


def _is_fused(out: torch.Tensor) -> bool:
    return type(out.grad_fn).__name__ in ('_BamBackward', '_CbamBackward')


def test_switch_context_manager_and_module_override():
    x = torch.randn(2, 16, 6, 5, requires_grad=True)
    assert use_fused_gating()
    assert _is_fused(BAM(16)(x)) and _is_fused(CBAM(16)(x))
    with fused_gating(False):
        assert not use_fused_gating()
        assert not _is_fused(BAM(16)(x)) and not _is_fused(CBAM(16)(x))
        assert _is_fused(BAM(16, fused=True)(x)) and _is_fused(CBAM(16, fused=True)(x))
    assert use_fused_gating()
    assert not _is_fused(BAM(16, fused=False)(x)) and not _is_fused(CBAM(16, fused=False)(x))
    set_fused_gating(False)
    try:
        assert not _is_fused(BAM(16)(x))
    finally:
        set_fused_gating(True)


@pytest.mark.slow  # a subprocess or torch.compile
def test_environment_variable_is_read_on_first_use_and_checked():
    # one interpreter: imported with 0, then the module re-read with a value that is not 0 or 1, which the
    # import accepts (nothing could report it as one line there) and the first use refuses
    code = '\n'.join([
        'import importlib, os',
        'from bam_models.layers import config, use_fused_gating',
        'print(use_fused_gating())',
        f'os.environ[{FUSED_GATING_ENV!r}] = "yes"',
        'importlib.reload(config)',
        'try:',
        '    config.use_fused_gating()',
        'except ValueError as e:',
        '    print(e)',
    ])
    env = {**os.environ, FUSED_GATING_ENV: '0'}
    proc = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    off, error = proc.stdout.strip().splitlines()
    assert off == 'False'
    assert f"{FUSED_GATING_ENV}='yes' is not a valid setting; set it to 1" in error


@pytest.mark.parametrize('make', LAYERS)
def test_double_backward_works_with_the_switch_off(make):
    module = _randomized(make(fused=False)).double().train()
    x = torch.randn(2, 4, 3, 4, dtype=torch.double, requires_grad=True)
    assert torch.autograd.gradgradcheck(module, (x,), fast_mode=True)
    # a gradient penalty trains through it
    grad, = torch.autograd.grad(module(x).square().sum(), x, create_graph=True)
    grad.square().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in module.parameters())


@pytest.mark.parametrize('make', LAYERS)
def test_double_backward_with_the_switch_on_names_the_switch(make):
    module = make().train()
    x = torch.randn(2, 4, 5, 4, requires_grad=True)
    with pytest.raises(FusedGatingError, match=r'set_fused_gating\(False\).*BAM_MODELS_FUSED_GATING=0.*fused=False'):
        torch.autograd.grad(module(x).square().sum(), x, create_graph=True)
    # the first-order gradient is unaffected
    torch.autograd.grad(module(x).square().sum(), x)


@pytest.mark.parametrize('fused', [True, False], ids=['fused', 'reference'])
@pytest.mark.parametrize('make', LAYERS)
def test_torch_func_grad_and_vmap(make, fused):
    module = _randomized(make(fused=fused)).double().eval()
    x = torch.randn(3, 4, 5, 4, dtype=torch.double, requires_grad=True)
    expected_out = module(x)
    expected_grad, = torch.autograd.grad(expected_out.square().sum(), x)
    params = dict(module.named_parameters())

    def loss(values, inputs):
        return torch.func.functional_call(module, values, (inputs,)).square().sum()

    grads = torch.func.grad(loss, argnums=(0, 1))(params, x.detach())
    torch.testing.assert_close(grads[1], expected_grad)
    assert set(grads[0]) == set(params)
    # vmap over a leading dimension: every slice is a batch of its own
    stacked = torch.stack([x.detach(), 2 * x.detach()])
    out = torch.func.vmap(module)(stacked)
    torch.testing.assert_close(out[0], expected_out.detach())
    torch.testing.assert_close(out[1], module(2 * x.detach()))


@pytest.mark.parametrize('fused', [True, False], ids=['fused', 'reference'])
@pytest.mark.parametrize('make', LAYERS)
def test_empty_batch_in_train_and_eval(make, fused):
    module = make(fused=fused)
    for train in (True, False):
        module.train(train)
        x = torch.randn(0, 4, 6, 5, requires_grad=True)
        out = module(x)
        assert out.shape == x.shape
        out.sum().backward()
        assert x.grad.shape == x.shape


@pytest.mark.parametrize('name', ['resnet18_bam', 'resnet18_cbam', 'mobilenetv1_100_bam'])
def test_zoo_models_take_an_empty_batch(name):
    model = timm.create_model(name, num_classes=3)
    state = copy.deepcopy(model.state_dict())
    model.train()
    out = model(torch.randn(0, 3, 32, 32))
    assert out.shape == (0, 3)
    out.sum().backward()
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(0, 3, 48, 40)).shape == (0, 3)
    # the BatchNorm statistics of an empty batch stay finite
    for key, value in model.state_dict().items():
        if value.is_floating_point():
            assert torch.isfinite(value).all(), key
    assert state.keys() == model.state_dict().keys()

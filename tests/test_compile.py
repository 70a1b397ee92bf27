""" torch.compile: same outputs and gradients as eager in training, same outputs in eval (one small model: CPU compiles
are slow). """
import copy

import pytest
import timm
import torch

import bam_models  # noqa: F401  (registers the zoo)


@pytest.mark.slow  # a subprocess or torch.compile
def test_compiled_model_matches_eager_in_training_and_eval():
    eager = timm.create_model('resnet18_bam', num_classes=10).train()
    compiled_copy = copy.deepcopy(eager)
    compiled = torch.compile(compiled_copy)
    x, y = torch.randn(2, 3, 64, 64), torch.tensor([1, 7])
    losses = []
    for model in (eager, compiled):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        losses.append(loss)
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-4, atol=1e-5)
    eager_params = dict(eager.named_parameters())
    # gradients agree to float32 reordering error (inductor fuses and reorders reductions): relative to each
    # tensor's norm, with an absolute floor for the biases right before a train-mode BN, whose exact gradient is 0
    for name, param in compiled_copy.named_parameters():
        reference = eager_params[name].grad
        difference = (param.grad - reference).norm()
        assert difference <= 2e-3 * reference.norm() + 1e-4, f"{name}: gradient differs by {difference:.2e}"
    # BatchNorm running statistics (BAM's included) advance identically
    torch.testing.assert_close(
        compiled_copy.layer2.bam.channel_gate.bn.running_var, eager.layer2.bam.channel_gate.bn.running_var)

    # and in eval mode (a second graph: BatchNorm switches to running statistics) the outputs match eager
    eager.eval()
    compiled_copy.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), eager(x), rtol=1e-4, atol=1e-4)

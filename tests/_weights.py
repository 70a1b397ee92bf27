""" The one weight randomiser of the tests: every parameter and BN statistic random, so that a comparison of
outputs covers every layer and a wrong key mapping cannot hide behind default 0/1 values. """
import torch
import torch.nn as nn


def randomize_(model: nn.Module) -> nn.Module:
    """Every parameter and BN statistic random (a default-initialised net leaves too many of them 0/1 to tell a
    wrong mapping apart), scaled so that deep nets keep finite, O(1) activations."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d) or isinstance(module, nn.BatchNorm1d):
                module.weight.uniform_(0.2, 0.5, generator=generator)
                module.bias.uniform_(-0.2, 0.2, generator=generator)
                module.running_mean.uniform_(-0.2, 0.2, generator=generator)
                module.running_var.uniform_(0.5, 1.5, generator=generator)
                module.num_batches_tracked.fill_(7)
            elif isinstance(module, (nn.Conv2d, nn.Linear)):
                fan_in = module.weight[0].numel()
                module.weight.normal_(0, (2 / fan_in) ** 0.5, generator=generator)
                if module.bias is not None:
                    module.bias.uniform_(-0.2, 0.2, generator=generator)
    return model.eval()

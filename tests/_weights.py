""" The tests' weight randomisers, so that a comparison of outputs covers every layer and a wrong key mapping or a
dropped normalisation cannot hide behind default 0/1 values: `randomize_` (every parameter and BN statistic)
and `with_nontrivial_norms` (BatchNorm statistics and affine parameters only). """
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


def with_nontrivial_norms(model: nn.Module) -> nn.Module:
    """Random BN statistics and affine parameters everywhere, attention included, so that eval-mode BN is no
    identity and an exporter that dropped or misplaced any normalisation or gate would show."""
    generator = torch.Generator().manual_seed(0)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            n = module.num_features
            module.running_mean.copy_(torch.randn(n, generator=generator) * 0.1)
            module.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
            module.weight.data.copy_(torch.rand(n, generator=generator) + 0.5)
            module.bias.data.copy_(torch.randn(n, generator=generator) * 0.1)
    return model.eval()

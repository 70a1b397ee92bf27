""" Parameter and FLOP counts, measured on the meta device (no memory, no weights, no compute), and the peak
bytes of CPU tensors a call holds at once. """
from typing import Callable, Dict, Optional, Tuple

import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

__all__ = ['count_params', 'count_flops', 'model_stats', 'peak_cpu_tensor_bytes']


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_flops(model: torch.nn.Module, input_size: Tuple[int, int, int] = (3, 224, 224)) -> int:
    """FLOPs of one eval-mode forward pass at batch 1, as torch.utils.flop_counter counts them (2 per MAC)."""
    param = next(model.parameters())
    x = torch.empty(1, *input_size, device=param.device, dtype=param.dtype)
    was_training = model.training
    model.eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    model.train(was_training)
    return counter.get_total_flops()


def model_stats(name: str, input_size: Optional[Tuple[int, int, int]] = None, **kwargs) -> Dict[str, float]:
    """Params and FLOPs of a registered model built on the meta device; input size from its pretrained_cfg."""
    model = timm.create_model(name, device='meta', **kwargs)
    input_size = tuple(input_size or model.pretrained_cfg['input_size'])
    flops = count_flops(model, input_size)
    return {
        'model': name,
        'params': count_params(model),
        'gflops': flops / 1e9,
        'gmacs': flops / 2e9,
        'input_size': input_size[-1],
    }


def peak_cpu_tensor_bytes(fn: Callable[[], object]) -> Optional[int]:
    """The largest total of bytes that CPU tensors allocated by `fn()` hold at once, summed from the profiler's
    allocation records: deterministic, the CPU counterpart of torch.cuda.max_memory_allocated. None where the
    profiler's result API does not expose them."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    try:
        records = sorted(
            (event.start_ns(), event.nbytes()) for event in prof.profiler.kineto_results.events()
            if event.name() == '[memory]' and event.device_type() == torch.autograd.DeviceType.CPU)
    except AttributeError:  # the profiler's result API moved
        return None
    live = peak = 0
    for _, nbytes in records:  # allocations positive, frees negative
        live += nbytes
        peak = max(peak, live)
    return peak

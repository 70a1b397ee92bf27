""" The ranges of BAM's and CBAM's numeric arguments, declared once.

The layers enforce them in their constructors (`check_bounds`), and `with_attention` checks a config.json's
`attention_args` (and a training config's `model.bam_args` / `model.cbam_args`) against the same declaration
before anything is built, so the two cannot disagree. Past these ranges a few bytes of config build for
minutes or allocate terabytes (num_dilated=100000, rd_channels=10**6) or divide by zero (rd_divisor=0).
"""
from typing import Any, Dict, Mapping, Optional, Tuple

__all__ = ['BAM_BOUNDS', 'CBAM_BOUNDS', 'bound_problem', 'check_bounds']

Bounds = Dict[str, Tuple[float, float]]

_HIDDEN: Bounds = {'rd_ratio': (1e-4, 1.0), 'rd_channels': (1, 1 << 16), 'rd_divisor': (1, 1024)}
BAM_BOUNDS: Bounds = {**_HIDDEN, 'dilation': (1, 64), 'num_dilated': (0, 16)}
CBAM_BOUNDS: Bounds = {**_HIDDEN, 'spatial_kernel_size': (1, 31), 'spatial_bn_momentum': (0.0, 1.0)}


def bound_problem(bounds: Mapping[str, Tuple[float, float]], key: str, value: Any) -> Optional[str]:
    """'use a value in [low, high]' when the number `value` of `key` lies outside its bounds, else None (also
    for a key without bounds and for values that are not numbers: the type is checked elsewhere)."""
    if key not in bounds or isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    low, high = bounds[key]
    return None if low <= value <= high else f"use a value in [{low:g}, {high:g}]"


def check_bounds(layer: str, bounds: Mapping[str, Tuple[float, float]], values: Mapping[str, Any]) -> None:
    """ValueError naming the first of `values` outside `bounds`."""
    for key, value in values.items():
        problem = bound_problem(bounds, key, value)
        if problem:
            raise ValueError(f"{layer} {key} is {value!r}; {problem}")

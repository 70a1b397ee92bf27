""" Where attention sits in a network: what the zoo models, `insert_bam` / `insert_cbam`, the loaders and the
trainer ask about BAM/CBAM placement. """
from typing import List

import torch.nn as nn

from .bam import BAM
from .cbam import CBAM

__all__ = ['attention_keys']


def attention_keys(model: nn.Module) -> List[str]:
    """State-dict keys of every BAM/CBAM module in `model`: what a plain-trunk checkpoint lacks."""
    prefixes = tuple(f'{name}.' for name, module in model.named_modules() if isinstance(module, (BAM, CBAM)))
    return [k for k in model.state_dict() if k.startswith(prefixes)] if prefixes else []

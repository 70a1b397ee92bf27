from typing import List

import timm

from .attention_resnet import AttentionResNet
from .bam_mobilenetv1 import BamMobileNetV1

_ZOO_MODULES = ('attention_resnet', 'bam_mobilenetv1')


def list_zoo_models(pattern: str = '') -> List[str]:
    """Names of the models this package registers with timm, optionally filtered by a wildcard pattern."""
    return timm.list_models(pattern or '*', module=list(_ZOO_MODULES))

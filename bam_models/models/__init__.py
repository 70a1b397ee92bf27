from typing import List

import timm

from .attention_resnet import AttentionResNet
from .bam_mobilenetv1 import BamMobileNetV1
from .cifar_preresnet import CifarPreActResNet
from .cifar_resnet import CifarResNet

_ZOO_MODULES = ('attention_resnet', 'bam_mobilenetv1', 'cifar_preresnet', 'cifar_resnet')


def list_zoo_models(pattern: str = '') -> List[str]:
    """Names of the models this package registers with timm, optionally filtered by a wildcard pattern."""
    return timm.list_models(pattern or '*', module=list(_ZOO_MODULES))

""" Every timm / huggingface_hub name bam_models needs that has no public name, imported here only, so that a
timm upgrade touches this file. """
from timm.models._efficientnet_blocks import DepthwiseSeparableConv  # MobileNetV1's block, subclassed for CBAM
from timm.models._efficientnet_builder import decode_arch_def  # MobileNetV1's arch strings to block args
from timm.models._efficientnet_builder import resolve_act_layer  # timm's act_layer kwarg handling
from timm.models._efficientnet_builder import resolve_bn_args  # timm's bn_* kwarg handling
from timm.models._efficientnet_builder import round_channels  # width multiplier rounding
from timm.models._features import feature_take_indices  # forward_intermediates index handling

__all__ = [
    'DepthwiseSeparableConv', 'decode_arch_def', 'feature_take_indices', 'resolve_act_layer', 'resolve_bn_args',
    'round_channels',
]

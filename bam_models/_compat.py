""" Every timm / huggingface_hub name bam_models uses that the libraries do not export publicly.

The versions these paths are checked against are pinned in pyproject.toml (`timm>=1.0.31,<1.1`,
`huggingface_hub>=1.0`): a timm or huggingface_hub upgrade touches this file only. Everything else imports
timm from `timm.models` / `timm.layers` / `timm.data` and huggingface_hub from its top-level package.
"""
from huggingface_hub.utils import _http as _hf_http
from timm.data.dataset_factory import _search_split as search_split  # the split-folder names timm accepts
from timm.models._efficientnet_blocks import DepthwiseSeparableConv  # MobileNetV1's block, subclassed for CBAM
from timm.models._efficientnet_builder import decode_arch_def  # MobileNetV1's arch strings to block args
from timm.models._efficientnet_builder import resolve_act_layer  # timm's act_layer kwarg handling
from timm.models._efficientnet_builder import resolve_bn_args  # timm's bn_* kwarg handling
from timm.models._efficientnet_builder import round_channels  # width multiplier rounding
from timm.models._features import feature_take_indices  # forward_intermediates' index rule
from timm.models._hub import hf_split, save_config_for_hf  # 'repo@revision' parsing; config.json without weights

__all__ = [
    'DepthwiseSeparableConv', 'current_hf_client_factory', 'decode_arch_def', 'feature_take_indices',
    'hf_split', 'resolve_act_layer', 'resolve_bn_args', 'round_channels', 'save_config_for_hf', 'search_split',
]


def current_hf_client_factory():
    """The HTTP client factory huggingface_hub uses now (a user's own, with proxies, or its default), so the
    download bounds wrap it instead of replacing it; huggingface_hub has a setter but no public getter."""
    return getattr(_hf_http, '_GLOBAL_CLIENT_FACTORY', _hf_http.default_client_factory)

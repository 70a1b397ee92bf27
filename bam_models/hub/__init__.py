""" Weights and the Hugging Face Hub: verified pretrained loading (`pretrained`), bounded downloads
(`download`), one model-by-name entry point for every command (`load.create_model_from_name`), the weights
manifest (`manifest`), checkpoint conversion (`convert`), the Hub folder writer (`save_pretrained`) and
publishing (`publish`). """
from bam_models.hub.pretrained import (
    PretrainedWeightsError,
    TrunkOnlyWeightsWarning,
    UnverifiedWeightsWarning,
    attention_keys,
    build_model_with_weights,
    file_sha256,
    model_card,
    model_from_checkpoint,
    save_pretrained,
)
from bam_models.hub.load import create_model_from_name

__all__ = [
    'PretrainedWeightsError', 'TrunkOnlyWeightsWarning', 'UnverifiedWeightsWarning',
    'build_model_with_weights', 'attention_keys', 'file_sha256', 'model_from_checkpoint', 'save_pretrained',
    'model_card', 'create_model_from_name',
]

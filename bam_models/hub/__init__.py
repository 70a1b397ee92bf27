""" Loading and saving models by name: `load` (the one model-name check, `check_model_name`, and the one entry
point from a name to a model, `create_model_from_name`) and `save` (the Hub folder writer `save_pretrained`
with its model card, `publish` / `push_files` of a manifest entry, `insert_into_folder`). Where weights come
from and how they are verified is `bam_models.weights`, below the models; this package sits above them. """
from bam_models.checkpoint import model_from_checkpoint
from bam_models.errors import PretrainedWeightsError
from bam_models.hub.load import check_model_name, create_model_from_name
from bam_models.hub.save import (
    insert_into_folder, model_card, new_or_empty_folder, publish, push_files, save_pretrained)
from bam_models.weights import TrunkOnlyWeightsWarning, UnverifiedWeightsWarning, build_model_with_weights, file_sha256

__all__ = [
    'PretrainedWeightsError', 'TrunkOnlyWeightsWarning', 'UnverifiedWeightsWarning',
    'build_model_with_weights', 'check_model_name', 'create_model_from_name', 'file_sha256', 'insert_into_folder',
    'model_card', 'model_from_checkpoint', 'new_or_empty_folder', 'publish', 'push_files', 'save_pretrained',
]

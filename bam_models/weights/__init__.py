""" Where pretrained weights come from and how they are checked: the weights manifest (`manifest`), bounded Hub
downloads (`download`) and the verified build every zoo model builder calls (`build`). The models import this
package; nothing here imports the models. """
from bam_models.weights.build import (
    HUB_FILENAME,
    WEIGHT_LOCATION_FIELDS,
    TrunkOnlyWeightsWarning,
    UnverifiedWeightsWarning,
    build_model_with_weights,
    check_published,
    file_sha256,
)
from bam_models.weights.manifest import ManifestError, manifest_default_cfgs

__all__ = [
    'HUB_FILENAME', 'ManifestError', 'TrunkOnlyWeightsWarning', 'UnverifiedWeightsWarning', 'WEIGHT_LOCATION_FIELDS',
    'build_model_with_weights', 'check_published', 'file_sha256', 'manifest_default_cfgs',
]

""" Training and fine-tuning: configs (`config`), datasets and loaders (`data`), the build steps of a run
(`build`), its epochs (`loop`) and scoring a model on a dataset (`validate`). Run folders and run checkpoints,
shared with detection, are `bam_models.runs`. """
from bam_models.train.build import base_weights
from bam_models.train.config import ConfigError, RunConfig, load_config
from bam_models.train.loop import NonFiniteLossError, evaluate, train

__all__ = ['ConfigError', 'NonFiniteLossError', 'RunConfig', 'base_weights', 'evaluate', 'load_config', 'train']

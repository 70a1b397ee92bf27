""" Training and fine-tuning: configs (`config`), datasets and loaders (`data`), run checkpoints and run folders
(`checkpointer`) and the loop (`loop`). """
from bam_models.train.config import ConfigError, RunConfig, load_config
from bam_models.train.loop import NonFiniteLossError, base_weights, evaluate, train

__all__ = ['ConfigError', 'NonFiniteLossError', 'RunConfig', 'base_weights', 'evaluate', 'load_config', 'train']

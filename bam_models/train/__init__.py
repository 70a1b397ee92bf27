""" Training and fine-tuning: configs (`config`), datasets and loaders (`data`) and the loop (`loop`). """
from bam_models.train.config import ConfigError, RunConfig, load_config
from bam_models.train.loop import NonFiniteLossError, evaluate, train

__all__ = ['ConfigError', 'NonFiniteLossError', 'RunConfig', 'evaluate', 'load_config', 'train']

"""The configuration: the typed tree and its choices (tree.py), loading it from defaults, YAML
and ``key=value`` overrides (load.py), and every key's range (validate.py).

The public names are here, so that the rest of the package imports `resnet.config`.
"""
from resnet.config.load import (explicit_keys, load_config, load_saved_config, save_config,
                                to_dict, to_yaml)
from resnet.config.tree import (ARCHS, CHOICES, AuditConfig, CheckpointConfig, Config,
                                ConfigError, DataConfig, DeepSpeedConfig, DistConfig,
                                ModelConfig, OptimConfig, RunConfig, TrainConfig, WandbConfig)
from resnet.config.validate import validate

__all__ = ["ARCHS", "CHOICES", "AuditConfig", "CheckpointConfig", "Config", "ConfigError",
           "DataConfig", "DeepSpeedConfig", "DistConfig", "ModelConfig", "OptimConfig",
           "RunConfig", "TrainConfig", "WandbConfig", "explicit_keys", "load_config",
           "load_saved_config", "save_config", "to_dict", "to_yaml", "validate"]

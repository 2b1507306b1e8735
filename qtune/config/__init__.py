"""Typed run configuration: one dataclass per concern (schema.py), YAML on disk and dotted overrides (load.py).

A config file is a YAML mapping whose top-level keys are the fields of `RunConfig`. On the command line,
`train.lr=1e-4 lora.r=8` overrides single fields. Unknown keys are errors that name the nearest valid
key, and every validation error names the dotted key to change.
"""

from qtune.config.load import RENAMED, from_dict, load_config, parse_overrides, to_dict, valid_keys
from qtune.config.schema import (
    DataConfig,
    DpoConfig,
    EvalConfig,
    GrpoConfig,
    LoraConfig,
    ModelConfig,
    OutputConfig,
    QuantConfig,
    RunConfig,
    SourceConfig,
    TrainConfig,
)
from qtune.errors import ConfigError

__all__ = [
    "RENAMED",
    "ConfigError",
    "DataConfig",
    "DpoConfig",
    "EvalConfig",
    "GrpoConfig",
    "LoraConfig",
    "ModelConfig",
    "OutputConfig",
    "QuantConfig",
    "RunConfig",
    "SourceConfig",
    "TrainConfig",
    "from_dict",
    "load_config",
    "parse_overrides",
    "to_dict",
    "valid_keys",
]

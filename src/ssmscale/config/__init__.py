"""The configuration: one typed, validated schema (schema.py), loaded from YAML (load.py), with the
optional `sweep:` axes of a ladder (sweep.py). What the rest of the package imports from here."""

from .load import (apply_overrides, check_logger_packages, dump_yaml, load_config, load_ladder_config, load_run_config,
                   parse_yaml, read_study_config, read_yaml, validate)
from .schema import (EXECUTION_KEYS, CustomFamily, DataConfig, LadderConfig, ModelDefaults, ModelSpec, MQARConfig,
                     RunConfig, ShapeSpec, SubmititConfig, TokenizerConfig, TrainConfig, config_hash,
                     format_validation_error)

__all__ = ["EXECUTION_KEYS", "CustomFamily", "DataConfig", "LadderConfig", "ModelDefaults", "ModelSpec", "MQARConfig",
           "RunConfig", "ShapeSpec", "SubmititConfig", "TokenizerConfig", "TrainConfig", "apply_overrides",
           "check_logger_packages", "config_hash", "dump_yaml", "format_validation_error", "load_config",
           "load_ladder_config", "load_run_config", "parse_yaml", "read_study_config", "read_yaml", "validate"]

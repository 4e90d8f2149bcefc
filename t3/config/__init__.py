"""Config schemas and the start-up checks that reject impossible runs in plain words.

* `t3.config.train_schema`: the dataclasses of ``conf/train.yaml`` (`TrainConfig` and one per group),
  registered with Hydra by `register_configs`. A typed schema for eval's settings belongs beside it, in
  a module of its own.
* `t3.config.validation`: `validate` (every check a training run needs before anything heavy is built,
  each group a named function) and the `RunFacts` it derives.
* `t3.config.checks`: the check primitives (`ConfigError` and one-line errors naming key, value and
  accepted range) that schemas share.

Every public name is importable from ``t3.config`` directly.
"""

from t3.config.checks import ConfigError, check_field_types
from t3.config.train_schema import (
    TRAIN_ENTRY,
    TRAINABLE,
    BatchConfig,
    CheckpointConfig,
    DataConfig,
    EMAConfig,
    ExportConfig,
    FinetuneConfig,
    LoggerConfig,
    LoraConfig,
    ModelConfig,
    ObjectiveConfig,
    OptimConfig,
    ParallelConfig,
    PathsConfig,
    SampleVideosConfig,
    StrategyConfig,
    TrainConfig,
    TrainerConfig,
    ValidationConfig,
    register_configs,
)
from t3.config.validation import RunFacts, entry_function, resolve_world_size, validate

__all__ = [
    "TRAINABLE",
    "BatchConfig",
    "CheckpointConfig",
    "ConfigError",
    "DataConfig",
    "EMAConfig",
    "ExportConfig",
    "FinetuneConfig",
    "LoggerConfig",
    "LoraConfig",
    "ModelConfig",
    "ObjectiveConfig",
    "OptimConfig",
    "PathsConfig",
    "RunFacts",
    "SampleVideosConfig",
    "ParallelConfig",
    "StrategyConfig",
    "TrainConfig",
    "TrainerConfig",
    "TRAIN_ENTRY",
    "ValidationConfig",
    "check_field_types",
    "entry_function",
    "register_configs",
    "resolve_world_size",
    "validate",
]

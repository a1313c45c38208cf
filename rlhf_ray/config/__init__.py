"""Typed, frozen job configuration: schema, YAML loading, overrides."""

from rlhf_ray.config.loader import dump_yaml, list_config_presets, load_config, to_dict
from rlhf_ray.config.schema import (
    AlgorithmConfig,
    ConfigError,
    CriticConfig,
    DataConfig,
    JobConfig,
    ModelConfig,
    OptimConfig,
    PlacementConfig,
    ReferenceConfig,
    RewardConfig,
    RoleConfig,
    RolloutConfig,
    RunConfig,
)

__all__ = [
    "AlgorithmConfig", "ConfigError", "CriticConfig", "DataConfig", "JobConfig", "ModelConfig", "OptimConfig",
    "PlacementConfig", "ReferenceConfig", "RewardConfig", "RoleConfig", "RolloutConfig", "RunConfig",
    "dump_yaml", "list_config_presets", "load_config", "to_dict",
]

"""Typed configuration: OmegaConf structured configs, loaded from YAML plus dotlist overrides.

    cfg = load_config("jobs/smoke.yaml", ["trainer.num_workers=1"])

One schema serves every command and every job spec: a spec is a `SpeederConfig` with a `steps` list.
Errors (unknown key, wrong type, missing value, value out of range) raise `ConfigError` with a one-line
message that names the key, before any work starts. Paths default to folders under `output_root`
through interpolation (`${output_root}/data`), so one override moves a whole run.

    schema.py    the sections as dataclasses, with every default (docs/platform.md#config)
    load.py      load_config, validate, absolute paths, to_dict / from_dict / to_yaml

Everything is importable from `speeder_platform.config`.
"""

from speeder_platform.config.load import (
    PATH_FIELDS,
    absolute_paths,
    from_dict,
    load_config,
    to_dict,
    to_yaml,
    validate,
)
from speeder_platform.config.schema import (
    PREPARE_SOURCES,
    STEPS,
    ConfigError,
    DataConfig,
    EvaluateConfig,
    FeaturizeConfig,
    LoraConfig,
    ModelConfig,
    MRCConfig,
    PrepareConfig,
    RayConfig,
    SASRecConfig,
    ScoreConfig,
    ServeConfig,
    SpeederConfig,
    SyntheticConfig,
    TrainerConfig,
)

__all__ = [
    "PATH_FIELDS", "PREPARE_SOURCES", "STEPS", "ConfigError", "DataConfig", "EvaluateConfig", "FeaturizeConfig",
    "LoraConfig", "MRCConfig", "ModelConfig", "PrepareConfig", "RayConfig", "SASRecConfig", "ScoreConfig",
    "ServeConfig", "SpeederConfig", "SyntheticConfig", "TrainerConfig", "absolute_paths", "from_dict",
    "load_config", "to_dict", "to_yaml", "validate",
]

"""The typed config: one frozen dataclass per section (`sections.py`), the fields derived from
others (`derived.py`), config files and the configs of saved runs (`files.py`).

    from retinanet_jax import config as config_lib
    c = config_lib.default_config()                   # a ConfigDict: configs/*.py start here
    config = config_lib.Config.from_config_dict(c)    # typed; every problem listed at once

Fields, their choices and which reference implementation uses which value: docs/configs.md.
"""

from retinanet_jax.config.derived import derive_fields, synthetic_sizes
from retinanet_jax.config.files import (RUN_CONFIG_FILE, VARIANTS, apply_variant, default_config,
                                        load_config_file, load_run_config)
from retinanet_jax.config.sections import (BOX_LOSSES, DONATE_STATE, EVAL_METRICS, INIT_MODES,
                                           INPUT_CONVENTIONS, NORMALIZERS, ON_DAMAGED_CHECKPOINT,
                                           ON_DIVERGENCE, OPTIMIZERS, SCHEDULES, SECTIONS, Config,
                                           ConfigError, EvalConfig, LossConfig, MatchingConfig,
                                           RuntimeConfig, TrainConfig)

__all__ = [
    "BOX_LOSSES", "DONATE_STATE", "EVAL_METRICS", "INIT_MODES", "INPUT_CONVENTIONS", "NORMALIZERS",
    "ON_DAMAGED_CHECKPOINT", "ON_DIVERGENCE", "OPTIMIZERS", "RUN_CONFIG_FILE", "SCHEDULES",
    "SECTIONS", "VARIANTS", "Config", "ConfigError", "EvalConfig", "LossConfig", "MatchingConfig",
    "RuntimeConfig", "TrainConfig", "apply_variant", "default_config", "derive_fields",
    "load_config_file", "load_run_config", "synthetic_sizes",
]

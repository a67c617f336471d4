"""Settings, defined once: the model (:class:`ModelConfig`, :class:`LevelConfig`), the
optimisation (:class:`TrainConfig`) and the data (:class:`DataConfig`) of a run
(:class:`RunConfig`), the presets shipped in ``presets/``, and ``key=value`` overrides.

Every value is checked by its field's type and range when a configuration is built
(:mod:`zoomnet.config.fields`), so a bad setting is refused in one line naming the field
before anything is read or written.
"""

from zoomnet.config.data import DataConfig
from zoomnet.config.model import LevelConfig, ModelConfig, with_legacy_fields
from zoomnet.config.run import (
    RunConfig,
    apply_overrides,
    available_presets,
    config_from_dict,
    defaults,
    load_config,
)
from zoomnet.config.train import TrainConfig

__all__ = [
    "DataConfig",
    "LevelConfig",
    "ModelConfig",
    "RunConfig",
    "TrainConfig",
    "apply_overrides",
    "available_presets",
    "config_from_dict",
    "defaults",
    "load_config",
    "with_legacy_fields",
]

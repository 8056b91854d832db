"""Configuration: the typed schema of every config group (``schema``) and the loader that fills it
from presets, YAML files and ``key=value`` overrides (``loader``).
"""

from core import lazy_exports

__all__, __getattr__ = lazy_exports(
    __name__,
    {
        "loader": (
            "describe_keys iter_keys list_presets load_config parse_overrides read_yaml "
            "resolve_preset to_dict to_yaml"
        ),
        "schema": (
            "CheckpointConfig FSDPConfig LoggerConfig LossConfig OptimConfig RunConfig "
            "TrainConfig TrainerConfig"
        ),
    },
)

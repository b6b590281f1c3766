"""neox.config: gpt-neox-compatible configuration (stdlib + yaml only; never imports torch)."""

from .data import DataConfig
from .errors import ConfigError
from .loader import load_config, parse_yaml
from .model import ModelConfig
from .neox_config import NeoXConfig
from .optimizer import OptimizerConfig
from .parallel import ParallelConfig
from .plan import count_parameters, flops_per_token, stage_layer_counts, stage_parameters
from .training import TrainingConfig

__all__ = [
    "ConfigError", "DataConfig", "ModelConfig", "NeoXConfig", "OptimizerConfig", "ParallelConfig",
    "TrainingConfig", "count_parameters", "flops_per_token", "load_config", "parse_yaml",
    "stage_layer_counts", "stage_parameters",
]

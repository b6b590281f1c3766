"""models: model families behind one registry (name -> ModelSpec)."""

from .causal_lm import CausalLM
from .parallel import ParallelOptions
from .registry import ModelSpec, build_model, get_model_spec, register_model, registered_models

__all__ = [
    "CausalLM", "ParallelOptions", "ModelSpec", "build_model", "get_model_spec", "register_model",
    "registered_models",
]

"""Model registry: a model family's name (ModelConfig.model_type) -> how to build and adapt it.

Code elsewhere asks the registry instead of branching on model names. Adapters that live in higher
layers (Hugging Face conversion in neox.checkpoint) are named by module path, so this module never
imports upward; `neox.checkpoint` / tools import them by that name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from megatron_ext.topology import ParallelState
from neox.config import ModelConfig


@dataclass(frozen=True)
class ModelSpec:
    """What the rest of neox needs to know about one model family.

    build(cfg, ps, *, pre_process, post_process, layer_range, init_seed, options, rng_tracker) -> nn.Module
        (options: neox.models.parallel.ParallelOptions; rng_tracker: megatron_ext RNGStatesTracker)
    partition_dim(param_name) -> TP split dim of a checkpoint tensor (None: replicated)
    hf_adapter: dotted module with hf_config_to_neox / neox_config_to_hf / hf_to_neox_state_dict /
        neox_to_hf_state_dict / load_hf_checkpoint(dir) -> (NeoXConfig, state dict), or None;
        hf_model_type: the transformers `model_type` it converts.
    """

    name: str
    build: Callable[..., nn.Module]
    partition_dim: Callable[[str], int | None]
    hf_adapter: str | None = None
    hf_model_type: str | None = None


_REGISTRY: dict[str, ModelSpec] = {}


def register_model(spec: ModelSpec) -> ModelSpec:
    if spec.name in _REGISTRY:
        raise ValueError(f"model type {spec.name!r} is registered twice")
    _REGISTRY[spec.name] = spec
    return spec


def get_model_spec(name: str) -> ModelSpec:
    if name not in _REGISTRY:
        raise ValueError(f"unknown model_type {name!r}; registered: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def registered_models() -> list[str]:
    return sorted(_REGISTRY)


def spec_for_hf_model_type(hf_model_type: str) -> ModelSpec | None:
    """The spec whose HF adapter converts transformers' `model_type` (None: no adapter)."""
    return next((s for s in _REGISTRY.values() if s.hf_adapter and s.hf_model_type == hf_model_type), None)


def build_model(model_cfg: ModelConfig, ps: ParallelState, **kwargs) -> nn.Module:
    """Build `model_cfg.model_type` for this rank (kwargs: pre_process, post_process, layer_range,
    init_seed, options, rng_tracker)."""
    return get_model_spec(model_cfg.model_type).build(model_cfg, ps, **kwargs)


def _register_builtin() -> None:
    from neox.models.gpt_neox import GPTNeoX, partition_dim
    from neox.models.rwkv import RWKV
    from neox.models.rwkv import partition_dim as rwkv_partition_dim

    register_model(ModelSpec(name="gpt_neox", build=GPTNeoX, partition_dim=partition_dim,
                             hf_adapter="neox.checkpoint.hf_gpt_neox", hf_model_type="gpt_neox"))
    register_model(ModelSpec(name="rwkv", build=RWKV, partition_dim=rwkv_partition_dim,
                             hf_adapter="neox.checkpoint.rwkv_convert", hf_model_type="rwkv"))


_register_builtin()

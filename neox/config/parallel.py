"""ParallelConfig: how the model is split (TP/PP/SP/DP), ZeRO, activation checkpointing, precision."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import ConfigError
from .fields import opt, require_choice, require_positive

PRECISIONS = ("fp32", "fp16", "bf16")
PARTITION_METHODS = ("uniform", "parameters")
SCHEDULES = ("1f1b", "gpipe", "interleaved")


@dataclass
class ParallelConfig:
    """Layout and numerics; the data-parallel size is derived from the world size at launch."""

    pipe_parallel_size: int = opt(
        0, "Pipeline stages PP. 0 (gpt-neox: pipeline engine off) and 1 both mean no pipeline."
    )
    model_parallel_size: int = opt(1, "Tensor-parallel size TP (Megatron column/row split).")
    sequence_parallel: bool = opt(
        False, "Megatron sequence parallelism: norms/dropout work on seq_length/TP tokens per rank."
    )
    num_virtual_pipeline_stages: int | None = opt(
        None, "Model chunks per pipeline rank (interleaved 1F1B); None or 1 = not interleaved."
    )
    pipe_partition_method: str = opt(
        "uniform",
        "How layers are spread over pipeline stages: 'uniform' (equal layer counts; gpt-neox's "
        "'type:transformer|mlp' means the same) or 'parameters' (balance parameter counts).",
        PARTITION_METHODS,
    )
    pipeline_schedule: str = opt(
        "1f1b",
        "Pipeline schedule (neox extension): '1f1b', 'gpipe', or 'interleaved' (1F1B over virtual stages; "
        "'1f1b' becomes it when num_virtual_pipeline_stages > 1).",
        SCHEDULES,
    )
    zero_stage: int = opt(
        0,
        "ZeRO stage: 0 (off), 1 (optimizer state and fp32 master weights sharded over DP), 2 or 3 "
        "(PyTorch FSDP2: also gradients, and for 3 parameters; needs PP = TP = 1).",
        (0, 1, 2, 3),
    )
    zero_reduce_bucket_size: int = opt(500_000_000, "Elements per gradient-reduction bucket.")
    zero_allgather_bucket_size: int = opt(500_000_000, "Elements per ZeRO-1 parameter all-gather bucket.")
    checkpoint_activations: bool = opt(False, "Recompute each layer's activations in the backward pass.")
    checkpoint_num_layers: int = opt(1, "Layers per activation-checkpoint chunk.")
    precision: str = opt(
        "fp32", "Training precision; set via fp16/bf16 sections or `precision`.", PRECISIONS
    )
    loss_scale: float = opt(0.0, "fp16 static loss scale; 0 = dynamic loss scaling.")
    initial_scale_power: int = opt(16, "fp16 dynamic loss scaling starts at 2**initial_scale_power.")
    loss_scale_window: int = opt(1000, "fp16: overflow-free steps before the loss scale doubles.")
    hysteresis: int = opt(2, "fp16: overflows tolerated before the loss scale is lowered.")
    min_loss_scale: float = opt(1.0, "fp16: lower bound of the dynamic loss scale.")

    @property
    def tp_size(self) -> int:
        return self.model_parallel_size

    @property
    def pp_size(self) -> int:
        return max(1, self.pipe_parallel_size)

    @property
    def virtual_size(self) -> int:
        return self.num_virtual_pipeline_stages or 1

    def dp_size(self, world_size: int) -> int:
        """Data-parallel size for a world size; ConfigError if TP * PP does not divide it."""
        mp = self.tp_size * self.pp_size
        if world_size <= 0 or world_size % mp:
            raise ConfigError(
                f"world size {world_size} is not divisible by model_parallel_size ({self.tp_size}) * "
                f"pipe_parallel_size ({self.pp_size}) = {mp}; launch a multiple of {mp} processes"
            )
        return world_size // mp

    def validate(self, model=None, world_size: int | None = None) -> None:
        """Check the layout on its own and, when given, against the model and the world size."""
        if isinstance(self.pipe_parallel_size, bool) or not isinstance(self.pipe_parallel_size, int) \
                or self.pipe_parallel_size < 0:
            raise ConfigError(
                f"`pipe_parallel_size` must be an integer >= 0, got {self.pipe_parallel_size!r}"
            )
        require_positive(self, "model_parallel_size", "checkpoint_num_layers", "zero_reduce_bucket_size",
                         "zero_allgather_bucket_size", "loss_scale_window")
        require_positive(self, "num_virtual_pipeline_stages", optional=True)
        for key in ("pipe_partition_method", "zero_stage", "precision", "pipeline_schedule"):
            require_choice(self, key)
        if self.virtual_size > 1 and self.pp_size < 2:
            raise ConfigError(
                f"num_virtual_pipeline_stages={self.num_virtual_pipeline_stages} needs pipe_parallel_size "
                f">= 2 (got {self.pipe_parallel_size}); unset it or add pipeline stages"
            )
        if self.zero_stage >= 2 and (self.pp_size > 1 or self.tp_size > 1):
            raise ConfigError(
                f"zero_stage {self.zero_stage} (FSDP) needs pipe_parallel_size and model_parallel_size 1, got "
                f"PP {self.pp_size} x TP {self.tp_size}; use zero_stage 1 with tensor/pipeline parallelism"
            )
        if self.pipeline_schedule == "interleaved" and self.virtual_size < 2:
            raise ConfigError(
                "pipeline_schedule 'interleaved' needs num_virtual_pipeline_stages >= 2 (model chunks per "
                "pipeline rank); set it, or use pipeline_schedule '1f1b'"
            )
        if self.loss_scale < 0 or self.min_loss_scale <= 0 or self.hysteresis < 1:
            raise ConfigError(
                f"fp16 loss scaling needs loss_scale >= 0, min_loss_scale > 0, hysteresis >= 1; got "
                f"{self.loss_scale}, {self.min_loss_scale}, {self.hysteresis}"
            )
        if model is not None:
            self._validate_against(model)
        if world_size is not None:
            self.dp_size(world_size)

    def _validate_against(self, model) -> None:
        tp = self.tp_size
        heads = model.num_attention_heads
        if heads is not None and heads % tp:
            raise ConfigError(
                f"num_attention_heads ({heads}) must be divisible by model_parallel_size ({tp})"
            )
        if model.ffn_size % tp:
            raise ConfigError(f"MLP width {model.ffn_size} must be divisible by model_parallel_size ({tp})")
        if self.sequence_parallel and model.seq_length % tp:
            raise ConfigError(
                f"sequence_parallel needs seq_length ({model.seq_length}) divisible by "
                f"model_parallel_size ({tp})"
            )
        chunks = self.pp_size * self.virtual_size
        uniform = self.pipe_partition_method == "uniform" or self.virtual_size > 1
        if chunks > model.num_layers:
            raise ConfigError(
                f"pipe_parallel_size ({self.pp_size}) * num_virtual_pipeline_stages ({self.virtual_size}) "
                f"= {chunks} model chunks exceed num_layers ({model.num_layers}); each chunk needs a layer"
            )
        if uniform and model.num_layers % chunks:
            raise ConfigError(
                f"num_layers ({model.num_layers}) must be divisible by pipe_parallel_size ({self.pp_size}) "
                f"* num_virtual_pipeline_stages ({self.virtual_size}) = {chunks} for a uniform partition; "
                f"change num_layers or the pipeline size"
                + ("" if self.virtual_size > 1 else ", or use pipe_partition_method: parameters")
            )

"""How a model is run in parallel, apart from its architecture: sequence parallelism, dropout RNG
streams, activation checkpointing.

`ParallelOptions` is plain data (buildable from neox.config's ParallelConfig); the RNG tracker is a
runtime resource and is passed to the model separately. Both are model-family agnostic.

Dropout RNG rule (as Megatron): an activation that differs across TP ranks (attention probabilities
of this rank's heads; under sequence parallelism, this rank's sequence shard) draws its mask from the
tracker's per-TP-rank stream (`tracker.fork()`); an activation replicated over TP draws from the
default stream, which is seeded identically on every rank, so every rank drops the same elements.
Without a tracker every dropout uses the default generator.

Activation checkpointing recomputes layer chunks in backward with torch.utils.checkpoint. Torch
restores the default CPU/CUDA RNG for the recomputation, but not the tracker's private states, so
`checkpoint_with_rng` saves them at forward and replays them during recomputation: the recomputed
dropout masks are bit-identical to the forward ones.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from megatron_ext.tensor_parallel import MODEL_PARALLEL_RNG, RNGStatesTracker


@dataclass(frozen=True)
class ParallelOptions:
    """Execution choices that do not change the parameters (so not part of ModelConfig).

    sequence_parallel: shard norms/dropout/residuals along the sequence over TP (no-op at tp 1).
    checkpoint_activations: recompute layer chunks in backward; checkpoint_num_layers layers each.
    """

    sequence_parallel: bool = False
    checkpoint_activations: bool = False
    checkpoint_num_layers: int = 1

    def __post_init__(self):
        if isinstance(self.checkpoint_num_layers, bool) or not isinstance(self.checkpoint_num_layers, int) \
                or self.checkpoint_num_layers < 1:
            raise ValueError(f"ParallelOptions.checkpoint_num_layers must be an integer >= 1, got "
                             f"{self.checkpoint_num_layers!r} (config key checkpoint_num_layers)")

    @classmethod
    def from_config(cls, parallel) -> ParallelOptions:
        """From a neox.config ParallelConfig (fields of the same names)."""
        return cls(sequence_parallel=bool(parallel.sequence_parallel),
                   checkpoint_activations=bool(parallel.checkpoint_activations),
                   checkpoint_num_layers=int(parallel.checkpoint_num_layers))


def model_parallel_rng(tracker: RNGStatesTracker | None) -> contextlib.AbstractContextManager:
    """The per-TP-rank stream when a tracker is given, else the default generator (a no-op context)."""
    return tracker.fork(MODEL_PARALLEL_RNG) if tracker is not None else contextlib.nullcontext()


class Dropout(nn.Dropout):
    """nn.Dropout drawing its mask from `rng_tracker`'s model-parallel stream when one is given
    (use for activations that differ across TP ranks); with None it is plain nn.Dropout."""

    def __init__(self, p: float, rng_tracker: RNGStatesTracker | None = None):
        super().__init__(p)
        self.rng_tracker = rng_tracker

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        with model_parallel_rng(self.rng_tracker):
            return super().forward(x)

    def extra_repr(self) -> str:
        return f"p={self.p}, stream={'model-parallel' if self.rng_tracker is not None else 'default'}"


def _tracker_contexts(tracker: RNGStatesTracker | None):
    """checkpoint's context_fn: (forward ctx that saves the tracker states, recompute ctx that
    replays them and puts back whatever the tracker held before recomputation)."""
    saved: dict[str, torch.Tensor] = {}

    @contextlib.contextmanager
    def forward_ctx() -> Iterator[None]:
        if tracker is not None:
            saved.update(tracker.get_states())
        yield

    @contextlib.contextmanager
    def recompute_ctx() -> Iterator[None]:
        if tracker is None:
            yield
            return
        current = tracker.get_states()
        tracker.set_states(saved)
        try:
            yield
        finally:
            tracker.set_states(current)

    return forward_ctx(), recompute_ctx()


def checkpoint_with_rng(fn: Callable[..., torch.Tensor], *args, rng_tracker: RNGStatesTracker | None = None
                        ) -> torch.Tensor:
    """`fn(*args)` with its activations recomputed in backward (non-reentrant torch checkpoint);
    default-generator and tracker RNG states are both replayed, so dropout recomputes identically."""
    return checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=True,
                      context_fn=lambda: _tracker_contexts(rng_tracker))


def resolve_stage(cfg, ps, layer_range: tuple[int, int] | None,
                  options: ParallelOptions | None) -> tuple[ParallelOptions, int, int, bool]:
    """What every model family checks first: (options, start, stop, sequence_parallel actually on).

    Sequence parallelism is a no-op at tp 1 and needs seq_length divisible by the TP size.
    """
    options = options or ParallelOptions()
    start, stop = layer_range if layer_range is not None else (0, cfg.num_layers)
    if not 0 <= start <= stop <= cfg.num_layers:
        raise ValueError(f"layer_range {layer_range} is not within [0, num_layers={cfg.num_layers}]")
    sp = options.sequence_parallel and ps.tp_size > 1
    if sp and cfg.seq_length is not None and cfg.seq_length % ps.tp_size:
        raise ValueError(f"sequence_parallel needs seq_length ({cfg.seq_length}) divisible by the "
                         f"tensor-parallel size {ps.tp_size}; change seq_length or tp, or disable it")
    return options, start, stop, sp

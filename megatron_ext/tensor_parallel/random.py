"""Per-TP-rank random streams for dropout, with the default stream shared by the TP group.

Two kinds of randomness exist under tensor parallelism:
  * replicated activations (outside TP regions) and weight init must draw the SAME numbers on every
    TP rank: torch's default generator, seeded identically everywhere;
  * activations that are sharded over TP (attention probs per head, the MLP's hidden shard) must draw
    DIFFERENT numbers per rank, or every shard would get the same dropout mask: a tracked stream
    entered with ``tracker.fork()``.

The tracker is a plain object (no globals); keep it with the model and checkpoint its states.
Device-agnostic: it drives the CUDA generator of the current device when CUDA is used, else the CPU one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from megatron_ext.topology import ParallelState

MODEL_PARALLEL_RNG = "model-parallel-rng"
_TP_SEED_OFFSET = 2718  # as Megatron: keeps the tracked seeds away from the default seed


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _get_state(device: str) -> torch.Tensor:
    return torch.cuda.get_rng_state() if device == "cuda" else torch.get_rng_state()


def _set_state(device: str, state: torch.Tensor) -> None:
    if device == "cuda":
        torch.cuda.set_rng_state(state)
    else:
        torch.set_rng_state(state)


class RNGStatesTracker:
    """Named generator states that can temporarily replace the default generator."""

    def __init__(self, device: str | None = None):
        self.device = device or _default_device()
        self._states: dict[str, torch.Tensor] = {}
        self._seeds: set[int] = set()

    def add(self, name: str, seed: int) -> None:
        if name in self._states:
            raise ValueError(f"RNG state {name!r} already exists in the tracker; use another name or reset()")
        if seed in self._seeds:
            raise ValueError(f"seed {seed} is already used by another tracked RNG state; pick another seed")
        outer = _get_state(self.device)
        if self.device == "cuda":
            torch.cuda.manual_seed(seed)
        else:
            torch.manual_seed(seed)
        self._states[name] = _get_state(self.device)
        _set_state(self.device, outer)
        self._seeds.add(seed)

    def reset(self) -> None:
        self._states.clear()
        self._seeds.clear()

    def get_states(self) -> dict[str, torch.Tensor]:
        """Copies of every tracked state (for checkpoints)."""
        return {k: v.clone() for k, v in self._states.items()}

    def set_states(self, states: dict[str, torch.Tensor]) -> None:
        self._states = {k: v.clone() for k, v in states.items()}

    @contextlib.contextmanager
    def fork(self, name: str = MODEL_PARALLEL_RNG) -> Iterator[None]:
        """Run the block on the tracked stream ``name``; the outer stream is restored afterwards."""
        if name not in self._states:
            raise ValueError(f"RNG state {name!r} is not tracked (known: {sorted(self._states)}); "
                             "call seed_all() or tracker.add() first")
        outer = _get_state(self.device)
        _set_state(self.device, self._states[name])
        try:
            yield
        finally:
            self._states[name] = _get_state(self.device)
            _set_state(self.device, outer)


def seed_all(ps: ParallelState, seed: int, device: str | None = None) -> RNGStatesTracker:
    """Seed the default generators (same on every rank) and track a per-TP-rank stream.

    The default stream (CPU and every CUDA device) gets ``seed`` on all ranks, which the
    initialisation contract needs (full master weights identical everywhere). The returned tracker
    holds ``MODEL_PARALLEL_RNG`` seeded with ``seed + 2718 + tp_rank``: use
    ``with tracker.fork(): dropout(...)`` inside TP-sharded regions.
    """
    torch.manual_seed(seed)  # seeds CPU and all CUDA devices
    tracker = RNGStatesTracker(device)
    tracker.add(MODEL_PARALLEL_RNG, seed + _TP_SEED_OFFSET + ps.tp_rank)
    return tracker

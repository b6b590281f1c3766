"""The Stage protocol: what the training loop needs from one kind of training.

Pretraining is a Stage; SFT, reward modelling, PPO, ILQL and DPO will be Stages too. The loop in
``neox.training.loop`` drives any of them (steps, logging, evaluation, checkpoints, signals) without
knowing which one it runs — no ``if stage == "dpo"`` branches.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable


@dataclass
class StepResult:
    """What one optimizer step reports to the loop."""

    loss: float
    lr: float
    tokens: int  # tokens processed by the whole job in this step (all DP ranks)
    grad_norm: float | None = None
    skipped: bool = False  # e.g. fp16 overflow or a non-finite loss
    extra: dict[str, float] = field(default_factory=dict)


@runtime_checkable
class Stage(Protocol):
    name: str

    def train_step(self, step: int) -> StepResult:
        """Run optimizer step ``step`` (1-based) over one global batch."""

    def evaluate(self, step: int) -> dict[str, float]:
        """Metrics on held-out data (must include ``loss``); empty if there is nothing to evaluate."""

    def save(self, run_dir: Path, step: int) -> Path:
        """Write a checkpoint of everything needed to resume at ``step + 1``."""

    def load(self, path: Path, step: int | None = None) -> int:
        """Restore from a checkpoint; returns the step it was saved at."""

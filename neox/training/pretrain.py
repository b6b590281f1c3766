"""Pretraining as a Stage: next-token loss on GPT samples, one global batch per optimizer step."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from neox.checkpoint.training_state import load_checkpoint, save_checkpoint
from neox.config import NeoXConfig
from neox.training.engine import Batch, Engine
from neox.training.optim import LRSchedule
from neox.training.stage import StepResult


class PretrainStage:
    """Owns the engine (model chunks, DP, optimizer, schedule), the LR schedule and the data position.

    ``train_batches(start_sample)`` returns this rank's iterator of micro-batches starting at a global
    sample index, so a resumed run continues at exactly the next sample; ``valid_batches()`` a fresh
    iterator over the validation split (or None).
    """

    name = "pretrain"

    def __init__(self, cfg: NeoXConfig, engine: Engine, schedule: LRSchedule, *,
                 train_batches: Callable[[int], Iterator[Batch]],
                 valid_batches: Callable[[], Iterator[Batch]] | None = None, eval_iters: int = 10):
        self.cfg, self.engine, self.schedule, self.ps = cfg, engine, schedule, engine.ps
        t = cfg.training
        self.grad_accum = t.gradient_accumulation_steps
        self.global_batch = t.global_batch(self.ps.dp_size)
        self.eval_iters = eval_iters
        self._train_batches, self._valid_batches = train_batches, valid_batches
        self.consumed_samples = 0
        self.save_optim = self.save_rng = True
        self._it = train_batches(0)

    def _take(self, it: Iterator[Batch], n: int) -> list[Batch]:
        batches = []
        for _ in range(n):
            try:
                batches.append(next(it))
            except StopIteration:
                break
        return batches

    def train_step(self, step: int) -> StepResult:
        lr = self.schedule.apply(self.engine.optimizer, step)
        batches = self._take(self._it, self.grad_accum)
        if len(batches) < self.grad_accum:
            raise RuntimeError(
                f"the training data ran out at step {step} (consumed {self.consumed_samples} samples); "
                "the dataset was built for fewer steps than train_iters: rebuild its index (delete the cache)"
            )
        loss, res = self.engine.train_batch(batches)
        self.consumed_samples += self.global_batch
        tokens = self.global_batch * batches[0]["tokens"].shape[1]
        extra = {"loss_scale": res.loss_scale} if res.loss_scale is not None else {}
        return StepResult(loss=loss, lr=lr, tokens=tokens, grad_norm=res.grad_norm, skipped=res.skipped,
                          extra=extra)

    def evaluate(self, step: int) -> dict[str, float]:
        if self._valid_batches is None or self.eval_iters <= 0:
            return {}
        batches = self._take(self._valid_batches(), self.eval_iters)
        pp = self.ps.pp_size
        if self.ps.vpp_size > 1:  # the interleaved schedule runs whole rounds of pp micro-batches
            batches = batches[: len(batches) - len(batches) % pp]
        if not batches:
            return {}
        with torch.no_grad():
            return {"loss": self.engine.eval_batch(batches)}

    # ---- checkpoints -------------------------------------------------------------------------
    def save(self, run_dir: Path, step: int) -> Path:
        return save_checkpoint(run_dir, step, model=list(self.engine.chunks),
                               optimizer=self.engine.optimizer if self.save_optim else None,
                               config=self.cfg, ps=self.ps, rng_tracker=self.engine.tracker,
                               save_rng=self.save_rng, trainer_state={"consumed_samples": self.consumed_samples})

    def load(self, path: Path, step: int | None = None, *, load_optim: bool = True, load_rng: bool = True,
             finetune: bool = False) -> int:
        """Resume (weights, optimizer, RNG, data position, step) — or, with ``finetune``, take only the
        weights and start at step 0 with a fresh optimizer."""
        state = load_checkpoint(path, model=list(self.engine.chunks),
                                optimizer=self.engine.optimizer if load_optim and not finetune else None,
                                ps=self.ps, step=step, rng_tracker=self.engine.tracker,
                                load_rng=load_rng and not finetune)
        if finetune:
            return 0
        self.consumed_samples = int(state.get("consumed_samples", 0))
        self._it = self._train_batches(self.consumed_samples)
        return int(state["iteration"])

"""Pretraining as a Stage: next-token loss on GPT samples, one global batch per optimizer step."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from neox.checkpoint.training_state import load_checkpoint, save_checkpoint
from neox.config import NeoXConfig
from neox.training.optim import LRSchedule
from neox.training.stage import StepResult

Batch = dict[str, torch.Tensor]  # tokens / labels / loss_mask, each [B, T]


def masked_mean(per_token: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return per_token.mean()
    mask = mask.to(per_token.dtype)
    return (per_token * mask).sum() / mask.sum().clamp_min(1.0)


class PretrainStage:
    """Owns the model, optimizer and data position of a pretraining run.

    ``train_batches(start_sample)`` returns an iterator of micro-batches starting at a global sample
    index, so a resumed run continues at exactly the next sample; ``valid_batches()`` a fresh
    iterator over the validation split (or None).
    """

    name = "pretrain"

    def __init__(self, cfg: NeoXConfig, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 schedule: LRSchedule, *, train_batches: Callable[[int], Iterator[Batch]],
                 valid_batches: Callable[[], Iterator[Batch]] | None = None, ps=None,
                 micro_batch_size: int, grad_accum: int, eval_iters: int = 10,
                 clip_grad: float = 0.0):
        self.cfg, self.model, self.optimizer, self.schedule, self.ps = cfg, model, optimizer, schedule, ps
        self.micro_batch_size, self.grad_accum = micro_batch_size, grad_accum
        self.eval_iters, self.clip_grad = eval_iters, clip_grad
        self._train_batches, self._valid_batches = train_batches, valid_batches
        self.consumed_samples = 0
        self._it = train_batches(0)

    # ---- one step ----------------------------------------------------------------------------
    def loss_on(self, batch: Batch) -> torch.Tensor:
        logits = self.model(batch["tokens"])
        per_token = self.model.loss(logits, batch["labels"])  # [B, T]
        return masked_mean(per_token, batch.get("loss_mask"))

    def train_step(self, step: int) -> StepResult:
        self.model.train()
        lr = self.schedule.apply(self.optimizer, step)
        self.optimizer.zero_grad(set_to_none=True)
        total, tokens = 0.0, 0
        for _ in range(self.grad_accum):
            batch = next(self._it)
            loss = self.loss_on(batch)
            (loss / self.grad_accum).backward()
            total += loss.detach().item()
            tokens += batch["tokens"].numel()
            self.consumed_samples += batch["tokens"].shape[0]
        loss_value = total / self.grad_accum
        if not torch.isfinite(torch.tensor(loss_value)):
            self.optimizer.zero_grad(set_to_none=True)
            return StepResult(loss=loss_value, lr=lr, tokens=tokens, skipped=True)
        params = [p for p in self.model.parameters() if p.grad is not None]
        max_norm = self.clip_grad if self.clip_grad > 0 else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
        self.optimizer.step()
        return StepResult(loss=loss_value, lr=lr, tokens=tokens, grad_norm=grad_norm)

    @torch.no_grad()
    def evaluate(self, step: int) -> dict[str, float]:
        if self._valid_batches is None or self.eval_iters <= 0:
            return {}
        self.model.eval()
        losses = []
        it = self._valid_batches()
        for _ in range(self.eval_iters):
            try:
                batch = next(it)
            except StopIteration:
                break
            losses.append(self.loss_on(batch).item())
        self.model.train()
        return {"loss": sum(losses) / len(losses)} if losses else {}

    # ---- checkpoints -------------------------------------------------------------------------
    def save(self, run_dir: Path, step: int) -> Path:
        return save_checkpoint(run_dir, step, model=self.model, optimizer=self.optimizer, config=self.cfg,
                               ps=self.ps, trainer_state={"consumed_samples": self.consumed_samples})

    def load(self, path: Path, step: int | None = None) -> int:
        state = load_checkpoint(path, model=self.model, optimizer=self.optimizer, ps=self.ps, step=step)
        self.consumed_samples = int(state.get("consumed_samples", 0))
        self._it = self._train_batches(self.consumed_samples)
        return int(state["iteration"])

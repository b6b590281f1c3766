"""The training loop: steps, progress output, evaluation and checkpoints, for any Stage."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

from neox.training.progress import ProgressLogger, format_duration
from neox.training.stage import Stage


@dataclass
class LoopSettings:
    train_iters: int
    log_interval: int = 10
    eval_interval: int = 0  # 0 = only at the end
    save_dir: str | None = None
    checkpoint_factor: int = 0  # save every N steps; 0 = only at the end
    extra_save_iters: list[int] = field(default_factory=list)
    max_nonfinite_losses: int = 0  # non-finite losses tolerated (skipped) before the run stops
    exit_interval: int = 0  # stop (with a checkpoint) after this many steps of this run; 0 = never


class NonFiniteLossError(RuntimeError):
    pass


def run(stage: Stage, settings: LoopSettings, logger: ProgressLogger, start_step: int = 0) -> dict:
    """Train from ``start_step + 1`` to ``settings.train_iters``; returns a summary dict."""
    t0 = time.perf_counter()
    first_loss = last_loss = None
    evals: list[tuple[int, float]] = []
    nonfinite = 0
    saved_at = None
    stop_at = settings.train_iters
    if settings.exit_interval:
        stop_at = min(stop_at, start_step + settings.exit_interval)
    for step in range(start_step + 1, stop_at + 1):
        res = stage.train_step(step)
        if not math.isfinite(res.loss):
            nonfinite += 1
            logger.print(f"step {step}: non-finite loss ({res.loss}); update skipped "
                         f"({nonfinite}/{settings.max_nonfinite_losses} allowed)")
            if nonfinite > settings.max_nonfinite_losses:
                raise NonFiniteLossError(
                    f"loss was non-finite at step {step} ({nonfinite} times); stopping. "
                    + (f"The last good checkpoint is {saved_at}." if saved_at else "No checkpoint was saved.")
                    + " Lower the learning rate or check the data, then resume with `load`."
                )
        if first_loss is None:
            first_loss = res.loss
        last_loss = res.loss
        log_now = step % settings.log_interval == 0 or step == 1 or step == settings.train_iters
        extra = dict(res.extra)
        logger.step(step, res.tokens, loss=res.loss, lr=res.lr, grad_norm=res.grad_norm, log=log_now, **extra)
        is_last = step == settings.train_iters
        if (settings.eval_interval and step % settings.eval_interval == 0) or is_last:
            metrics = stage.evaluate(step)
            if metrics:
                logger.eval(step, metrics["loss"])
                evals.append((step, metrics["loss"]))
        if settings.save_dir and (
            step == stop_at
            or (settings.checkpoint_factor and step % settings.checkpoint_factor == 0)
            or step in settings.extra_save_iters
        ):
            saved_at = stage.save(Path(settings.save_dir), step)
            logger.print(f"saved checkpoint {saved_at}")
    wall = time.perf_counter() - t0
    what = "training done" if stop_at == settings.train_iters else f"stopped at step {stop_at} (exit_interval)"
    logger.print(f"{what}: {stop_at - start_step} steps in {format_duration(wall)}"
                 + (f", final eval loss {evals[-1][1]:.4f}" if evals else ""))
    return {"first_loss": first_loss, "last_loss": last_loss, "evals": evals, "wall_s": wall,
            "checkpoint": str(saved_at) if saved_at else None}

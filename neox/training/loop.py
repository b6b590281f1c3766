"""The training loop: steps, progress output, evaluation, checkpoints and preemption, for any Stage."""

from __future__ import annotations

import math
import re
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from neox.training.progress import ProgressLogger, format_duration
from neox.training.stage import Stage

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)  # SLURM sends SIGUSR1 (--signal) or SIGTERM before killing


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
    keep_last_n_checkpoints: int = 0  # 0 = keep all
    is_main: bool = True  # rank 0 deletes old checkpoints


class NonFiniteLossError(RuntimeError):
    pass


class StopRequests:
    """Turns SIGTERM/SIGUSR1 into a flag checked after each step; every rank stops at the same step."""

    def __init__(self):
        self.requested: int | None = None
        self._previous = {}

    def __enter__(self):
        for sig in STOP_SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: no signal handling
                pass
        return self

    def _handle(self, signum, frame) -> None:
        self.requested = signum

    def __exit__(self, *exc):
        for sig, prev in self._previous.items():
            signal.signal(sig, prev)

    def agreed(self) -> bool:
        """True on every rank once any rank got a stop signal (one tiny all-reduce per step)."""
        flag = torch.tensor([1.0 if self.requested is not None else 0.0])
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


_STEP_DIR = re.compile(r"^global_step(\d+)$")


def prune_checkpoints(save_dir: Path, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` global_stepN dirs (never the one ``latest`` names)."""
    if keep <= 0 or not save_dir.is_dir():
        return []
    latest = (save_dir / "latest").read_text().strip() if (save_dir / "latest").is_file() else None
    steps = sorted((int(m.group(1)), p) for p in save_dir.iterdir() if (m := _STEP_DIR.match(p.name)))
    removed = []
    for _, path in steps[:-keep]:
        if path.name != latest:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


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
    reason = None

    def save(step: int) -> None:
        nonlocal saved_at
        saved_at = stage.save(Path(settings.save_dir), step)
        logger.print(f"saved checkpoint {saved_at}")
        if settings.is_main and settings.keep_last_n_checkpoints:
            prune_checkpoints(Path(settings.save_dir), settings.keep_last_n_checkpoints)

    with StopRequests() as stops:
        step = start_step
        for step in range(start_step + 1, stop_at + 1):
            res = stage.train_step(step)
            if not math.isfinite(res.loss):
                nonfinite += 1
                logger.print(f"step {step}: loss is {res.loss}; update skipped "
                             f"({nonfinite} of {settings.max_nonfinite_losses} tolerated)")
                logger.record("nonfinite", step, count=nonfinite)
                if nonfinite > settings.max_nonfinite_losses:
                    if settings.save_dir:  # skipped updates leave the weights of the last good step
                        save(step - 1)
                    raise NonFiniteLossError(
                        f"the loss was non-finite at step {step} ({nonfinite} times, more than "
                        f"max_nonfinite_losses={settings.max_nonfinite_losses}); stopping. "
                        + (f"The last good state is saved in {saved_at}. " if saved_at else "")
                        + "Lower the learning rate, check the data near this step, or raise "
                        "max_nonfinite_losses, then resume with `load`."
                    )
                continue
            if first_loss is None:
                first_loss = res.loss
            last_loss = res.loss
            log_now = step % settings.log_interval == 0 or step == 1 or step == settings.train_iters
            logger.step(step, res.tokens, loss=res.loss, lr=res.lr, grad_norm=res.grad_norm, log=log_now,
                        **dict(res.extra))
            is_last = step == settings.train_iters
            if (settings.eval_interval and step % settings.eval_interval == 0) or is_last:
                metrics = stage.evaluate(step)
                if metrics:
                    logger.eval(step, metrics["loss"])
                    evals.append((step, metrics["loss"]))
            if stops.agreed():
                reason = f"stop signal ({signal.Signals(stops.requested).name if stops.requested else 'peer'})"
                if settings.save_dir:
                    save(step)
                break
            if settings.save_dir and (
                step == stop_at
                or (settings.checkpoint_factor and step % settings.checkpoint_factor == 0)
                or step in settings.extra_save_iters
            ):
                save(step)
    wall = time.perf_counter() - t0
    if reason is None:
        reason = "done" if step == settings.train_iters else f"exit_interval reached at step {step}"
    logger.print(f"training {reason}: {step - start_step} steps in {format_duration(wall)}"
                 + (f", final eval loss {evals[-1][1]:.4f}" if evals else ""))
    logger.close()
    return {"first_loss": first_loss, "last_loss": last_loss, "evals": evals, "wall_s": wall,
            "checkpoint": str(saved_at) if saved_at else None, "stopped": reason, "last_step": step}

"""Where metrics go besides the terminal: TensorBoard and Weights & Biases (both optional packages).

A sink gets ``log(kind, step, values)`` for every record ("train", "eval") and ``close()`` at the end.
Only rank 0 creates sinks.
"""

from __future__ import annotations

import os
from pathlib import Path


class TensorBoardSink:
    """Scalars under ``{kind}/{name}`` in ``tensorboard_dir`` (needs the ``tensorboard`` package)."""

    def __init__(self, log_dir: str | Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:  # torch's writer needs the tensorboard package
            raise RuntimeError(
                f"tensorboard_dir is set ({log_dir}) but TensorBoard is not installed: pip install tensorboard "
                "(or unset tensorboard_dir)"
            ) from e
        self.writer = SummaryWriter(log_dir=str(log_dir))

    def log(self, kind: str, step: int, values: dict) -> None:
        for name, val in values.items():
            if isinstance(val, (int, float)):
                self.writer.add_scalar(f"{kind}/{name}", val, step)

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()


class WandbSink:
    """Weights & Biases run; ``WANDB_MODE=offline`` (or no network login) writes a local run to sync later."""

    def __init__(self, *, project: str, group: str | None, name: str | None, config: dict, run_dir: str | None):
        try:
            import wandb
        except ImportError as e:
            raise RuntimeError("use_wandb is set but wandb is not installed: pip install wandb "
                               "(or set use_wandb: false)") from e
        mode = os.environ.get("WANDB_MODE")
        if mode is None and not os.environ.get("WANDB_API_KEY"):
            mode = "offline"  # no credentials: keep the run locally instead of failing or prompting
        self.wandb = wandb
        self.run = wandb.init(project=project, group=group, name=name, config=config, dir=run_dir, mode=mode)

    def log(self, kind: str, step: int, values: dict) -> None:
        self.run.log({f"{kind}/{k}": v for k, v in values.items() if isinstance(v, (int, float))}, step=step)

    def close(self) -> None:
        self.run.finish()


def build_sinks(cfg, enabled: bool) -> list:
    """The sinks the config asks for (none on ranks other than 0)."""
    if not enabled:
        return []
    t = cfg.training
    sinks: list = []
    if t.tensorboard_dir:
        sinks.append(TensorBoardSink(t.tensorboard_dir))
    if t.use_wandb:
        sinks.append(WandbSink(project=t.wandb_project, group=t.wandb_group, name=t.wandb_run_name,
                               config=cfg.to_dict(), run_dir=t.save or t.log_dir))
    return sinks

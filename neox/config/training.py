"""TrainingConfig: iterations, batch sizes, evaluation, checkpoints, logging."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import ConfigError
from .fields import opt, require_positive


@dataclass
class TrainingConfig:
    """The loop's schedule and bookkeeping (DeepSpeed batch keys keep their gpt-neox names)."""

    train_iters: int | None = opt(None, "Optimizer steps to train for.")
    train_micro_batch_size_per_gpu: int = opt(1, "Sequences per micro-batch per data-parallel rank.")
    gradient_accumulation_steps: int = opt(1, "Micro-batches accumulated per optimizer step.")
    train_batch_size: int | None = opt(
        None, "Global batch (sequences per step); when set it must equal micro * grad_accum * DP."
    )
    eval_interval: int = opt(1000, "Evaluate every this many iterations.")
    eval_iters: int = opt(100, "Validation micro-batches per evaluation.")
    log_interval: int = opt(100, "Log every this many iterations.")
    save: str | None = opt(None, "Run directory checkpoints are written to.")
    load: str | None = opt(None, "Run or checkpoint directory to resume or fine-tune from.")
    checkpoint_factor: int | None = opt(
        None, "Save every this many iterations (gpt-neox; older configs call it save_interval)."
    )
    extra_save_iters: list[int] | None = opt(None, "Additional iterations to save at, e.g. [0, 1, 2, 4].")
    keep_last_n_checkpoints: int | None = opt(
        None, "Delete older checkpoints beyond this many; None keeps all."
    )
    exit_interval: int | None = opt(
        None, "Stop after this many iterations of this run (for time-limited jobs)."
    )
    load_iteration: int | None = opt(
        None, "Resume from global_step<N> of `load` instead of the one its `latest` file names (neox extension)."
    )
    max_nonfinite_losses: int = opt(
        0,
        "Steps with a NaN/inf loss that are skipped (no update) before the run stops with a checkpoint of "
        "the last good state (neox extension; fp16 overflows are handled by the loss scaler instead).",
    )
    finetune: bool = opt(False, "Load only weights from `load`; start at iteration 0 with a fresh optimizer.")
    no_save_optim: bool = opt(False, "Do not save optimizer state.")
    no_load_optim: bool = opt(False, "Do not load optimizer state.")
    no_save_rng: bool = opt(False, "Do not save RNG states.")
    no_load_rng: bool = opt(False, "Do not load RNG states.")
    seed: int = opt(1234, "Random seed (init, data order, dropout).")
    log_dir: str | None = opt(None, "Directory for text logs.")
    tensorboard_dir: str | None = opt(None, "TensorBoard log directory; None disables TensorBoard.")
    use_wandb: bool = opt(False, "Log to Weights & Biases.")
    wandb_project: str = opt("neox", "W&B project.")
    wandb_group: str | None = opt(None, "W&B group.")
    wandb_run_name: str | None = opt(None, "W&B run name.")
    log_grad_norm: bool = opt(False, "Log the global gradient norm.")
    log_param_norm: bool = opt(False, "Log the global parameter norm.")
    peak_flops: float | None = opt(
        None,
        "Peak FLOP/s of one device, for MFU (gpt-neox `peak_theoretical_tflops` * 1e12 is read into this).",
    )

    def global_batch(self, dp_size: int) -> int:
        """Sequences per optimizer step for a data-parallel size."""
        return self.train_micro_batch_size_per_gpu * self.gradient_accumulation_steps * dp_size

    def validate(self, dp_size: int | None = None) -> None:
        require_positive(self, "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                         "eval_interval", "log_interval")
        require_positive(self, "train_iters", "train_batch_size", "checkpoint_factor",
                         "keep_last_n_checkpoints", "exit_interval", optional=True)
        if isinstance(self.eval_iters, bool) or not isinstance(self.eval_iters, int) or self.eval_iters < 0:
            raise ConfigError(f"`eval_iters` must be an integer >= 0, got {self.eval_iters!r}")
        if self.extra_save_iters is not None and any(
                isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in self.extra_save_iters):
            raise ConfigError(
                f"extra_save_iters must be a list of integers >= 0, got {self.extra_save_iters}"
            )
        if self.peak_flops is not None and self.peak_flops <= 0:
            raise ConfigError(f"peak_flops must be > 0, got {self.peak_flops}")
        if dp_size is not None and self.train_batch_size is not None:
            got = self.global_batch(dp_size)
            if got != self.train_batch_size:
                per = self.train_micro_batch_size_per_gpu * dp_size
                hint = (f"; set gradient_accumulation_steps to {self.train_batch_size // per}"
                        if self.train_batch_size % per == 0 else "")
                raise ConfigError(
                    f"train_batch_size ({self.train_batch_size}) != train_micro_batch_size_per_gpu "
                    f"({self.train_micro_batch_size_per_gpu}) * gradient_accumulation_steps "
                    f"({self.gradient_accumulation_steps}) * data-parallel size ({dp_size}) = {got}{hint}"
                )

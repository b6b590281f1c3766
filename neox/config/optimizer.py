"""OptimizerConfig: optimizer, learning-rate schedule and gradient clipping."""

from __future__ import annotations

import math
from dataclasses import dataclass

from .errors import ConfigError
from .fields import opt, require_choice, require_positive

OPTIMIZERS = ("Adam", "AdamW", "SGD", "Lion")
LR_DECAY_STYLES = ("constant", "linear", "cosine", "inverse_sqrt")


@dataclass
class OptimizerConfig:
    """gpt-neox's nested `optimizer: {type, params: {lr, betas, eps}}` flattens into these keys."""

    optimizer_type: str = opt(
        "Adam",
        "Optimizer. 'Adam' follows gpt-neox/DeepSpeed: weight decay is decoupled (AdamW), so Adam and "
        "AdamW are the same update.",
        OPTIMIZERS,
    )
    lr: float | None = opt(None, "Peak learning rate (optimizer.params.lr); required for training.")
    betas: list[float] = opt([0.9, 0.999], "Adam/AdamW/Lion betas [beta1, beta2].")
    eps: float = opt(1e-8, "Adam/AdamW epsilon.")
    momentum: float = opt(0.0, "SGD momentum.")
    weight_decay: float = opt(
        0.1, "Decoupled weight decay (gpt-neox default 0.1); biases and norms are exempt."
    )
    lr_decay_style: str = opt("linear", "Schedule after warmup.", LR_DECAY_STYLES)
    lr_decay_iters: int | None = opt(None, "Iterations over which lr decays; None = train_iters.")
    lr_decay_fraction: float | None = opt(
        None, "Alternative to lr_decay_iters: decay over this fraction of train_iters."
    )
    warmup: float = opt(0.01, "Linear warmup as a fraction of the decay iterations (gpt-neox semantics).")
    warmup_iters: int | None = opt(
        None, "Warmup in iterations (neox extension); overrides `warmup` when set."
    )
    min_lr: float = opt(0.0, "Floor of the decayed learning rate.")
    clip_grad: float = opt(
        1.0, "Clip the global gradient norm to this (gpt-neox `gradient_clipping`); 0 = off."
    )

    def decay_iters(self, train_iters: int) -> int:
        """Iterations of the decay phase, as gpt-neox: lr_decay_iters, else fraction * train_iters."""
        if self.lr_decay_iters is not None:
            n = self.lr_decay_iters
        elif self.lr_decay_fraction is not None:
            n = math.floor(train_iters * self.lr_decay_fraction)
        else:
            n = train_iters
        return max(1, n)

    def warmup_steps(self, train_iters: int) -> int:
        """Warmup iterations: warmup_iters, else round(warmup * decay_iters)."""
        if self.warmup_iters is not None:
            return self.warmup_iters
        return int(round(self.warmup * self.decay_iters(train_iters)))

    def validate(self, training: bool = False) -> None:
        require_choice(self, "optimizer_type")
        require_choice(self, "lr_decay_style")
        if self.lr is None:
            if training:
                raise ConfigError("`lr` is required for training: set optimizer.params.lr (or `lr`)")
        elif not self.lr > 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"betas must be two numbers in [0, 1), got {self.betas}")
        if self.eps <= 0:
            raise ConfigError(f"eps must be > 0, got {self.eps}")
        if self.weight_decay < 0 or self.momentum < 0 or self.clip_grad < 0:
            raise ConfigError("weight_decay, momentum and clip_grad must be >= 0")
        require_positive(self, "lr_decay_iters", optional=True)
        if self.lr_decay_fraction is not None and not 0 < self.lr_decay_fraction <= 1:
            raise ConfigError(f"lr_decay_fraction must be in (0, 1], got {self.lr_decay_fraction}")
        if not 0 <= self.warmup <= 1:
            raise ConfigError(
                f"warmup is a fraction of the decay iterations and must be in [0, 1], got {self.warmup}; "
                f"use warmup_iters for a number of steps"
            )
        if self.warmup_iters is not None and (isinstance(self.warmup_iters, bool) or self.warmup_iters < 0):
            raise ConfigError(f"warmup_iters must be >= 0, got {self.warmup_iters}")
        if self.min_lr < 0 or (self.lr is not None and self.min_lr > self.lr):
            raise ConfigError(f"min_lr ({self.min_lr}) must be in [0, lr ({self.lr})]")

"""Optimizers and learning-rate schedules with gpt-neox's names and semantics."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

OPTIMIZERS = ("adam", "adamw", "sgd", "lion")
DECAY_STYLES = ("constant", "linear", "cosine", "inverse_sqrt")


def param_groups(named_params: Iterable[tuple[str, torch.nn.Parameter]], weight_decay: float) -> list[dict]:
    """Weight decay on matrices only: biases and norm gains/biases (all 1-D tensors) are not decayed."""
    decay, no_decay = [], []
    for _name, p in named_params:
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


class Lion(torch.optim.Optimizer):
    """Lion (Chen et al. 2023): sign of an interpolated momentum; decoupled weight decay."""

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0):
        super().__init__(params, dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p)
                m = state["exp_avg"]
                p.mul_(1 - group["lr"] * group["weight_decay"])
                update = (m * beta1 + p.grad * (1 - beta1)).sign_()
                p.add_(update, alpha=-group["lr"])
                m.mul_(beta2).add_(p.grad, alpha=1 - beta2)
        return loss


def optimizer_spec(type: str = "adamw", *, lr: float = 1e-4, betas=(0.9, 0.999), eps: float = 1e-8,
                   momentum: float = 0.0, on_cuda: bool = False) -> tuple[type, dict]:
    """(optimizer class, constructor kwargs) for gpt-neox's optimizer ``type`` (case-insensitive).

    Adam and AdamW both use decoupled weight decay (AdamW), as DeepSpeed's FusedAdam does in gpt-neox by
    default. The class/kwargs form lets ZeRO and mixed-precision wrappers build it over their masters.
    """
    kind = type.lower()
    if kind in ("adam", "adamw"):
        # foreach is the fast multi-tensor path on CPU and GPU; fused needs every param on CUDA
        fast = {"fused": True} if on_cuda else {"foreach": True}
        return torch.optim.AdamW, dict(lr=lr, betas=tuple(betas), eps=eps, **fast)
    if kind == "sgd":
        return torch.optim.SGD, dict(lr=lr, momentum=momentum)
    if kind == "lion":
        return Lion, dict(lr=lr, betas=tuple(betas))
    raise ValueError(f"optimizer type {type!r} is not supported; choose one of {', '.join(OPTIMIZERS)}")


def build_optimizer(named_params, *, type: str = "adamw", lr: float = 1e-4, betas=(0.9, 0.999),
                    eps: float = 1e-8, weight_decay: float = 0.0, momentum: float = 0.0):
    """A plain torch optimizer over ``named_params`` with weight decay on matrices only."""
    groups = param_groups(named_params, weight_decay)
    on_cuda = all(p.is_cuda for g in groups for p in g["params"]) and torch.cuda.is_available()
    cls, kwargs = optimizer_spec(type, lr=lr, betas=betas, eps=eps, momentum=momentum, on_cuda=on_cuda)
    return cls(groups, **kwargs)


class LRSchedule:
    """gpt-neox's AnnealingLR: linear warmup to ``lr``, then decay to ``min_lr`` by ``decay_iters``.

    ``warmup`` is a fraction of ``decay_iters`` when < 1, else a number of steps.
    """

    def __init__(self, *, lr: float, min_lr: float = 0.0, decay_style: str = "cosine",
                 decay_iters: int, warmup: float = 0.0):
        if decay_style not in DECAY_STYLES:
            raise ValueError(f"lr_decay_style {decay_style!r} unknown; choose one of {', '.join(DECAY_STYLES)}")
        self.lr, self.min_lr, self.style = lr, min_lr, decay_style
        self.decay_iters = max(1, int(decay_iters))
        self.warmup_iters = int(warmup * self.decay_iters) if warmup < 1 else int(warmup)

    def __call__(self, step: int) -> float:
        """The learning rate for optimizer step ``step`` (0-based)."""
        if self.warmup_iters > 0 and step <= self.warmup_iters:
            return self.lr * step / self.warmup_iters
        if self.style == "constant":
            return self.lr
        if self.style == "inverse_sqrt":
            return max(self.min_lr, self.lr * math.sqrt(max(self.warmup_iters, 1)) / math.sqrt(max(step, 1)))
        done = min(step - self.warmup_iters, self.decay_iters - self.warmup_iters)
        frac = done / max(1, self.decay_iters - self.warmup_iters)
        if self.style == "linear":
            return self.min_lr + (self.lr - self.min_lr) * (1.0 - frac)
        return self.min_lr + (self.lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * frac))

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> float:
        lr = self(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        return lr

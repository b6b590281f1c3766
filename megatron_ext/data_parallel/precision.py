"""Mixed precision: fp16 loss scaling (DeepSpeed/gpt-neox semantics) and fp32 master weights.

Loss scaling keys are gpt-neox's ``fp16`` section: ``loss_scale`` (> 0: static), ``initial_scale_power``
(dynamic scale starts at 2**p), ``loss_scale_window`` (double after this many overflow-free steps),
``hysteresis`` (overflowing steps tolerated before the scale is lowered), ``min_loss_scale``.

Dynamic rule (as DeepSpeed's DynamicLossScaler, step counter ``it`` counting every step):

* overflow: if the hysteresis budget is down to 1 (or hysteresis == 1) the scale halves (not below
  ``min_loss_scale``); otherwise the budget drops by one and the scale stays. Either way the step is
  skipped and ``last_overflow = it``.
* no overflow: when ``(it - last_overflow) % window == 0`` the scale doubles and the budget refills
  (with ``consecutive_hysteresis`` the budget refills on every clean step instead).

An overflow anywhere (any grad on any rank) must skip the step everywhere, so the inf/nan flag is
all-reduced (MAX) over the whole world (or a given group) before deciding.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from megatron_ext.data_parallel.clip import counts_toward_norm, global_grad_norm, scale_grads_by_norm
from megatron_ext.topology import ParallelState


# ---------------------------------------------------------------------------------------------- scalers
class StaticLossScaler:
    """A fixed loss scale (``loss_scale > 0`` in the config; 1.0 = no scaling, e.g. for bf16/fp32)."""

    dynamic = False

    def __init__(self, scale: float = 1.0):
        if scale <= 0:
            raise ValueError(f"static loss scale must be > 0, got {scale}")
        self.scale = float(scale)

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * self.scale

    def update(self, overflow: bool) -> None:  # noqa: ARG002 - same face as the dynamic scaler
        return None

    def state_dict(self) -> dict:
        return {"scale": self.scale}

    def load_state_dict(self, state: dict) -> None:
        self.scale = float(state["scale"])


class DynamicLossScaler:
    """Dynamic fp16 loss scale (see the module docstring for the exact rule)."""

    dynamic = True

    def __init__(self, initial_scale_power: int = 16, loss_scale_window: int = 1000, hysteresis: int = 2,
                 min_loss_scale: float = 1.0, scale_factor: float = 2.0, consecutive_hysteresis: bool = False,
                 raise_at_min_scale: bool = False):
        if loss_scale_window < 1 or hysteresis < 1 or min_loss_scale <= 0 or scale_factor <= 1:
            raise ValueError(
                f"DynamicLossScaler needs loss_scale_window >= 1, hysteresis >= 1, min_loss_scale > 0 and "
                f"scale_factor > 1; got {loss_scale_window}, {hysteresis}, {min_loss_scale}, {scale_factor}"
            )
        self.scale = float(2 ** initial_scale_power)
        self.window, self.hysteresis, self.min_scale = loss_scale_window, hysteresis, float(min_loss_scale)
        self.factor, self.consecutive_hysteresis = float(scale_factor), consecutive_hysteresis
        self.raise_at_min_scale = raise_at_min_scale
        self.cur_hysteresis = hysteresis
        self.iteration, self.last_overflow_iter = 0, -1

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * self.scale

    def update(self, overflow: bool) -> None:
        """Advance one step given whether this step's grads overflowed (already agreed by all ranks)."""
        if overflow:
            if self.hysteresis == 1 or self.cur_hysteresis == 1:
                if self.scale <= self.min_scale and self.raise_at_min_scale:
                    raise RuntimeError(f"fp16 loss scale is already at min_loss_scale={self.min_scale} and the "
                                       "gradients still overflow; the run is diverging")
                self.scale = max(self.scale / self.factor, self.min_scale)
            else:
                self.cur_hysteresis -= 1
            self.last_overflow_iter = self.iteration
        else:
            if self.consecutive_hysteresis:
                self.cur_hysteresis = self.hysteresis
            if (self.iteration - self.last_overflow_iter) % self.window == 0:
                self.cur_hysteresis = self.hysteresis
                self.scale *= self.factor
        self.iteration += 1

    def state_dict(self) -> dict:
        return {"scale": self.scale, "cur_hysteresis": self.cur_hysteresis, "iteration": self.iteration,
                "last_overflow_iter": self.last_overflow_iter}

    def load_state_dict(self, state: dict) -> None:
        self.scale = float(state["scale"])
        self.cur_hysteresis = int(state["cur_hysteresis"])
        self.iteration, self.last_overflow_iter = int(state["iteration"]), int(state["last_overflow_iter"])


def make_loss_scaler(loss_scale: float = 0.0, initial_scale_power: int = 16, loss_scale_window: int = 1000,
                     hysteresis: int = 2, min_loss_scale: float = 1.0):
    """gpt-neox fp16 keys -> a scaler: ``loss_scale > 0`` is static, 0 is dynamic."""
    if loss_scale > 0:
        return StaticLossScaler(loss_scale)
    return DynamicLossScaler(initial_scale_power, loss_scale_window, hysteresis, min_loss_scale)


def found_inf(tensors: Iterable[torch.Tensor | None], group=None) -> bool:
    """True if any tensor on ANY rank of ``group`` (default: the whole world) holds inf or nan."""
    tensors = [t for t in tensors if t is not None]
    device = tensors[0].device if tensors else torch.device("cpu")
    if not tensors and dist.is_initialized() and dist.get_backend(group) == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    flag = torch.zeros(1, dtype=torch.float32, device=device)
    for t in tensors:
        if not torch.isfinite(t).all():
            flag.fill_(1.0)
            break
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
    return bool(flag.item() > 0)


# ---------------------------------------------------------------------------------------------- masters
@dataclass(eq=False)
class MasterPiece:
    """An fp32 master tensor mirroring ``param.view(-1)[lo:hi]`` (the whole param without ZeRO)."""

    param: nn.Parameter
    master: torch.Tensor
    lo: int
    hi: int
    counted: bool  # counts toward the global grad norm on this rank


@dataclass
class StepResult:
    skipped: bool  # overflow: no update happened
    grad_norm: float  # after unscaling, before clipping; nan/inf when skipped
    loss_scale: float  # the scale the grads of this step were computed with


class MasterParamOptimizer:
    """A torch optimizer stepping fp32 masters of the model params: copy grads up, check overflow,
    unscale, clip, step, copy params down. Subclasses build ``self.pieces`` and ``self.optimizer``."""

    pieces: list[MasterPiece]
    optimizer: torch.optim.Optimizer

    def __init__(self, ps: ParallelState, *, loss_scaler=None, clip_grad: float = 0.0, overflow_group=None,
                 dp_sharded: bool = False):
        self.ps, self.loss_scaler, self.clip_grad = ps, loss_scaler, clip_grad
        self.overflow_group, self.dp_sharded = overflow_group, dp_sharded

    # -- subclass hooks
    def _grad_source(self, piece: MasterPiece) -> torch.Tensor | None:
        raise NotImplementedError

    def _copy_masters_to_model(self) -> None:
        raise NotImplementedError

    def zero_grad(self, set_to_none: bool = True) -> None:  # noqa: ARG002
        raise NotImplementedError

    # -- shared flow
    @staticmethod
    def _build_groups(params_or_groups, pieces_of) -> list[dict]:
        """Map user param groups (torch style) onto master tensors; groups keep their options."""
        items = list(params_or_groups)
        groups = items if items and isinstance(items[0], dict) else [{"params": items}]
        out = []
        for g in groups:
            masters = [piece.master for p in g["params"] for piece in pieces_of.get(id(p), [])]
            out.append({**{k: v for k, v in g.items() if k != "params"}, "params": masters})
        return out

    @property
    def param_groups(self) -> list[dict]:
        return self.optimizer.param_groups

    @torch.no_grad()
    def step(self) -> StepResult:
        scale = self.loss_scaler.scale if self.loss_scaler is not None else 1.0
        for piece in self.pieces:
            g = self._grad_source(piece)
            if g is None:
                piece.master.grad = None
            elif g.dtype == torch.float32:
                piece.master.grad = g.view_as(piece.master)  # a view: no copy (the model grad is scratch)
            else:
                piece.master.grad = g.float().view_as(piece.master)
        master_grads = [piece.master.grad for piece in self.pieces]
        if self.loss_scaler is not None:  # static scales skip overflowing steps too (scale kept)
            overflow = found_inf(master_grads, self.overflow_group)
            self.loss_scaler.update(overflow)
            if overflow:
                self._clear_master_grads()
                return StepResult(True, float("nan"), scale)
        if scale != 1.0:
            for g in master_grads:
                if g is not None:
                    g.mul_(1.0 / scale)
        norm = global_grad_norm(((piece.master.grad, piece.counted) for piece in self.pieces), self.ps,
                                dp_sharded=self.dp_sharded)
        if self.clip_grad > 0:
            scale_grads_by_norm(master_grads, norm, self.clip_grad)
        self.optimizer.step()
        self._clear_master_grads()
        self._copy_masters_to_model()
        return StepResult(False, norm, scale)

    def _clear_master_grads(self) -> None:
        for piece in self.pieces:
            piece.master.grad = None

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(),
                "masters": [piece.master.detach().clone() for piece in self.pieces],
                "loss_scaler": self.loss_scaler.state_dict() if self.loss_scaler is not None else None}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        if len(state["masters"]) != len(self.pieces):
            raise ValueError(f"optimizer state has {len(state['masters'])} master tensors, this rank has "
                             f"{len(self.pieces)}; it was saved with another layout (resharding needed)")
        for piece, saved in zip(self.pieces, state["masters"], strict=True):
            piece.master.copy_(saved)
        self.optimizer.load_state_dict(state["optimizer"])
        if self.loss_scaler is not None and state.get("loss_scaler") is not None:
            self.loss_scaler.load_state_dict(state["loss_scaler"])
        self._copy_masters_to_model()


class MixedPrecisionOptimizer(MasterParamOptimizer):
    """fp32 masters for (bf16/fp16/fp32) model params, no sharding. Use DistributedOptimizer for ZeRO-1.

    Args:
        params: parameters or torch-style param groups (dicts with "params" and per-group options).
        optimizer_cls: any torch optimizer class; built over the fp32 masters with ``**optim_kwargs``.
        ps: the layout (grad norm reductions over TP x PP).
        loss_scaler: a Static/DynamicLossScaler (fp16), or None.
        clip_grad: max global grad norm (0 = no clipping; the norm is still returned).
        overflow_group: group over which overflow flags are agreed (default: the whole world).
    """

    def __init__(self, params, optimizer_cls: type[torch.optim.Optimizer], ps: ParallelState, *, loss_scaler=None,
                 clip_grad: float = 0.0, overflow_group=None, **optim_kwargs):
        super().__init__(ps, loss_scaler=loss_scaler, clip_grad=clip_grad, overflow_group=overflow_group)
        params = list(params)
        flat = [p for g in params for p in g["params"]] if params and isinstance(params[0], dict) else params
        self.pieces = [MasterPiece(p, p.detach().float().clone(), 0, p.numel(), counts_toward_norm(p, ps))
                       for p in flat]
        pieces_of = {id(piece.param): [piece] for piece in self.pieces}
        self.optimizer = optimizer_cls(self._build_groups(params, pieces_of), **optim_kwargs)

    def _grad_source(self, piece: MasterPiece) -> torch.Tensor | None:
        return piece.param.grad

    def _copy_masters_to_model(self) -> None:
        for piece in self.pieces:
            piece.param.data.copy_(piece.master)

    def zero_grad(self, set_to_none: bool = True) -> None:  # noqa: ARG002 - grads may be DDP buffer views
        """Zero model grads in place (they may be views into a DataParallel buffer)."""
        for piece in self.pieces:
            if piece.param.grad is not None:
                piece.param.grad.zero_()

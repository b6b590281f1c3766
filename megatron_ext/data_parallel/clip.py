"""One global gradient norm over TP x PP x DP, counting every replicated gradient exactly once.

Who counts what (so the result equals the norm of the single-process model's gradients):

* TP: a parameter with ``tp_partition_dim`` None (or no such attribute) is replicated over the TP group
  and counts on tp_rank 0 only; a partitioned one counts on every TP rank (each holds a slice).
* PP: a parameter tagged ``shared_embedding=True`` (the tied embedding held by the first and the last
  stage) counts on the first stage only; every other parameter lives on one stage.
* DP: after the gradient sync all DP replicas hold equal grads, so the sum is reduced over the model
  parallel group (TP x PP) only. Under ZeRO each DP rank holds a disjoint shard of the grads
  (``dp_sharded=True``): then the sum is reduced over DP as well.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.distributed as dist

from megatron_ext.topology import ParallelState

_EPS = 1e-6  # as torch.nn.utils.clip_grad_norm_


def counts_toward_norm(param: torch.Tensor, ps: ParallelState) -> bool:
    """Whether this rank's copy of ``param`` is the one that contributes to the global grad norm."""
    if getattr(param, "tp_partition_dim", None) is None and ps.tp_rank != 0:
        return False
    if getattr(param, "shared_embedding", False) and not ps.is_first_stage:
        return False
    return True


def _default_device() -> torch.device:
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def global_grad_norm(grads: Iterable[tuple[torch.Tensor, bool]], ps: ParallelState, *, norm_type: float = 2.0,
                     dp_sharded: bool = False) -> float:
    """Norm of all ``(grad, counted)`` pairs over the whole layout; uncounted grads are skipped locally.

    Every rank of the relevant groups must call this (it issues collectives when those groups have
    more than one rank).
    """
    grads = [g for g, counted in grads if counted and g is not None]
    device = grads[0].device if grads else _default_device()
    inf_norm = math.isinf(norm_type)
    if inf_norm:
        local = max((g.detach().abs().max().float() for g in grads if g.numel()), default=None)
        total = local.reshape(1) if local is not None else torch.zeros(1, device=device)
        op = dist.ReduceOp.MAX
    else:
        total = torch.zeros(1, dtype=torch.float32, device=device)
        for g in grads:
            total += torch.linalg.vector_norm(g.detach().float(), norm_type) ** norm_type
        op = dist.ReduceOp.SUM
    if ps.mp_size > 1:
        dist.all_reduce(total, op=op, group=ps.mp_group)
    if dp_sharded and ps.dp_size > 1:
        dist.all_reduce(total, op=op, group=ps.dp_group)
    value = total.item()
    return value if inf_norm else value ** (1.0 / norm_type)


@torch.no_grad()
def scale_grads_by_norm(grads: Iterable[torch.Tensor], total_norm: float, max_norm: float) -> bool:
    """Multiply grads by max_norm / (total_norm + eps) when that is < 1 (torch's rule). True if scaled."""
    coef = max_norm / (total_norm + _EPS)
    if not coef < 1.0:  # also False for a nan norm: leave the grads alone, the caller decides
        return False
    for g in grads:
        if g is not None:
            g.mul_(coef)
    return True


def clip_grad_norm(params: Iterable[torch.Tensor], max_norm: float, ps: ParallelState, *,
                   norm_type: float = 2.0, dp_sharded: bool = False) -> float:
    """Global grad norm of ``params`` (see module docstring); grads are scaled in place if above max_norm.

    Call after the DP gradient sync. ``max_norm <= 0`` only measures. Returns the total norm (float).
    """
    params = [p for p in params if p.grad is not None]
    total = global_grad_norm(((p.grad, counts_toward_norm(p, ps)) for p in params), ps,
                             norm_type=norm_type, dp_sharded=dp_sharded)
    if max_norm > 0:
        scale_grads_by_norm([p.grad for p in params], total, max_norm)
    return total

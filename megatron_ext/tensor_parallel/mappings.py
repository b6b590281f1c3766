"""Autograd-aware collectives over the tensor-parallel group.

Each mapping is a pair (forward collective, backward collective) that are adjoint to each other, so
gradients through a TP region equal the single-process gradients. At tp_size 1 every mapping is the
identity and torch.distributed is never touched.

Layout conventions:
  * TP regions split the LAST dim (hidden / features): [..., H] <-> [..., H/tp].
  * Sequence-parallel regions split the SEQUENCE dim, which by default is dim 0 ([T, B, H], sequence
    first, as Megatron). Every sequence-parallel function takes ``dim`` so a [B, T, H] model can pass
    ``dim=1``. Rank r holds sequence positions [r*T/tp, (r+1)*T/tp).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_ext.topology import ParallelState

_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


# ---------------------------------------------------------------------- raw collectives (no autograd)
def _all_reduce(x: torch.Tensor, ps: ParallelState) -> torch.Tensor:
    if ps.tp_size == 1:
        return x
    x = x.contiguous().clone()  # never mutate a tensor autograd may have saved
    dist.all_reduce(x, group=ps.tp_group)
    return x


def _split(x: torch.Tensor, ps: ParallelState, dim: int) -> torch.Tensor:
    if ps.tp_size == 1:
        return x
    size = x.shape[dim]
    assert size % ps.tp_size == 0, f"dim {dim} of size {size} not divisible by tp {ps.tp_size}"
    return x.chunk(ps.tp_size, dim=dim)[ps.tp_rank].contiguous()


def _all_gather(x: torch.Tensor, ps: ParallelState, dim: int) -> torch.Tensor:
    if ps.tp_size == 1:
        return x
    x = x.movedim(dim, 0).contiguous()
    out = x.new_empty((ps.tp_size * x.shape[0], *x.shape[1:]))
    _all_gather_single(out, x, group=ps.tp_group)
    return out.movedim(0, dim)


def _reduce_scatter(x: torch.Tensor, ps: ParallelState, dim: int) -> torch.Tensor:
    if ps.tp_size == 1:
        return x
    x = x.movedim(dim, 0).contiguous()
    assert x.shape[0] % ps.tp_size == 0, f"dim {dim} of size {x.shape[0]} not divisible by tp {ps.tp_size}"
    out = x.new_empty((x.shape[0] // ps.tp_size, *x.shape[1:]))
    _reduce_scatter_single(out, x, group=ps.tp_group)
    return out.movedim(0, dim)


# ---------------------------------------------------------------------- autograd functions
class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, ps):
        ctx.ps = ps
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return _all_reduce(g, ctx.ps), None


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, ps):
        return _all_reduce(x, ps)

    @staticmethod
    def backward(ctx, g):
        return g, None


class _ScatterToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, ps):
        ctx.ps = ps
        return _split(x, ps, -1)

    @staticmethod
    def backward(ctx, g):
        return _all_gather(g, ctx.ps, -1), None


class _GatherFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, ps):
        ctx.ps = ps
        return _all_gather(x, ps, -1)

    @staticmethod
    def backward(ctx, g):
        return _split(g, ctx.ps, -1), None


class _ScatterToSP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, ps, dim):
        ctx.ps, ctx.dim = ps, dim
        return _split(x, ps, dim)

    @staticmethod
    def backward(ctx, g):
        return _all_gather(g, ctx.ps, ctx.dim), None, None


class _GatherFromSP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, ps, dim, reduce_grad):
        ctx.ps, ctx.dim, ctx.reduce_grad = ps, dim, reduce_grad
        return _all_gather(x, ps, dim)

    @staticmethod
    def backward(ctx, g):
        if ctx.reduce_grad:
            return _reduce_scatter(g, ctx.ps, ctx.dim), None, None, None
        return _split(g, ctx.ps, ctx.dim), None, None, None


class _ReduceScatterToSP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, ps, dim):
        ctx.ps, ctx.dim = ps, dim
        return _reduce_scatter(x, ps, dim)

    @staticmethod
    def backward(ctx, g):
        return _all_gather(g, ctx.ps, ctx.dim), None, None


# ---------------------------------------------------------------------- public API
def copy_to_tensor_parallel_region(x: torch.Tensor, ps: ParallelState) -> torch.Tensor:
    """Identity forward; all-reduce of the gradient (entry of a column-parallel region)."""
    return x if ps.tp_size == 1 else _CopyToTP.apply(x, ps)


def reduce_from_tensor_parallel_region(x: torch.Tensor, ps: ParallelState) -> torch.Tensor:
    """All-reduce (sum) forward; identity backward (exit of a row-parallel region)."""
    return x if ps.tp_size == 1 else _ReduceFromTP.apply(x, ps)


def scatter_to_tensor_parallel_region(x: torch.Tensor, ps: ParallelState) -> torch.Tensor:
    """Keep this rank's chunk of the last dim; backward all-gathers it. [..., H] -> [..., H/tp]."""
    return x if ps.tp_size == 1 else _ScatterToTP.apply(x, ps)


def gather_from_tensor_parallel_region(x: torch.Tensor, ps: ParallelState) -> torch.Tensor:
    """All-gather along the last dim; backward keeps this rank's chunk. [..., H/tp] -> [..., H]."""
    return x if ps.tp_size == 1 else _GatherFromTP.apply(x, ps)


def scatter_to_sequence_parallel_region(x: torch.Tensor, ps: ParallelState, dim: int = 0) -> torch.Tensor:
    """Keep this rank's sequence chunk ([T, B, H] -> [T/tp, B, H] for dim 0); backward all-gathers."""
    return x if ps.tp_size == 1 else _ScatterToSP.apply(x, ps, dim)


def gather_from_sequence_parallel_region(
    x: torch.Tensor, ps: ParallelState, dim: int = 0, reduce_grad: bool = True
) -> torch.Tensor:
    """All-gather the sequence shards ([T/tp, B, H] -> [T, B, H] for dim 0).

    Backward reduce-scatters (``reduce_grad=True``): the gathered tensor feeds TP-sharded compute
    (a column-parallel matmul), so each rank's gradient is a partial sum. Pass ``reduce_grad=False``
    when the gathered tensor is used identically on every rank; backward then just splits.
    """
    return x if ps.tp_size == 1 else _GatherFromSP.apply(x, ps, dim, reduce_grad)


def reduce_scatter_to_sequence_parallel_region(
    x: torch.Tensor, ps: ParallelState, dim: int = 0
) -> torch.Tensor:
    """Sum partial results over TP and keep this rank's sequence chunk; backward all-gathers."""
    return x if ps.tp_size == 1 else _ReduceScatterToSP.apply(x, ps, dim)

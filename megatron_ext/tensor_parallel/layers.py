"""Tensor-parallel Column / Row linears and the vocab-parallel embedding.

Initialisation contract: each layer builds the FULL master weight on CPU in float32, fills it with
``init_method`` (torch's default RNG), then keeps its TP slice. All ranks therefore consume the RNG
identically and any TP layout starts from exactly the weights of a single process. Biases start at 0.
Every parameter carries ``tp_partition_dim`` (0, 1, or None when replicated over TP); replicated
parameters whose gradient only covers this rank's sequence shard also carry ``sequence_parallel=True``
(their grads must be all-reduced over TP, see ``sync_sequence_parallel_grads``).

Sequence parallelism: activations outside the TP region are sharded along ``sequence_dim`` (default 0,
i.e. [T, B, H] with sequence first as Megatron; pass 1 for [B, T, H]).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from megatron_ext.tensor_parallel.mappings import (
    _all_gather,
    _reduce_scatter,
    copy_to_tensor_parallel_region,
    gather_from_tensor_parallel_region,
    reduce_from_tensor_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
    scatter_to_tensor_parallel_region,
)
from megatron_ext.topology import ParallelState

InitMethod = Callable[[torch.Tensor], object]


def default_init_method(weight: torch.Tensor) -> None:
    """Normal(0, 0.02) in place, using torch's default RNG."""
    with torch.no_grad():
        nn.init.normal_(weight, mean=0.0, std=0.02)


def _check_divisible(what: str, size: int, tp: int) -> None:
    if size % tp != 0:
        raise ValueError(
            f"{what}={size} is not divisible by the tensor-parallel size {tp}; "
            f"choose sizes that are multiples of {tp} or a smaller tp"
        )


def _sharded_param(
    full_shape: tuple[int, int], dim: int, ps: ParallelState, init_method: InitMethod | None,
    dtype: torch.dtype | None, device: torch.device | str | None,
) -> nn.Parameter:
    master = torch.empty(full_shape, dtype=torch.float32)
    (init_method or default_init_method)(master)
    local = master.chunk(ps.tp_size, dim=dim)[ps.tp_rank] if ps.tp_size > 1 else master
    p = nn.Parameter(local.to(device=device, dtype=dtype or torch.float32).contiguous())
    p.tp_partition_dim = dim
    return p


def _zero_bias(n: int, dim: int | None, dtype, device) -> nn.Parameter:
    p = nn.Parameter(torch.zeros(n, dtype=dtype or torch.float32, device=device))
    p.tp_partition_dim = dim
    return p


class _SequenceParallelColumnLinear(torch.autograd.Function):
    """all_gather(x along the sequence) @ W^T + b, saving only this rank's sequence shard of x.

    Why: autograd through gather-then-linear keeps the gathered [T, ..] input, tp times the shard that
    sequence parallelism exists to keep. As Megatron does, backward gathers the shard again (overlapped
    with the input-gradient matmul) for the weight gradient, and reduce-scatters the input gradient
    (each rank's is a partial sum over its output columns)."""

    @staticmethod
    def forward(ctx, x, weight, bias, ps, dim):
        ctx.save_for_backward(x, weight)
        ctx.ps, ctx.dim, ctx.has_bias = ps, dim, bias is not None
        return F.linear(_all_gather(x, ps, dim), weight, bias)  # [..., out/tp] over the full sequence

    @staticmethod
    def backward(ctx, gy):
        x, weight = ctx.saved_tensors
        ps, dim = ctx.ps, ctx.dim
        shard = x.movedim(dim, 0).contiguous()
        full = shard.new_empty((ps.tp_size * shard.shape[0], *shard.shape[1:]))
        work = dist.all_gather_into_tensor(full, shard, group=ps.tp_group, async_op=True)
        gx = _reduce_scatter(gy.matmul(weight), ps, dim) if ctx.needs_input_grad[0] else None
        work.wait()
        full = full.movedim(0, dim)
        gy2 = gy.reshape(-1, gy.shape[-1])
        gw = gy2.t().matmul(full.reshape(-1, full.shape[-1])) if ctx.needs_input_grad[1] else None
        gb = gy2.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return gx, gw, gb, None, None


class ColumnParallelLinear(nn.Module):
    """Y = X A^T + b with A split along its output rows: weight [out/tp, in], bias [out/tp].

    Input [..., in] replicated over TP (or, with ``sequence_parallel``, sharded along the sequence
    dim and all-gathered here). Output [..., out/tp], or [..., out] with ``gather_output``.
    """

    def __init__(self, in_features: int, out_features: int, ps: ParallelState, *, bias: bool = True,
                 gather_output: bool = False, init_method: InitMethod | None = None,
                 sequence_parallel: bool = False, sequence_dim: int = 0,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None):
        super().__init__()
        _check_divisible("ColumnParallelLinear out_features", out_features, ps.tp_size)
        if sequence_parallel and gather_output:
            raise ValueError("ColumnParallelLinear: gather_output=True cannot be combined with "
                             "sequence_parallel=True; gather the output yourself or disable one")
        self.in_features, self.out_features, self.ps = in_features, out_features, ps
        self.gather_output, self.sequence_parallel = gather_output, sequence_parallel
        self.sequence_dim = sequence_dim
        self.weight = _sharded_param((out_features, in_features), 0, ps, init_method, dtype, device)
        self.bias = _zero_bias(out_features // ps.tp_size, 0, dtype, device) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.sequence_parallel and self.ps.tp_size > 1:
            # [T/tp, ..] -> gathered [T, ..] @ W^T; keeps only the shard for backward (see the Function)
            y = _SequenceParallelColumnLinear.apply(x, self.weight, self.bias, self.ps, self.sequence_dim)
            return y
        x = copy_to_tensor_parallel_region(x, self.ps)
        y = F.linear(x, self.weight, self.bias)  # [..., out/tp]
        return gather_from_tensor_parallel_region(y, self.ps) if self.gather_output else y

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features} (local {self.weight.shape[0]}), "
                f"tp={self.ps.tp_size}, sp={self.sequence_parallel}")


class RowParallelLinear(nn.Module):
    """Y = X A^T + b with A split along its input columns: weight [out, in/tp], bias [out] replicated.

    Input [..., in/tp] (``input_is_parallel``) or [..., in] (scattered here). The partial products are
    all-reduced, or with ``sequence_parallel`` reduce-scattered along the sequence dim. The bias is
    added after the reduction (once, not tp times).
    """

    def __init__(self, in_features: int, out_features: int, ps: ParallelState, *, bias: bool = True,
                 input_is_parallel: bool = True, init_method: InitMethod | None = None,
                 sequence_parallel: bool = False, sequence_dim: int = 0,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None):
        super().__init__()
        _check_divisible("RowParallelLinear in_features", in_features, ps.tp_size)
        if sequence_parallel and not input_is_parallel:
            raise ValueError("RowParallelLinear: sequence_parallel=True requires input_is_parallel=True")
        self.in_features, self.out_features, self.ps = in_features, out_features, ps
        self.input_is_parallel, self.sequence_parallel, self.sequence_dim = (
            input_is_parallel, sequence_parallel, sequence_dim)
        self.weight = _sharded_param((out_features, in_features), 1, ps, init_method, dtype, device)
        self.bias = _zero_bias(out_features, None, dtype, device) if bias else None
        if self.bias is not None and sequence_parallel:
            self.bias.sequence_parallel = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.input_is_parallel:
            x = scatter_to_tensor_parallel_region(x, self.ps)  # [..., in] -> [..., in/tp]
        y = F.linear(x, self.weight)  # partial sums [..., out]
        if self.sequence_parallel:
            y = reduce_scatter_to_sequence_parallel_region(y, self.ps, self.sequence_dim)  # [T/tp, ...]
        else:
            y = reduce_from_tensor_parallel_region(y, self.ps)
        return y + self.bias if self.bias is not None else y

    def extra_repr(self) -> str:
        return (f"in={self.in_features} (local {self.weight.shape[1]}), out={self.out_features}, "
                f"tp={self.ps.tp_size}, sp={self.sequence_parallel}")


class VocabParallelEmbedding(nn.Module):
    """Embedding with the vocab split over TP: weight [V/tp, D]; rank r owns ids [r*V/tp, (r+1)*V/tp).

    Each rank looks up the ids it owns (zeros elsewhere) and the results are summed over TP. With
    ``sequence_parallel`` the sum is a reduce-scatter, leaving this rank's sequence shard.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, ps: ParallelState, *,
                 init_method: InitMethod | None = None, sequence_parallel: bool = False,
                 sequence_dim: int = 0, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None):
        super().__init__()
        _check_divisible("VocabParallelEmbedding num_embeddings (padded vocab)", num_embeddings, ps.tp_size)
        self.num_embeddings, self.embedding_dim, self.ps = num_embeddings, embedding_dim, ps
        self.sequence_parallel, self.sequence_dim = sequence_parallel, sequence_dim
        per = num_embeddings // ps.tp_size
        self.vocab_start, self.vocab_end = ps.tp_rank * per, (ps.tp_rank + 1) * per
        self.weight = _sharded_param((num_embeddings, embedding_dim), 0, ps, init_method, dtype, device)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.ps.tp_size == 1:
            out = F.embedding(ids, self.weight)
        else:
            outside = (ids < self.vocab_start) | (ids >= self.vocab_end)
            local = (ids - self.vocab_start).masked_fill(outside, 0)
            out = F.embedding(local, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        if self.sequence_parallel:
            return reduce_scatter_to_sequence_parallel_region(out, self.ps, self.sequence_dim)
        return reduce_from_tensor_parallel_region(out, self.ps)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, local=[{self.vocab_start}, {self.vocab_end})"


def sync_sequence_parallel_grads(module: nn.Module, ps: ParallelState) -> None:
    """All-reduce over TP the grads of params marked ``sequence_parallel`` (norms, row biases).

    With sequence parallelism such a replicated parameter only sees this rank's tokens, so its true
    gradient is the sum over the TP group. Call after backward, before clipping / the optimizer step.
    """
    if ps.tp_size == 1:
        return
    grads = [p.grad for p in module.parameters()
             if getattr(p, "sequence_parallel", False) and p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, group=ps.tp_group)
    offset = 0
    for g in grads:
        g.copy_(flat[offset: offset + g.numel()].view_as(g))
        offset += g.numel()

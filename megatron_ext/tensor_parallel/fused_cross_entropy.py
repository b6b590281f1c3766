"""Output layer + vocab-parallel cross entropy in token chunks, never materialising all logits.

For N tokens and a vocab shard of V/tp rows the unfused head holds logits [N, V/tp] and their gradient
(for Pythia at 8 x 512 tokens that is 0.8 GB each); here only one chunk [c, V/tp] lives at a time.
Per chunk: z = h_c @ W_local^T (fp32 statistics), padded columns (global id >= real_vocab_size) -> -inf,
max and (sum exp, target logit) all-reduced over TP exactly as `vocab_parallel_cross_entropy` does.

Two entry points, both exact for any upstream gradient:

* `vocab_parallel_linear_cross_entropy` returns the per-token loss [N]. Its upstream gradient may weigh
  every token differently, so forward keeps only the per-token logsumexp and backward recomputes each
  chunk's logits (one extra head matmul) to form (softmax - onehot) * grad[token].
* `vocab_parallel_linear_cross_entropy_sum` returns the scalar sum_t w_t * loss_t for given per-token
  weights w (a loss mask divided by its sum gives the masked mean). Its upstream gradient is a scalar, so
  forward computes d/dh and d/dW in the same pass over the logits and backward only scales them: no
  recompute, one pass of exp per logit. The training loss uses this one.

The input gradient of a column-parallel head is a partial sum over the vocab shards: both functions
all-reduce it over TP (as `copy_to_tensor_parallel_region` would) unless ``reduce_grad_input=False``
says the caller does it (a sequence-parallel gather whose backward reduce-scatters).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_ext.topology import ParallelState

DEFAULT_CHUNK_ELEMENTS = 1 << 24  # logits per chunk (64 MB in fp32): big matmuls, small temporaries


def _stat_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _chunk_logits(h: torch.Tensor, weight: torch.Tensor, start: int, real_vocab_size: int | None) -> torch.Tensor:
    """h [c, D] @ weight [Vl, D]^T -> [c, Vl] in the statistics dtype, padded vocab columns -inf."""
    z = (h @ weight.t()).to(_stat_dtype(h.dtype))  # [c, Vl]
    per = weight.shape[0]
    if real_vocab_size is not None and real_vocab_size < start + per:
        z[:, max(real_vocab_size - start, 0):] = float("-inf")
    return z


def _target_local(target: torch.Tensor, start: int, per: int) -> tuple[torch.Tensor, torch.Tensor]:
    inside = (target >= start) & (target < start + per)  # [c]
    return (target - start).masked_fill(~inside, 0), inside


def _chunk_forward(z: torch.Tensor, target: torch.Tensor, start: int, ps: ParallelState):
    """z [c, Vl] (overwritten with exp(z - max)) -> (loss [c], lse [c], sum_exp [c]); TP collectives."""
    m = z.max(dim=-1).values  # [c]
    if ps.tp_size > 1:
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=ps.tp_group)
    local_t, inside = _target_local(target, start, z.shape[-1])
    picked = z.gather(-1, local_t.unsqueeze(-1)).squeeze(-1).sub_(m).masked_fill_(~inside, 0.0)  # [c]
    z.sub_(m.unsqueeze(-1)).exp_()  # exp(-inf) = 0 for padded columns
    sum_exp = z.sum(dim=-1)
    if ps.tp_size > 1:
        both = torch.stack([picked, sum_exp])  # one all-reduce for both sums
        dist.all_reduce(both, group=ps.tp_group)
        picked, sum_exp = both[0], both[1]
    log_sum = sum_exp.log()
    return log_sum - picked, log_sum + m, sum_exp


def _softmax_minus_onehot_(p: torch.Tensor, target: torch.Tensor, start: int, scale: torch.Tensor) -> torch.Tensor:
    """p [c, Vl] (softmax shard, in place) -> (p - onehot(target)) * scale[:, None]."""
    local_t, inside = _target_local(target, start, p.shape[-1])
    p.scatter_add_(-1, local_t.unsqueeze(-1), -inside.to(p.dtype).unsqueeze(-1))
    return p.mul_(scale.to(p.dtype).unsqueeze(-1))


def _chunks(n: int, chunk_size: int):
    for i in range(0, n, chunk_size):
        yield slice(i, min(i + chunk_size, n))


def _accumulate(grad_w: torch.Tensor, g: torch.Tensor, h: torch.Tensor) -> None:
    """grad_w [Vl, D] += g [c, Vl]^T @ h [c, D], in place when the dtypes allow (no [Vl, D] temporary)."""
    if g.dtype == grad_w.dtype:
        grad_w.addmm_(g.t(), h)
    else:
        grad_w.add_(g.t() @ h)


def _all_reduce_grad_input(g: torch.Tensor, ps: ParallelState, reduce: bool) -> torch.Tensor:
    if reduce and ps.tp_size > 1:
        dist.all_reduce(g, group=ps.tp_group)
    return g


class _LinearCE(torch.autograd.Function):
    """Per-token loss; backward recomputes each chunk's logits."""

    @staticmethod
    def forward(ctx, hidden, weight, target, ps, real_vocab_size, chunk_size, reduce_grad_input):
        # hidden [N, D] (replicated over TP), weight [Vl, D] this rank's vocab rows, target [N] global ids
        start = ps.tp_rank * weight.shape[0]
        loss = hidden.new_empty(hidden.shape[0], dtype=_stat_dtype(hidden.dtype))  # [N]
        lse = torch.empty_like(loss)
        for s in _chunks(hidden.shape[0], chunk_size):
            z = _chunk_logits(hidden[s], weight, start, real_vocab_size)
            loss[s], lse[s], _ = _chunk_forward(z, target[s], start, ps)
        ctx.save_for_backward(hidden, weight, target, lse)
        ctx.ps, ctx.real_vocab_size, ctx.chunk_size, ctx.start = ps, real_vocab_size, chunk_size, start
        ctx.reduce_grad_input = reduce_grad_input
        return loss.to(hidden.dtype)

    @staticmethod
    def backward(ctx, grad_loss):
        hidden, weight, target, lse = ctx.saved_tensors
        grad_h = torch.empty_like(hidden)  # [N, D]
        grad_w = torch.zeros(weight.shape, dtype=_stat_dtype(weight.dtype), device=weight.device)  # [Vl, D]
        for s in _chunks(hidden.shape[0], ctx.chunk_size):
            p = _chunk_logits(hidden[s], weight, ctx.start, ctx.real_vocab_size)
            p.sub_(lse[s].unsqueeze(-1)).exp_()  # softmax shard [c, Vl]
            g = _softmax_minus_onehot_(p, target[s], ctx.start, grad_loss[s]).to(hidden.dtype)
            grad_h[s] = g @ weight
            _accumulate(grad_w, g, hidden[s])
        grad_h = _all_reduce_grad_input(grad_h, ctx.ps, ctx.reduce_grad_input)
        return grad_h, grad_w.to(weight.dtype), None, None, None, None, None


class _LinearCESum(torch.autograd.Function):
    """sum_t w_t * loss_t; gradients formed in forward, scaled by the scalar upstream grad in backward."""

    @staticmethod
    def forward(ctx, hidden, weight, target, token_weight, ps, real_vocab_size, chunk_size, reduce_grad_input,
                grad_enabled):
        start = ps.tp_rank * weight.shape[0]
        stat = _stat_dtype(hidden.dtype)
        # needs_input_grad is set even under no_grad: also ask the caller's grad mode (evaluation)
        need_h, need_w, need_tw = (grad_enabled and ctx.needs_input_grad[i] for i in (0, 1, 3))
        tw = token_weight.to(stat)  # [N]
        loss = hidden.new_empty(hidden.shape[0], dtype=stat)  # [N]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=stat, device=weight.device) if need_w else None
        for s in _chunks(hidden.shape[0], chunk_size):
            z = _chunk_logits(hidden[s], weight, start, real_vocab_size)
            loss[s], _, sum_exp = _chunk_forward(z, target[s], start, ps)  # z now holds exp(z - max)
            if need_h or need_w:  # (softmax - onehot) * w in one pass: exp * (w / sum_exp), onehot * -w
                local_t, inside = _target_local(target[s], start, z.shape[-1])
                z.mul_((tw[s] / sum_exp).unsqueeze(-1))
                z.scatter_add_(-1, local_t.unsqueeze(-1), -(inside.to(z.dtype) * tw[s]).unsqueeze(-1))
                g = z.to(hidden.dtype)
                if need_h:
                    grad_h[s] = g @ weight
                if need_w:
                    _accumulate(grad_w, g, hidden[s])
        if need_h:
            grad_h = _all_reduce_grad_input(grad_h, ps, reduce_grad_input)
        ctx.save_for_backward(grad_h, grad_w, loss if need_tw else None)
        ctx.dtypes = (hidden.dtype, weight.dtype, token_weight.dtype)
        return (loss * tw).sum()  # statistics dtype: fp32 for half inputs

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w, loss = ctx.saved_tensors
        dh, dw, dtw = ctx.dtypes
        g = grad_out.float() if grad_out.dtype in (torch.float16, torch.bfloat16) else grad_out
        out_h = None if grad_h is None else (grad_h * g.to(grad_h.dtype)).to(dh)
        out_w = None if grad_w is None else (grad_w * g.to(grad_w.dtype)).to(dw)
        out_tw = None if loss is None else (loss * g.to(loss.dtype)).to(dtw)
        return out_h, out_w, None, out_tw, None, None, None, None, None


def _check(hidden, weight_local, target, ps, real_vocab_size, chunk_size, name):
    if hidden.dim() != 2 or weight_local.dim() != 2 or hidden.shape[1] != weight_local.shape[1]:
        raise ValueError(f"{name}: hidden must be [N, D] and weight_local [V/tp, D], got "
                         f"{tuple(hidden.shape)} and {tuple(weight_local.shape)}; flatten the tokens first")
    if target.shape != hidden.shape[:1]:
        raise ValueError(f"{name}: target must be [N] = [{hidden.shape[0]}], got {tuple(target.shape)}")
    padded = weight_local.shape[0] * ps.tp_size
    if real_vocab_size is not None and not (0 < real_vocab_size <= padded):
        raise ValueError(f"{name}: real_vocab_size={real_vocab_size} must be in (0, padded vocab = {padded}]")
    if chunk_size is None:
        chunk_size = max(1, DEFAULT_CHUNK_ELEMENTS // weight_local.shape[0])
    if chunk_size < 1:
        raise ValueError(f"{name}: chunk_size must be >= 1 token, got {chunk_size}")
    return chunk_size


def vocab_parallel_linear_cross_entropy(
    hidden: torch.Tensor, weight_local: torch.Tensor, target: torch.Tensor, ps: ParallelState, *,
    real_vocab_size: int | None = None, chunk_size: int | None = None, reduce_grad_input: bool = True,
) -> torch.Tensor:
    """Per-token cross entropy [N] of the logits ``hidden @ weight_full^T`` without forming them.

    Args:
        hidden: [N, D] input of the output layer, the same on every TP rank.
        weight_local: [V/tp, D] this rank's contiguous vocab rows (rank r owns ids r*V/tp ...).
        target: [N] global token ids in [0, real_vocab_size).
        ps: the ParallelState; at tp_size 1 no collective is issued.
        real_vocab_size: columns with global id >= this (vocab padding) take no probability mass.
        chunk_size: tokens per chunk (default: about 16M logits per chunk); memory is O(chunk * V/tp).
        reduce_grad_input: all-reduce d/dhidden over TP (False if the caller's mapping sums it).

    Equals ``vocab_parallel_cross_entropy(hidden @ weight_local.T, target, ps, real_vocab_size)``
    in value and gradients, for any upstream gradient; backward recomputes the logits chunk by chunk.
    """
    chunk_size = _check(hidden, weight_local, target, ps, real_vocab_size, chunk_size,
                        "vocab_parallel_linear_cross_entropy")
    return _LinearCE.apply(hidden, weight_local, target, ps, real_vocab_size, chunk_size, reduce_grad_input)


def vocab_parallel_linear_cross_entropy_sum(
    hidden: torch.Tensor, weight_local: torch.Tensor, target: torch.Tensor, ps: ParallelState, *,
    token_weight: torch.Tensor | None = None, real_vocab_size: int | None = None, chunk_size: int | None = None,
    reduce_grad_input: bool = True,
) -> torch.Tensor:
    """Scalar ``sum_t token_weight[t] * loss[t]`` of the same per-token loss, in one pass over the logits.

    Arguments as `vocab_parallel_linear_cross_entropy`; token_weight [N] (default all ones), e.g. a loss
    mask divided by its sum for the masked mean. The result is fp32 for fp16/bf16 inputs. Gradients
    w.r.t. hidden and weight are computed in forward (when they are needed) and held until backward:
    [N, D] + [V/tp, D] instead of the logits.
    """
    chunk_size = _check(hidden, weight_local, target, ps, real_vocab_size, chunk_size,
                        "vocab_parallel_linear_cross_entropy_sum")
    if token_weight is None:
        token_weight = torch.ones(hidden.shape[0], dtype=_stat_dtype(hidden.dtype), device=hidden.device)
    elif token_weight.shape != target.shape:
        raise ValueError(f"vocab_parallel_linear_cross_entropy_sum: token_weight must be [N] like target, "
                         f"got {tuple(token_weight.shape)}")
    return _LinearCESum.apply(hidden, weight_local, target, token_weight, ps, real_vocab_size, chunk_size,
                              reduce_grad_input, torch.is_grad_enabled())


__all__ = ["vocab_parallel_linear_cross_entropy", "vocab_parallel_linear_cross_entropy_sum"]

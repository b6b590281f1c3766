"""Cross entropy over logits whose vocab dim is split across TP ranks, without gathering them.

Per token: loss = log(sum_v exp(z_v - m)) - (z_target - m), with m the global max (all-reduce MAX),
and the target logit and the exp-sum each summed over TP (one fused all-reduce). The gradient is
softmax - onehot(target), computed from the saved local softmax shard.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_ext.topology import ParallelState


class _VocabParallelCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, ps, real_vocab_size):
        # logits [..., V/tp] (this rank's vocab shard), target [...] global ids
        compute_dtype = torch.float32 if logits.dtype in (torch.float16, torch.bfloat16) else logits.dtype
        z = logits.to(compute_dtype)
        per = z.shape[-1]
        start = ps.tp_rank * per
        if real_vocab_size is not None and real_vocab_size < start + per:
            # padded vocab columns (global id >= real_vocab_size) take no probability mass
            col_ids = torch.arange(start, start + per, device=z.device)
            z = z.masked_fill(col_ids >= real_vocab_size, float("-inf"))

        m = z.max(dim=-1).values  # [...]
        if ps.tp_size > 1:
            dist.all_reduce(m, op=dist.ReduceOp.MAX, group=ps.tp_group)
        z = z - m.unsqueeze(-1)

        outside = (target < start) | (target >= start + per)
        local_t = (target - start).masked_fill(outside, 0)
        picked = z.gather(-1, local_t.unsqueeze(-1)).squeeze(-1).masked_fill(outside, 0.0)  # [...]
        exp_z = z.exp()  # exp(-inf) = 0 for masked columns
        sum_exp = exp_z.sum(dim=-1)
        if ps.tp_size > 1:
            both = torch.stack([picked, sum_exp])  # one all-reduce for both sums
            dist.all_reduce(both, group=ps.tp_group)
            picked, sum_exp = both[0], both[1]
        loss = sum_exp.log() - picked

        softmax = exp_z.div_(sum_exp.unsqueeze(-1))
        ctx.save_for_backward(softmax, local_t, outside)
        ctx.in_dtype = logits.dtype
        return loss.to(logits.dtype)

    @staticmethod
    def backward(ctx, grad_loss):
        softmax, local_t, outside = ctx.saved_tensors
        grad = softmax.clone()
        onehot = (~outside).to(grad.dtype).unsqueeze(-1)
        grad.scatter_add_(-1, local_t.unsqueeze(-1), -onehot)
        grad.mul_(grad_loss.to(grad.dtype).unsqueeze(-1))
        return grad.to(ctx.in_dtype), None, None, None


def vocab_parallel_cross_entropy(
    logits_local: torch.Tensor, target: torch.Tensor, ps: ParallelState, real_vocab_size: int | None = None
) -> torch.Tensor:
    """Per-token loss, shape of ``target``, for logits sharded along the vocab (last) dim.

    Args:
        logits_local: [..., V/tp], this TP rank's contiguous vocab shard (rank r owns ids r*V/tp ...).
        target: [...] global token ids in [0, real_vocab_size). Mask ignored tokens on the loss.
        ps: the ParallelState; at tp_size 1 no collective is issued.
        real_vocab_size: if given, columns with global id >= real_vocab_size (vocab padding) are
            treated as -inf, so the loss equals cross entropy over the real vocab only.
    """
    if real_vocab_size is not None and not (0 < real_vocab_size <= logits_local.shape[-1] * ps.tp_size):
        raise ValueError(
            f"real_vocab_size={real_vocab_size} must be in (0, padded vocab = "
            f"{logits_local.shape[-1] * ps.tp_size}]"
        )
    return _VocabParallelCE.apply(logits_local, target, ps, real_vocab_size)

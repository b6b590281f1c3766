"""The language-model losses both model families share: cross entropy over vocab-parallel logits, and the
fused head + cross entropy that never materialises the logits (what training uses).

Labels are already shifted (label t is the token after position t); labels < 0 (HF's -100) are ignored;
loss_mask [B, T] weights tokens; padded vocab columns take no probability mass, so the loss equals that
over the real vocab (a converted model gives transformers' loss)."""

from __future__ import annotations

import torch

from megatron_ext.tensor_parallel import (
    gather_from_sequence_parallel_region,
    vocab_parallel_cross_entropy,
    vocab_parallel_linear_cross_entropy_sum,
)
from megatron_ext.topology import ParallelState


def logits_loss(logits_local: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor | None,
                ps: ParallelState, real_vocab_size: int, reduction: str = "mean") -> torch.Tensor:
    """Cross entropy of logits [B, T, Vpad/tp] against labels [B, T]. reduction: "mean" (over weighted
    tokens) or "none" (per token, [B, T], unweighted)."""
    valid = labels >= 0
    per_token = vocab_parallel_cross_entropy(logits_local, labels.clamp(min=0), ps,
                                             real_vocab_size=real_vocab_size)  # [B, T]
    if reduction == "none":
        return per_token.masked_fill(~valid, 0.0)
    if reduction != "mean":
        raise ValueError(f"loss reduction must be 'mean' or 'none', got {reduction!r}")
    weight = valid.to(per_token.dtype)
    if loss_mask is not None:
        weight = weight * loss_mask.to(per_token.dtype)
    return (per_token * weight).sum() / weight.sum().clamp(min=torch.finfo(weight.dtype).tiny)


def fused_head_loss(h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor | None,
                    ps: ParallelState, real_vocab_size: int, *, sequence_parallel: bool,
                    seq_dim: int) -> torch.Tensor:
    """Normed hidden states [B, T(/tp), D] and the head's vocab shard [Vpad/tp, D] -> masked-mean loss
    (the same value as `logits_loss`), in token chunks; fp32 for 16-bit models."""
    if sequence_parallel:  # backward reduce-scatters, which sums the vocab shards' partial grads
        h = gather_from_sequence_parallel_region(h, ps, seq_dim)  # [B, T, D]
    if labels.shape != h.shape[:2]:
        raise ValueError(f"labels must be [B, T] = {list(h.shape[:2])}, got {list(labels.shape)}")
    stat = torch.float64 if h.dtype == torch.float64 else torch.float32
    valid = labels >= 0  # HF's -100 is ignored
    w = valid.to(stat) if loss_mask is None else valid.to(stat) * loss_mask.to(stat)  # [B, T]
    w = w / w.sum().clamp(min=torch.finfo(stat).tiny)
    return vocab_parallel_linear_cross_entropy_sum(
        h.reshape(-1, h.shape[-1]), weight, labels.clamp(min=0).reshape(-1), ps,
        token_weight=w.reshape(-1), real_vocab_size=real_vocab_size, reduce_grad_input=not sequence_parallel)

"""Causal self-attention: the op the model calls, plus a pure-torch reference for tests.

`causal_attention` is the single entry point so that fused kernels (csrc/) can plug in here later
without touching the model. Today it is torch's `scaled_dot_product_attention`.

Masks are boolean, True = "this query may attend to this key", broadcastable to [B, H, Tq, Tk].
An explicit mask is the *whole* mask (the caller folds causality in, see `build_attention_mask`);
without one, attention is causal with queries aligned to the END of the keys, so a query block
that continues a KV cache (Tq < Tk) sees every cached key.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def build_attention_mask(q_len: int, k_len: int, key_padding_mask: torch.Tensor | None = None,
                         device: torch.device | None = None) -> torch.Tensor:
    """Causal (bottom-right aligned) mask, optionally AND a key padding mask.

    key_padding_mask: [B, Tk], 1/True for real tokens (Hugging Face's `attention_mask`).
    Returns bool [B or 1, 1, Tq, Tk]. Each query may always attend to its own position, so a row of a
    padding query is never empty (an empty row would make softmax NaN; padded outputs are ignored).
    """
    offset = k_len - q_len
    q_pos = torch.arange(q_len, device=device)[:, None] + offset  # [Tq, 1]: absolute query position
    k_pos = torch.arange(k_len, device=device)[None, :]  # [1, Tk]
    causal = k_pos <= q_pos  # [Tq, Tk]
    if key_padding_mask is None:
        return causal[None, None]
    assert key_padding_mask.shape[-1] == k_len, (key_padding_mask.shape, k_len)
    mask = causal[None, None] & key_padding_mask.bool()[:, None, None, :]  # [B, 1, Tq, Tk]
    return mask | (k_pos == q_pos)[None, None]


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, dropout_p: float = 0.0,
                     attn_mask: torch.Tensor | None = None, training: bool = False) -> torch.Tensor:
    """Scaled dot-product attention, causal unless `attn_mask` says otherwise.

    q: [B, H, Tq, Dh], k/v: [B, H, Tk, Dh] -> [B, H, Tq, Dh]. Scale 1/sqrt(Dh).
    """
    p = dropout_p if training else 0.0
    tq, tk = q.shape[-2], k.shape[-2]
    if attn_mask is None and tq != tk:
        attn_mask = build_attention_mask(tq, tk, device=q.device)
    if attn_mask is None:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask.bool(), dropout_p=p)


def causal_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                               attn_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Explicit softmax(QK^T / sqrt(Dh)) V in at least float32 (no dropout). For tests."""
    tq, tk = q.shape[-2], k.shape[-2]
    if attn_mask is None:
        attn_mask = build_attention_mask(tq, tk, device=q.device)
    ct = torch.promote_types(q.dtype, torch.float32)
    scores = torch.matmul(q.to(ct), k.to(ct).transpose(-1, -2)) / math.sqrt(q.shape[-1])  # [B, H, Tq, Tk]
    scores = scores.masked_fill(~attn_mask.bool(), float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.matmul(probs, v.to(ct)).to(q.dtype)

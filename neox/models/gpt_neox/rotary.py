"""Rotary position embeddings (RoPE) on the first `rotary_dim` dims of each head, NeoX style.

NeoX (and HF GPTNeoX) use the "rotate half" pairing: dim j pairs with dim j + rotary_dim/2, not with
its neighbour as in GPT-J. The frequencies are recomputed per call in float32 (a few numbers), so a
model cast to bf16 keeps exact frequencies.
"""

from __future__ import annotations

import torch


def rotary_cos_sin(position_ids: torch.Tensor, rotary_dim: int, base: float,
                   dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """position_ids [B, T] -> cos, sin [B, T, rotary_dim] (in `dtype`)."""
    inv_freq = 1.0 / (base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32,
                                             device=position_ids.device) / rotary_dim))  # [rd/2]
    freqs = position_ids[..., None].float() * inv_freq  # [B, T, rd/2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [B, T, rd]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, T, Dh]; cos/sin [B, T, rd] with rd <= Dh. Dims past rd pass through unchanged."""
    rd = cos.shape[-1]
    cos, sin = cos[:, None], sin[:, None]  # [B, 1, T, rd]
    x_rot, x_pass = x[..., :rd], x[..., rd:]
    return torch.cat((x_rot * cos + _rotate_half(x_rot) * sin, x_pass), dim=-1)

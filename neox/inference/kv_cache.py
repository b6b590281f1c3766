"""A preallocated key/value cache for decoding GPT-NeoX one token (or one prompt) at a time.

Each layer owns two buffers [B, heads_local, max_len, head_dim], allocated once, so decoding never
re-allocates or concatenates. Under tensor parallelism a rank builds the cache from its own model
and so caches only its local heads (num_attention_heads / tp). Keys are stored after rotary, so a
cached key never needs re-rotating.

The model sees the cache through a two-member protocol (neox.models never imports this module):
`seq_len` (positions already cached) and `layer(i)` (a hook `(k_new, v_new) -> (k_all, v_all)` for
global layer index i).
"""

from __future__ import annotations

import torch
from torch import nn


class _LayerCache:
    """Keys and values of one layer; `__call__` appends the new block and returns the whole prefix."""

    def __init__(self, shape: tuple[int, int, int, int], dtype: torch.dtype, device: torch.device):
        self.k = torch.zeros(shape, dtype=dtype, device=device)  # [B, Hl, max_len, Dh]
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.length = 0

    def __call__(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v [B, Hl, T, Dh] (new positions) -> cached + new [B, Hl, length + T, Dh]."""
        end = self.length + k.shape[2]
        if end > self.k.shape[2]:
            raise ValueError(f"KV cache overflow: {end} positions > max_len {self.k.shape[2]}; "
                             f"build the cache with a larger max_len")
        assert k.shape[:2] == self.k.shape[:2] and k.shape[3] == self.k.shape[3], (k.shape, self.k.shape)
        self.k[:, :, self.length: end] = k
        self.v[:, :, self.length: end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]


class KVCache:
    """Per-layer preallocated caches for one batch of sequences of at most `max_len` positions."""

    def __init__(self, layer_ids, batch_size: int, num_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        shape = (batch_size, num_heads, max_len, head_dim)
        self.max_len = max_len
        self._layers = {int(i): _LayerCache(shape, dtype, torch.device(device)) for i in layer_ids}

    @classmethod
    def for_model(cls, model: nn.Module, batch_size: int, max_len: int) -> KVCache:
        """A cache shaped for `model` (a GPTNeoX, possibly one TP rank's or one stage's slice of it)."""
        layers = model.layers
        first = next(iter(layers.values()))
        attn = first.attention
        p = attn.query_key_value.weight
        return cls(layers.keys(), batch_size, attn.num_heads, max_len, attn.head_dim, p.dtype, p.device)

    @property
    def seq_len(self) -> int:
        """Positions already cached (every layer holds the same number between forward calls)."""
        return next(iter(self._layers.values())).length if self._layers else 0

    def layer(self, i: int) -> _LayerCache:
        return self._layers[i]

    def nbytes(self) -> int:
        return sum(c.k.nbytes + c.v.nbytes for c in self._layers.values())

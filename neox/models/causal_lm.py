"""CausalLM: a single-process model with a plain interface, logits over the real vocabulary.

This is what `neox.load()` hands to users and what generation / evaluation call: ids in, logits
[B, T, V] out, with the vocab padding columns already removed.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from megatron_ext.topology import ParallelState
from neox.config import ModelConfig
from neox.models.registry import build_model


class CausalLM(nn.Module):
    """Wraps a TP = PP = 1 model (`.model`, whose state dict uses the checkpoint names)."""

    def __init__(self, model: nn.Module, cfg: ModelConfig):
        super().__init__()
        self.model = model
        self.cfg = cfg

    @classmethod
    def from_config(cls, cfg: ModelConfig, *, init_seed: int = 1234) -> CausalLM:
        """A freshly initialised model (the same weights as any parallel layout with this seed)."""
        return cls(build_model(cfg, ParallelState.single(), init_seed=init_seed), cfg)

    @classmethod
    def from_state_dict(cls, cfg: ModelConfig, state_dict: Mapping[str, torch.Tensor]) -> CausalLM:
        """Build and load a full (checkpoint-named) state dict strictly."""
        lm = cls.from_config(cfg)
        lm.model.load_state_dict(dict(state_dict), strict=True)
        return lm

    @property
    def vocab_size(self) -> int:
        return self.cfg.vocab_size

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, kv_cache=None) -> torch.Tensor:
        """input_ids [B, T] -> logits [B, T, vocab_size]. kv_cache: see GPTNeoX.forward (decoding)."""
        kw = {} if kv_cache is None else {"kv_cache": kv_cache}
        logits = self.model(input_ids, position_ids=position_ids, attention_mask=attention_mask, **kw)
        return logits[..., : self.cfg.vocab_size]

    def loss(self, logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor | None = None):
        """Mean cross entropy of logits [B, T, V] against shifted labels [B, T] (< 0: ignored)."""
        return self.model.loss(logits, labels, loss_mask)

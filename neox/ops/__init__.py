"""ops: the Python face of csrc/ kernels. Models call these; the implementation behind them may change."""

from .attention import build_attention_mask, causal_attention, causal_attention_reference
from .wkv import wkv
from .wkv_reference import wkv_reference

__all__ = ["build_attention_mask", "causal_attention", "causal_attention_reference", "wkv", "wkv_reference"]

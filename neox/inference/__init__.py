"""inference: batched generation with a KV cache (GPT-NeoX), sampling, and TP-sharded loading."""

from .generate import GenerationResult, generate, generate_batch
from .kv_cache import KVCache
from .sampling import SamplingParams, filter_logits, sample_next

__all__ = ["GenerationResult", "KVCache", "SamplingParams", "filter_logits", "generate", "generate_batch",
           "sample_next"]

"""GPT-NeoX: the model and its building blocks."""

from .model import GPTNeoX, SelfAttention, TransformerLayer, check_model_config, partition_dim

__all__ = ["GPTNeoX", "SelfAttention", "TransformerLayer", "check_model_config", "partition_dim"]

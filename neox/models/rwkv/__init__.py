"""RWKV-4: parallel ("transformer") and RNN modes on the same weights, tensor/sequence/pipeline parallel."""

from .model import RWKV, STATE_FIELDS, partition_dim

__all__ = ["RWKV", "STATE_FIELDS", "partition_dim"]

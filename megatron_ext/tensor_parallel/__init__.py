"""Tensor (and sequence) parallelism: layers, autograd collectives, vocab-parallel loss, RNG."""

from megatron_ext.tensor_parallel.cross_entropy import vocab_parallel_cross_entropy
from megatron_ext.tensor_parallel.fused_cross_entropy import (
    vocab_parallel_linear_cross_entropy,
    vocab_parallel_linear_cross_entropy_sum,
)
from megatron_ext.tensor_parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    default_init_method,
    sync_sequence_parallel_grads,
)
from megatron_ext.tensor_parallel.mappings import (
    copy_to_tensor_parallel_region,
    gather_from_sequence_parallel_region,
    gather_from_tensor_parallel_region,
    reduce_from_tensor_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
    scatter_to_sequence_parallel_region,
    scatter_to_tensor_parallel_region,
)
from megatron_ext.tensor_parallel.random import MODEL_PARALLEL_RNG, RNGStatesTracker, seed_all

__all__ = [
    "ColumnParallelLinear",
    "RowParallelLinear",
    "VocabParallelEmbedding",
    "vocab_parallel_cross_entropy",
    "vocab_parallel_linear_cross_entropy",
    "vocab_parallel_linear_cross_entropy_sum",
    "default_init_method",
    "RNGStatesTracker",
    "seed_all",
    "MODEL_PARALLEL_RNG",
    "sync_sequence_parallel_grads",
    "copy_to_tensor_parallel_region",
    "reduce_from_tensor_parallel_region",
    "scatter_to_tensor_parallel_region",
    "gather_from_tensor_parallel_region",
    "scatter_to_sequence_parallel_region",
    "gather_from_sequence_parallel_region",
    "reduce_scatter_to_sequence_parallel_region",
]

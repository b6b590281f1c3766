"""Data parallelism: bucketed grad reduction, ZeRO-1 optimizer, global grad clipping, mixed precision.

ZeRO-2/3 through PyTorch FSDP2 live in ``megatron_ext.data_parallel.fsdp`` (imported on demand).
"""

from megatron_ext.data_parallel.clip import clip_grad_norm, counts_toward_norm, global_grad_norm
from megatron_ext.data_parallel.ddp import DEFAULT_BUCKET_SIZE, DataParallel
from megatron_ext.data_parallel.grad_buffer import Bucket, GradBuffer
from megatron_ext.data_parallel.optimizer import DistributedOptimizer
from megatron_ext.data_parallel.precision import (
    DynamicLossScaler,
    MixedPrecisionOptimizer,
    StaticLossScaler,
    StepResult,
    found_inf,
    make_loss_scaler,
)

__all__ = [
    "DataParallel",
    "DEFAULT_BUCKET_SIZE",
    "GradBuffer",
    "Bucket",
    "DistributedOptimizer",
    "MixedPrecisionOptimizer",
    "DynamicLossScaler",
    "StaticLossScaler",
    "StepResult",
    "make_loss_scaler",
    "found_inf",
    "clip_grad_norm",
    "global_grad_norm",
    "counts_toward_norm",
]

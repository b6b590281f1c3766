"""Measure what autograd keeps for backward: the independent reference for the planner's activation
memory models (tests/unit/test_plan_*.py, tests/distributed/test_plan_*_tp.py) and the layers' savings.

Each storage counts once (views share it) and parameters do not count: what remains is activations. The
`cpu_*` probes read, from plain torch ops on this CPU, the sizes that differ between CPU and CUDA (norm
statistics, dropout masks, the SDPA kernel), so the tests can pass them to the planner's formulas."""

from __future__ import annotations

import torch
import torch.nn.functional as F

DTYPES = {torch.float32: 4, torch.bfloat16: 2}


def saved_bytes(module: torch.nn.Module, fn):
    """(bytes autograd saves while running fn(), fn's result): unique storages, parameters excluded."""
    params = {p.untyped_storage().data_ptr() for p in module.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in params:
            seen.setdefault(ptr, storage.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(seen.values()), out


def saved_tensors(fn, x: torch.Tensor) -> list[torch.Tensor]:
    """Every tensor autograd saves while running fn(x), in order."""
    out: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: out.append(t) or t, lambda t: t):
        fn(x)
    return out


def cpu_norm_stat_bytes(dtype: torch.dtype) -> int:
    """Element size of the per-token mean/rstd a plain torch LayerNorm saves on this CPU."""
    x = torch.randn(2, 3, 8, dtype=dtype, requires_grad=True)
    stats = [t for t in saved_tensors(torch.nn.LayerNorm(8).to(dtype), x) if t.shape == (2, 3, 1)]
    assert len(stats) == 2
    return stats[0].element_size()


def cpu_dropout_mask_bytes(dtype: torch.dtype) -> int:
    """Bytes per element of what a plain torch dropout saves on this CPU (the mask or scaled noise)."""
    x = torch.randn(4, 8, dtype=dtype, requires_grad=True)
    saved = saved_tensors(lambda t: F.dropout(t, 0.5, training=True), x)
    return sum(t.untyped_storage().nbytes() for t in saved if t.untyped_storage().data_ptr() != x.data_ptr()) // 32


def cpu_attention_kernel(dtype: torch.dtype, dropout_p: float) -> str:
    """The SDPA kernel a plain causal call runs on this CPU, named as the planner names them."""
    q = torch.randn(1, 2, 8, 16, dtype=dtype, requires_grad=True)
    name = type(F.scaled_dot_product_attention(q, q, q, dropout_p=dropout_p, is_causal=True).grad_fn).__name__
    return "flash" if "Flash" in name else "efficient" if "Efficient" in name else "math"


def cpu_attention_mask_bytes(dtype: torch.dtype) -> int:
    """The math kernel drops its probabilities in fp32 for 16-bit inputs (torch upcasts): that mask's size."""
    return cpu_dropout_mask_bytes(torch.promote_types(dtype, torch.float32))

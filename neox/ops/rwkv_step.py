"""The RWKV-4 one-token step as one C++ call (float32, CPU): `make_stepper(...)` or None.

RWKVStepper (neox/inference/rnn.py) uses it by default: at batch 1 the Python step is mostly op
dispatch and thread fork/joins, the C++ step is mostly weight bandwidth. It packs the weights into a
huge-page arena laid out for streaming gemvs (csrc/rwkv_step/packed_gemv.h) and runs every gemv on a
small thread pool whose caller never waits for a descheduled worker (step_pool.h), so CPU contention
costs at most the lost core, not a scheduler slice per barrier. The packed copy costs one more copy of
the weights in memory (the embedding excepted).

`NEOX_RWKV_STEP_IMPL`: unset / `auto` (the C++ step; if it cannot build, warn once and use the torch
step), `cpp` (a failed build raises), `torch` (always the torch step). `NEOX_RWKV_STEP_THREADS` caps the
pool (default: torch.get_num_threads()); `NEOX_RWKV_STEP_ISA` (avx512, avx2, generic) forces a gemv
kernel (default: the best this CPU runs). `NEOX_RWKV_STEP_EXACT_BF16=0` keeps every matrix in float32
(default: a matrix whose float32 values are all bf16 values, as in a checkpoint trained or released in
bf16, is stored as bf16: half the bytes per token, bit-identical logits).
"""

from __future__ import annotations

import os
import warnings

import torch

from .build import CSRC, ExtensionBuildError, load_extension

# The step uses torch's thread count (torch.set_num_threads), capped at this (NEOX_RWKV_STEP_THREADS).
MAX_THREADS = int(os.environ.get("NEOX_RWKV_STEP_THREADS", 1 << 16))

_failed: list[str] = []


def _impl() -> str:
    impl = os.environ.get("NEOX_RWKV_STEP_IMPL", "").strip().lower()
    if impl not in ("", "auto", "torch", "cpp"):
        raise ValueError(f"NEOX_RWKV_STEP_IMPL={impl!r} is not 'auto', 'cpp' or 'torch'; unset it for the default "
                         "(auto: the C++ step where it builds)")
    return impl or "auto"


def load():
    """The built extension module; raises ExtensionBuildError."""
    if _failed:
        raise ExtensionBuildError(_failed[0])
    cflags, ldflags = ["-O3", "-fno-trapping-math", "-pthread"], ["-pthread"]
    try:
        return load_extension("neox_rwkv_step", [CSRC / "rwkv_step" / "rwkv_step.cpp"], cflags=cflags,
                              ldflags=ldflags)
    except ExtensionBuildError as e:
        _failed.append(str(e))
        raise


def make_stepper(emb: torch.Tensor, layers: list[list[torch.Tensor]], ln_out: tuple[torch.Tensor, torch.Tensor],
                 head: torch.Tensor, eps: float):
    """A C++ stepper with `.step(ids [B], ffn_x, att_x, aa, bb, pp) -> logits [B, V]` (state [L, B, D],
    updated in place), or None when the pure-torch step should be used (forced, or no build; warns once).

    Each layer is 15 float32 tensors: ln1 w, b, ln2 w, b, att_mix [3, D] (k, v, r), key, value,
    receptance [D, D], w = -exp(time_decay), u = time_first [D], output [D, D], ffn_mix [2, D] (k, r),
    ffn key [F, D], ffn receptance [D, D], ffn value [D, F]; matrices as nn.Linear stores them."""
    impl = _impl()
    if impl == "torch":
        return None
    try:
        ext = load()
    except ExtensionBuildError as e:
        if impl == "cpp":
            raise
        if not getattr(make_stepper, "warned", False):
            make_stepper.warned = True
            warnings.warn(f"neox.ops.rwkv_step: the C++ step is unavailable, using the pure-torch step instead. "
                          f"Reason: {e}", RuntimeWarning, stacklevel=2)
        return None
    c = [t.detach().float().contiguous() for t in (emb, *ln_out, head)]
    lys = [[t.detach().float().contiguous() for t in ly] for ly in layers]
    threads = max(1, min(torch.get_num_threads(), MAX_THREADS))
    isa = os.environ.get("NEOX_RWKV_STEP_ISA", "").strip().lower()
    exact_bf16 = os.environ.get("NEOX_RWKV_STEP_EXACT_BF16", "1").strip() not in ("0", "false", "no", "off")
    return ext.Stepper(c[0], lys, c[1], c[2], c[3], float(eps), threads, isa, exact_bf16)

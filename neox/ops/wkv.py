"""RWKV-4 WKV: `y, state = wkv(w, u, k, v, state=None)`, the op RWKV time-mixing calls.

Picks an implementation per call: the CUDA extension for CUDA tensors, the C++ CPU extension for CPU
tensors, or the pure-torch reference (`wkv_reference`). Extensions build lazily on the first call
(see `build.py`); if a build is impossible the op warns once, saying why, and uses the reference.
`NEOX_WKV_IMPL=reference|cpu|cuda` forces a path (a forced extension that cannot build raises).

Shapes: w (= -exp(time_decay), negative) and u (time_first): [C]; k, v: [B, T, C] in float32, bfloat16
or float16 (float64 too, for gradcheck); state: None or (aa, bb, pp), each [B, C] float32. Returns y
[B, T, C] in v's dtype and the final state, so RNN mode can continue from a parallel-mode prefix.
The math is float32 (float64 for float64 inputs). Gradients reach w, u, k, v; never the state.
"""

from __future__ import annotations

import os
import sys
import warnings

import torch

from .build import CSRC, ExtensionBuildError, load_extension
from .wkv_reference import compute_dtype, initial_state, wkv_reference

IMPLS = ("reference", "cpu", "cuda")
_failed: dict[str, str] = {}  # impl -> why its build failed (so we try, and warn, once per process)


def _cpu_flags() -> tuple[list[str], list[str]]:
    # -O3 without -march=native: the cached build must run on any x86-64/arm64 machine sharing the
    # cache; wkv_cpu.cpp dispatches to AVX2/AVX-512 clones at run time itself. OpenMP drives
    # at::parallel_for (it resolves to torch's own libgomp, so torch.set_num_threads applies).
    cflags, ldflags = ["-O3", "-fno-trapping-math"], []
    if sys.platform.startswith("linux"):
        cflags.append("-fopenmp")
        ldflags.append("-fopenmp")
    return cflags, ldflags


def _load(impl: str):
    """The built extension for `impl` ('cpu' or 'cuda'); raises ExtensionBuildError."""
    if impl in _failed:
        raise ExtensionBuildError(_failed[impl])
    try:
        if impl == "cpu":
            cflags, ldflags = _cpu_flags()
            return load_extension("neox_wkv_cpu", [CSRC / "wkv" / "wkv_cpu.cpp"], cflags=cflags, ldflags=ldflags)
        cuda_flags = ["-O3"]
        return load_extension("neox_wkv_cuda", [CSRC / "wkv" / "wkv_cuda_binding.cpp", CSRC / "wkv" / "wkv_cuda.cu"],
                              cflags=["-O3"], cuda_cflags=cuda_flags, with_cuda=True)
    except ExtensionBuildError as e:
        _failed[impl] = str(e)
        raise


def prebuild(device: str | torch.device | None = None) -> str:
    """Build the extension(s) now (call in the parent before forking ranks); returns the impl `wkv` will use.

    device None: the CPU extension, plus the CUDA one when CUDA is available. Never raises for an
    impossible build unless NEOX_WKV_IMPL forces that impl; it warns and reports 'reference'.
    """
    devices = [torch.device(device)] if device is not None else (
        [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else []))
    chosen = "reference"
    for dev in devices:
        chosen = _resolve(dev, torch.float32)
        if chosen != "reference":
            _ext_or_fallback(chosen)
            chosen = "reference" if chosen in _failed else chosen
    return chosen


def _resolve(device: torch.device, dtype: torch.dtype) -> str:
    """Which implementation serves tensors on `device` with math dtype `dtype`."""
    forced = os.environ.get("NEOX_WKV_IMPL", "").strip().lower()
    if forced:
        if forced not in IMPLS:
            raise ValueError(f"NEOX_WKV_IMPL={forced!r} is not one of {IMPLS}; unset it to choose automatically")
        if forced != "reference" and forced != device.type:
            raise ValueError(f"NEOX_WKV_IMPL={forced} but the wkv inputs are on {device}; "
                             f"move them or set NEOX_WKV_IMPL to {device.type} or reference")
        return forced
    if device.type == "cpu":
        return "cpu"
    if device.type == "cuda" and dtype == torch.float32:  # the CUDA kernel does fp32 math only
        return "cuda"
    return "reference"


def _ext_or_fallback(impl: str):
    """The extension, or None after warning once (auto mode). A forced impl raises instead."""
    try:
        return _load(impl)
    except ExtensionBuildError as e:
        if os.environ.get("NEOX_WKV_IMPL", "").strip().lower() == impl:
            raise
        if not getattr(_ext_or_fallback, f"warned_{impl}", False):
            setattr(_ext_or_fallback, f"warned_{impl}", True)
            warnings.warn(f"neox.ops.wkv: the {impl} extension is unavailable, using the slow pure-torch "
                          f"reference instead. Reason: {e}", RuntimeWarning, stacklevel=3)
        return None


class _WKVFunction(torch.autograd.Function):
    """Extension forward/backward. Inputs are already validated, contiguous and in their math dtypes."""

    @staticmethod
    def forward(ctx, ext, w, u, k, v, aa, bb, pp):
        y, aa_out, bb_out, pp_out = ext.forward(w, u, k, v, aa, bb, pp)
        ctx.ext = ext
        ctx.save_for_backward(w, u, k, v, aa, bb, pp)
        ctx.mark_non_differentiable(aa_out, bb_out, pp_out)
        return y, aa_out, bb_out, pp_out

    @staticmethod
    def backward(ctx, gy, *_state_grads):
        w, u, k, v, aa, bb, pp = ctx.saved_tensors
        gy = gy.to(v.dtype).contiguous()
        gw, gu, gk, gv = ctx.ext.backward(w, u, k, v, aa, bb, pp, gy)  # gw, gu: [B, C] per-sequence sums
        return None, gw.sum(0), gu.sum(0), gk.to(k.dtype), gv.to(v.dtype), None, None, None


def _check(w, u, k, v, state) -> None:
    if k.dim() != 3 or k.shape != v.shape:
        raise ValueError(f"wkv: k and v must both be [B, T, C]; got k {tuple(k.shape)}, v {tuple(v.shape)}")
    B, _, C = k.shape
    if w.shape != (C,) or u.shape != (C,):
        raise ValueError(f"wkv: w and u must be [C]=[{C}]; got w {tuple(w.shape)}, u {tuple(u.shape)}")
    if k.dtype != v.dtype:
        raise ValueError(f"wkv: k and v must share a dtype; got {k.dtype} and {v.dtype}")
    if not (k.device == v.device == w.device == u.device):
        raise ValueError(f"wkv: w, u, k, v must be on one device; got {w.device}, {u.device}, {k.device}, {v.device}")
    if state is None:
        return
    if len(state) != 3:
        raise ValueError(f"wkv: state must be (aa, bb, pp); got {len(state)} tensors")
    for name, s in zip(("aa", "bb", "pp"), state):
        if s.shape != (B, C):
            raise ValueError(f"wkv: state {name} must be [B, C]=[{B}, {C}]; got {tuple(s.shape)}")
        if s.requires_grad:
            raise ValueError(f"wkv: state {name} requires grad, but gradients do not flow into the initial "
                             "state; pass state tensors detached (e.g. tuple(s.detach() for s in state))")


def wkv(w: torch.Tensor, u: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state=None):
    """RWKV-4 WKV over [B, T, C]; see the module docstring. Returns (y, (aa, bb, pp))."""
    _check(w, u, k, v, state)
    B, T, C = k.shape
    dt = compute_dtype(w, u, k, v)
    impl = _resolve(k.device, dt)
    ext = _ext_or_fallback(impl) if impl != "reference" else None
    if ext is None or T == 0:
        return wkv_reference(w, u, k, v, state)
    out_dtype = v.dtype
    if dt == torch.float64:  # float64 math: every operand in float64 (the CPU extension has that path)
        k, v = k.double(), v.double()
    if state is None:
        state = initial_state(B, C, k.device, dt)
    aa, bb, pp = (s.to(dt).contiguous() for s in state)
    y, aa, bb, pp = _WKVFunction.apply(ext, w.to(dt).contiguous(), u.to(dt).contiguous(), k.contiguous(),
                                       v.contiguous(), aa, bb, pp)
    return y.to(out_dtype), (aa, bb, pp)


# `neox.ops.wkv` names this function once the package is imported, so `neox.ops.wkv.prebuild()` must
# resolve on the function too (`from neox.ops.wkv import prebuild` reaches the module either way).
wkv.prebuild = prebuild

"""Pure-torch RWKV-4 WKV recurrence: the oracle every kernel is tested against.

A plain loop over time in the numerically stable form (running maximum exponent `pp`, as BlinkDL's
kernel and Hugging Face's CPU path). Autograd differentiates through it, so it needs no backward of
its own. Slow (a dozen small ops per token) but obviously right; it also serves as the fallback when
no extension can be built.
"""

from __future__ import annotations

import torch

# The initial "log-scale" of an empty state: exp(pp) == 0 without ever producing inf or NaN.
MIN_EXP = -1e38


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 if any input is float64 (gradcheck), else float32: the recurrence never runs in 16 bits."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def initial_state(batch: int, channels: int, device, dtype=torch.float32):
    """The empty state (aa, bb, pp), each [B, C]: zero numerator/denominator, pp = -1e38."""
    aa = torch.zeros(batch, channels, device=device, dtype=dtype)
    bb = torch.zeros(batch, channels, device=device, dtype=dtype)
    pp = torch.full((batch, channels), MIN_EXP, device=device, dtype=dtype)
    return aa, bb, pp


def wkv_reference(w: torch.Tensor, u: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state=None):
    """WKV over a sequence. w (negative decay), u: [C]; k, v: [B, T, C]; state: None or (aa, bb, pp) [B, C].

    Returns y [B, T, C] in v's dtype and the final state (aa, bb, pp) in the math dtype, detached (the
    state carries no gradient, matching the kernels). Math in float32, or float64 when any input is.
    """
    B, T, C = k.shape
    dt = compute_dtype(w, u, k, v)
    w, u = w.to(dt), u.to(dt)
    k, v = k.to(dt), v.to(dt)
    if state is None:
        aa, bb, pp = initial_state(B, C, k.device, dt)
    else:
        aa, bb, pp = (s.to(dt) for s in state)
    ys = []
    for t in range(T):
        kt, vt = k[:, t], v[:, t]  # [B, C]
        o = torch.maximum(pp, u + kt)
        e1, e2 = torch.exp(pp - o), torch.exp(u + kt - o)
        ys.append((e1 * aa + e2 * vt) / (e1 * bb + e2))
        o2 = torch.maximum(pp + w, kt)
        e1, e2 = torch.exp(pp + w - o2), torch.exp(kt - o2)
        aa = e1 * aa + e2 * vt
        bb = e1 * bb + e2
        pp = o2
    y = torch.stack(ys, dim=1) if ys else k.new_zeros(B, 0, C)
    return y.to(v.dtype), (aa.detach(), bb.detach(), pp.detach())

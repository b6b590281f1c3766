"""WKV: the pure-torch reference against a naive O(T^2) formula, the C++ CPU extension against the
reference (forward, backward, float64 gradcheck, huge keys, state continuation, bf16), and dispatch."""

import sys
import warnings

import pytest
import torch

from neox.ops import wkv, wkv_reference
from neox.ops.wkv_reference import initial_state

W = sys.modules["neox.ops.wkv"]  # the module (`neox.ops.wkv` as an attribute is the function)


def make_inputs(B, T, C, *, dtype=torch.float32, kscale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = -torch.exp(torch.randn(C, generator=g, dtype=torch.float64) - 1.0)  # decays in (-e^2, 0)
    u = torch.randn(C, generator=g, dtype=torch.float64)
    k = torch.randn(B, T, C, generator=g, dtype=torch.float64) * kscale
    v = torch.randn(B, T, C, generator=g, dtype=torch.float64)
    wd = torch.float64 if dtype == torch.float64 else torch.float32
    return w.to(wd), u.to(wd), k.to(dtype), v.to(dtype)


def naive_wkv(w, u, k, v):
    """The unstabilised definition, O(T^2), float64: y_t = sum_i<t e^{(t-1-i)w + k_i} v_i + e^{u+k_t} v_t, normed."""
    w, u, k, v = (x.double() for x in (w, u, k, v))
    T = k.shape[1]
    t = torch.arange(T)
    lag = (t[:, None] - 1 - t[None, :]).double()  # [T(out), T(in)]
    logits = lag[None, :, :, None] * w + k[:, None, :, :]  # [B, T, T, C]
    logits = torch.where((t[None, :] < t[:, None])[None, :, :, None], logits, torch.tensor(float("-inf")))
    diag = (u + k)[:, :, None, :]  # [B, T, 1, C]: the current token's bonus term
    weights = torch.cat([logits, diag], dim=2).softmax(dim=2)  # [B, T, T+1, C]
    values = torch.cat([v[:, None].expand(-1, T, -1, -1), v[:, :, None]], dim=2)
    return (weights * values).sum(dim=2)


def grads(fn, w, u, k, v, gy):
    leaves = [x.detach().clone().requires_grad_() for x in (w, u, k, v)]
    y, _ = fn(*leaves)
    return y.detach(), torch.autograd.grad(y, leaves, gy.to(y.dtype), allow_unused=True, materialize_grads=True)


def assert_close(a, b, rtol, atol, what=""):
    a, b = a.double(), b.double()
    err = (a - b).abs().max().item()
    bound = atol + rtol * b.abs().max().item()
    assert err <= bound, f"{what}: max err {err:.3g} > {bound:.3g}"


@pytest.mark.parametrize("B,T,C", [(1, 1, 3), (2, 9, 5)])
def test_reference_matches_naive_definition(B, T, C):
    w, u, k, v = make_inputs(B, T, C, dtype=torch.float64)
    y, _ = wkv_reference(w, u, k, v)
    torch.testing.assert_close(y, naive_wkv(w, u, k, v), rtol=1e-10, atol=1e-12)


def test_reference_gradcheck():
    w, u, k, v = make_inputs(2, 6, 3, dtype=torch.float64)
    inputs = tuple(x.requires_grad_() for x in (w, u, k, v))
    assert torch.autograd.gradcheck(lambda *a: wkv_reference(*a)[0], inputs)


def test_cpu_gradcheck_float64_with_state(wkv_cpu_ext, monkeypatch):
    monkeypatch.setenv("NEOX_WKV_IMPL", "cpu")
    w, u, k, v = make_inputs(2, 7, 5, dtype=torch.float64)
    _, state = wkv_reference(*make_inputs(2, 3, 5, dtype=torch.float64, seed=1))
    inputs = tuple(x.requires_grad_() for x in (w, u, k, v))
    assert torch.autograd.gradcheck(lambda *a: wkv(*a, state=state)[0], inputs)
    y, _ = wkv(*inputs, state=state)
    assert y.grad_fn is not None and "WKV" in type(y.grad_fn).__name__  # the extension really ran


@pytest.mark.parametrize("B,T,C", [(1, 1, 1), (3, 1, 7), (2, 17, 33), (2, 64, 130), (1, 1024, 17)])
def test_cpu_matches_reference(wkv_cpu_ext, monkeypatch, B, T, C):
    monkeypatch.setenv("NEOX_WKV_IMPL", "cpu")
    w, u, k, v = make_inputs(B, T, C)
    gy = torch.randn(B, T, C, generator=torch.Generator().manual_seed(5))
    y, g = grads(wkv, w, u, k, v, gy)
    y64, g64 = grads(wkv_reference, *(x.double() for x in (w, u, k, v)), gy)
    assert y.dtype == torch.float32
    assert_close(y, y64, 1e-5, 1e-5, "y")
    for name, a, b in zip("wukv", g, g64):
        assert a.dtype == torch.float32 and a.shape == b.shape
        assert_close(a, b, 1e-4, 1e-5, f"grad {name}")


@pytest.mark.parametrize("kscale", [50.0, 1000.0])
def test_cpu_large_keys_stay_finite_and_match(wkv_cpu_ext, monkeypatch, kscale):
    """Huge |k|: no inf/NaN, and the extension is as close to float64 as the float32 reference is."""
    monkeypatch.setenv("NEOX_WKV_IMPL", "cpu")
    w, u, k, v = make_inputs(2, 200, 40, kscale=kscale)
    gy = torch.randn(2, 200, 40, generator=torch.Generator().manual_seed(6))
    y, g = grads(wkv, w, u, k, v, gy)
    y32, g32 = grads(wkv_reference, w, u, k, v, gy)
    y64, g64 = grads(wkv_reference, *(x.double() for x in (w, u, k, v)), gy)
    assert torch.isfinite(y).all() and all(torch.isfinite(x).all() for x in g)
    for name, a, a32, b in zip(["y", "gw", "gu", "gk", "gv"], [y, *g], [y32, *g32], [y64, *g64]):
        ref_err = (a32.double() - b).abs().max().item()
        assert_close(a, b, 1e-5, 4 * ref_err + 1e-5, f"{name} (float32 reference err {ref_err:.3g})")


@pytest.mark.parametrize("impl", ["reference", "cpu"])
def test_state_continuation(wkv_cpu_ext, monkeypatch, impl):
    """wkv over [0:T] == wkv over [0:t] then [t:T] from the returned state (parallel -> RNN mode)."""
    monkeypatch.setenv("NEOX_WKV_IMPL", impl)
    w, u, k, v = make_inputs(2, 23, 19)
    y_full, s_full = wkv(w, u, k, v)
    for t in (1, 10, 22):
        y1, s1 = wkv(w, u, k[:, :t], v[:, :t])
        y2, s2 = wkv(w, u, k[:, t:], v[:, t:], state=s1)
        torch.testing.assert_close(torch.cat([y1, y2], 1), y_full, rtol=1e-5, atol=1e-6)
        for a, b in zip(s2, s_full):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # token by token (RNN mode) from an explicit empty state
    state = initial_state(2, 19, "cpu")
    ys = []
    for t in range(23):
        y_t, state = wkv(w, u, k[:, t:t + 1], v[:, t:t + 1], state=state)
        ys.append(y_t)
    torch.testing.assert_close(torch.cat(ys, 1), y_full, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cpu_half_inputs(wkv_cpu_ext, monkeypatch, dtype):
    monkeypatch.setenv("NEOX_WKV_IMPL", "cpu")
    w, u, k, v = make_inputs(2, 50, 24, dtype=dtype)
    gy = torch.randn(2, 50, 24, generator=torch.Generator().manual_seed(7))
    y, g = grads(wkv, w, u, k, v, gy)
    y64, g64 = grads(wkv_reference, *(x.double() for x in (w, u, k, v)), gy.to(dtype))  # same rounded inputs
    assert y.dtype == dtype and g[2].dtype == dtype and g[3].dtype == dtype and g[0].dtype == torch.float32
    rel = 1e-2 if dtype == torch.bfloat16 else 2e-3  # output rounding only: the math is float32
    assert_close(y, y64, rel, rel, "y")
    for name, a, b in zip("wukv", g, g64):
        assert_close(a, b, rel, rel, f"grad {name}")


def test_state_requiring_grad_is_rejected():
    w, u, k, v = make_inputs(1, 3, 4)
    aa, bb, pp = initial_state(1, 4, "cpu")
    with pytest.raises(ValueError, match="requires grad"):
        wkv(w, u, k, v, state=(aa.requires_grad_(), bb, pp))


def test_bad_shapes_and_env_are_rejected(monkeypatch):
    w, u, k, v = make_inputs(1, 3, 4)
    with pytest.raises(ValueError, match=r"w and u must be \[C\]"):
        wkv(w[:3], u, k, v)
    monkeypatch.setenv("NEOX_WKV_IMPL", "gpu")
    with pytest.raises(ValueError, match="NEOX_WKV_IMPL"):
        wkv(w, u, k, v)
    monkeypatch.setenv("NEOX_WKV_IMPL", "cuda")
    with pytest.raises(ValueError, match="on cpu"):
        wkv(w, u, k, v)


def test_failed_build_falls_back_to_reference_with_one_warning(monkeypatch):
    monkeypatch.delenv("NEOX_WKV_IMPL", raising=False)
    monkeypatch.setitem(W._failed, "cpu", "no C++ compiler (simulated)")
    monkeypatch.setattr(W._ext_or_fallback, "warned_cpu", False, raising=False)
    w, u, k, v = make_inputs(1, 5, 4)
    with pytest.warns(RuntimeWarning, match="no C.. compiler .simulated"):
        y, _ = wkv(w, u, k, v)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        wkv(w, u, k, v)  # warned once only
    torch.testing.assert_close(y, wkv_reference(w, u, k, v)[0])
    monkeypatch.setenv("NEOX_WKV_IMPL", "cpu")  # a forced impl that cannot build raises instead
    with pytest.raises(RuntimeError, match="simulated"):
        wkv(w, u, k, v)


def test_prebuild_reports_the_cpu_extension(wkv_cpu_ext, monkeypatch):
    monkeypatch.delenv("NEOX_WKV_IMPL", raising=False)
    assert W.prebuild("cpu") == "cpu"
    assert wkv.prebuild is W.prebuild

"""WKV CUDA kernel against the C++ CPU extension (and so, transitively, the pure-torch reference)."""

import sys

import pytest
import torch

from neox.ops import wkv, wkv_reference

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (torch.cuda)")]

W = sys.modules["neox.ops.wkv"]


@pytest.fixture(scope="module")
def cuda_ext():
    return W._load("cuda")  # raises (fails the test) if the CUDA extension cannot build on a CUDA machine


def make_inputs(B, T, C, dtype, seed=0, kscale=1.0):
    g = torch.Generator().manual_seed(seed)
    w = -torch.exp(torch.randn(C, generator=g) - 1.0)
    u = torch.randn(C, generator=g)
    k = (torch.randn(B, T, C, generator=g) * kscale).to(dtype)
    v = torch.randn(B, T, C, generator=g).to(dtype)
    gy = torch.randn(B, T, C, generator=g).to(dtype)
    return w, u, k, v, gy


def run(device, w, u, k, v, gy, state=None):
    leaves = [x.to(device).requires_grad_() for x in (w, u, k, v)]
    st = None if state is None else tuple(s.to(device) for s in state)
    y, s = wkv(*leaves, state=st)
    g = torch.autograd.grad(y, leaves, gy.to(device))
    return [t.detach().cpu().double() for t in (y, *g, *s)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B,T,C,kscale", [(1, 1, 1, 1.0), (3, 37, 70, 1.0), (2, 4096, 33, 1.0), (2, 64, 96, 500.0)])
def test_cuda_matches_cpu(cuda_ext, monkeypatch, dtype, B, T, C, kscale):
    monkeypatch.delenv("NEOX_WKV_IMPL", raising=False)
    w, u, k, v, gy = make_inputs(B, T, C, dtype, kscale=kscale)
    _, state = wkv_reference(*make_inputs(B, 5, C, torch.float32, seed=1)[:4])
    gpu = run("cuda", w, u, k, v, gy, state)
    cpu = run("cpu", w, u, k, v, gy, state)
    tol = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 4e-3}[dtype] * (10 if kscale > 1 else 1)
    names = ["y", "gw", "gu", "gk", "gv", "aa", "bb", "pp"]
    for name, a, b in zip(names, gpu, cpu):
        assert torch.isfinite(a).all(), name
        err = (a - b).abs().max().item()
        assert err <= tol * (1 + b.abs().max().item()), f"{name}: {err:.3g}"


def test_cuda_state_continuation(cuda_ext):
    w, u, k, v, _ = make_inputs(2, 50, 40, torch.float32)
    w, u, k, v = (x.cuda() for x in (w, u, k, v))
    y, s = wkv(w, u, k, v)
    y1, s1 = wkv(w, u, k[:, :20], v[:, :20])
    y2, s2 = wkv(w, u, k[:, 20:], v[:, 20:], state=s1)
    torch.testing.assert_close(torch.cat([y1, y2], 1), y, rtol=1e-5, atol=1e-6)
    for a, b in zip(s2, s):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)

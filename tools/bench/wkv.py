"""Benchmark the WKV op: C++ CPU extension (and CUDA when present) against the pure-torch reference.

    python tools/bench/wkv.py [--shapes 8x512x512,8x1024x1024] [--repeats 5] [--threads N]

Prints one row per (shape, pass) with the median time of each implementation and the speed-up. The
first call builds the extension (cached afterwards), outside the timed region.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from neox.ops.wkv import _ext_or_fallback, _WKVFunction, prebuild  # noqa: E402
from neox.ops.wkv_reference import initial_state, wkv_reference  # noqa: E402


def _median_time(fn, repeats: int, sync=lambda: None) -> float:
    fn()  # warm-up
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_shape(ext, B: int, T: int, C: int, device: str, repeats: int, ref_repeats: int) -> list[tuple]:
    g = torch.Generator().manual_seed(0)
    w = (-torch.rand(C, generator=g) * 3).exp().neg().to(device)
    u = torch.randn(C, generator=g).to(device)
    k = torch.randn(B, T, C, generator=g).to(device)
    v = torch.randn(B, T, C, generator=g).to(device)
    gy = torch.randn(B, T, C, generator=g).to(device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    state = initial_state(B, C, device)

    def ext_fwd():
        with torch.no_grad():
            return ext.forward(w, u, k, v, *state)

    def ref_fwd():
        with torch.no_grad():
            return wkv_reference(w, u, k, v)

    leaves = [x.clone().requires_grad_() for x in (w, u, k, v)]

    def ext_fwd_bwd():
        y = _WKVFunction.apply(ext, *leaves, *state)[0]
        torch.autograd.grad(y, leaves, gy)

    def ref_fwd_bwd():
        y = wkv_reference(*leaves)[0]
        torch.autograd.grad(y, leaves, gy)

    rows = []
    for name, fe, fr in (("forward", ext_fwd, ref_fwd), ("fwd+bwd", ext_fwd_bwd, ref_fwd_bwd)):
        te = _median_time(fe, repeats, sync)
        tr = _median_time(fr, ref_repeats, sync)
        rows.append((f"{B}x{T}x{C}", name, tr * 1e3, te * 1e3, tr / te))
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="8x512x512,8x1024x1024", help="comma-separated BxTxC")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--ref-repeats", type=int, default=3, help="repeats of the (slow) reference")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    impl = prebuild(args.device)
    print(f"# extension ready ({impl}) in {time.perf_counter() - t0:.1f}s; torch threads {torch.get_num_threads()}")
    ext = _ext_or_fallback(impl) if impl != "reference" else None
    if ext is None:
        print("# no extension could be built; nothing to compare", file=sys.stderr)
        return 1
    print(f"{'shape BxTxC':>16} {'pass':>8} {'reference ms':>13} {impl + ' ms':>10} {'speed-up':>9}")
    for shape in args.shapes.split(","):
        B, T, C = (int(x) for x in shape.lower().split("x"))
        for s, name, tr, te, ratio in bench_shape(ext, B, T, C, args.device, args.repeats, args.ref_repeats):
            print(f"{s:>16} {name:>8} {tr:13.1f} {te:10.1f} {ratio:8.1f}x", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

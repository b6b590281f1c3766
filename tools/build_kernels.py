"""Compile every CUDA file under csrc/ with nvcc into build/kernels/ (what `make kernels` runs).

    python tools/build_kernels.py [--nvcc PATH] [--out build/kernels] [--arch 80,90]

The .cu files expose a plain C ABI and include no torch headers, so this needs only nvcc (no GPU and
no CUDA build of torch): it proves the kernels compile for the target architectures. nvcc is taken
from --nvcc, $NVCC, $CUDA_HOME/bin, /usr/local/cuda/bin or PATH. No nvcc at all: says so, exits 0.
A compile error: prints nvcc's output and exits 1.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def find_nvcc(explicit: str | None = None) -> str | None:
    candidates = [explicit, os.environ.get("NVCC")]
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home:
            candidates.append(str(Path(home) / "bin" / "nvcc"))
    candidates.append(shutil.which("nvcc"))
    for c in candidates:
        if c and Path(c).is_file() and os.access(c, os.X_OK):
            return c
    return None


def nvcc_command(nvcc: str, src: Path, obj: Path, archs: list[str]) -> list[str]:
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    return [nvcc, "-c", "-O3", "-std=c++17", *gencode, "-Xcompiler", "-fPIC", f"-I{src.parent}", str(src),
            "-o", str(obj)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nvcc", default=None, help="path to nvcc (default: $NVCC, $CUDA_HOME/bin/nvcc, PATH)")
    p.add_argument("--out", default=str(ROOT / "build" / "kernels"), help="directory for the object files")
    p.add_argument("--arch", default="80,90", help="comma-separated SM versions (80 = A100, 90 = H100)")
    p.add_argument("--src", default=str(ROOT / "csrc"), help="directory searched for .cu files")
    args = p.parse_args(argv)

    nvcc = find_nvcc(args.nvcc)
    if nvcc is None:
        print("build_kernels: no nvcc found (set --nvcc, NVCC or CUDA_HOME); skipping the CUDA kernels")
        return 0
    sources = sorted(Path(args.src).rglob("*.cu"))
    if not sources:
        print(f"build_kernels: no .cu files under {args.src}")
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    archs = [a.strip() for a in args.arch.split(",") if a.strip()]
    total = time.perf_counter()
    for src in sources:
        obj = out / (src.relative_to(args.src).as_posix().replace("/", "_")[: -len(".cu")] + ".o")
        cmd = nvcc_command(nvcc, src, obj, archs)
        print("+ " + shlex.join(cmd), flush=True)
        t0 = time.perf_counter()
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            sys.stderr.write(res.stdout + res.stderr)
            print(f"build_kernels: FAILED compiling {src} (exit {res.returncode})", file=sys.stderr)
            return 1
        if res.stderr.strip():
            sys.stderr.write(res.stderr)
        print(f"  -> {obj} ({obj.stat().st_size // 1024} KiB) in {time.perf_counter() - t0:.1f}s", flush=True)
    print(f"build_kernels: {len(sources)} file(s) for sm_{', sm_'.join(archs)} in {time.perf_counter() - total:.1f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""tools/build_kernels.py (`make kernels`): every csrc/ .cu file compiles with nvcc for sm_80 and sm_90.

Needs only nvcc (no GPU): the kernels have a plain C ABI and no torch headers. ~3 s per file here.
"""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))
import build_kernels  # noqa: E402

NVCC = build_kernels.find_nvcc()


@pytest.mark.skipif(NVCC is None, reason="no nvcc on this machine (set CUDA_HOME or NVCC)")
def test_build_kernels_compiles_every_cu_file(tmp_path):
    res = subprocess.run([sys.executable, str(ROOT / "tools" / "build_kernels.py"), "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    sources = sorted((ROOT / "csrc").rglob("*.cu"))
    assert sources, "no .cu files found under csrc/"
    objects = sorted(tmp_path.glob("*.o"))
    assert len(objects) == len(sources) and all(o.stat().st_size > 0 for o in objects), res.stdout
    assert "sm_80" in res.stdout and "sm_90" in res.stdout


@pytest.mark.skipif(NVCC is None, reason="no nvcc on this machine (set CUDA_HOME or NVCC)")
def test_build_kernels_fails_loudly_on_a_compile_error(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "broken.cu").write_text("__global__ void k() { this is not cuda; }\n")
    res = subprocess.run([sys.executable, str(ROOT / "tools" / "build_kernels.py"), "--src", str(src), "--out",
                          str(tmp_path / "out"), "--arch", "80"], capture_output=True, text=True, timeout=600)
    assert res.returncode == 1 and "FAILED" in res.stderr


def test_build_kernels_without_nvcc_skips_cleanly(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(build_kernels, "find_nvcc", lambda explicit=None: None)
    assert build_kernels.main(["--out", str(tmp_path)]) == 0
    assert "no nvcc" in capsys.readouterr().out

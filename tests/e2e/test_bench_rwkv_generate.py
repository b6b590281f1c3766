"""tools/bench/rwkv_generate.py runs neox, transformers, the rwkv package and the bandwidth floor side by
side (also under contention and with bf16-valued weights) and reports a number for every side.

The bench's numbers are timings, so this checks only that every side ran and produced a positive median
and that neox used its C++ step with exact bf16 storage where the weights allow it (the step's numbers
are checked against forward_rnn, transformers and the rwkv package in tests/unit and tests/parity)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCH = str(ROOT / "tools/bench/rwkv_generate.py")


def test_bench_every_side_tiny(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("rwkv")
    out = tmp_path / "bench.json"
    res = subprocess.run([sys.executable, BENCH, "--hidden", "64", "--layers", "2", "--vocab", "300", "--tokens", "4",
                          "--warmup", "1", "--block", "2", "--contexts", "8,16", "--contention", "1", "--bf16-values",
                          "--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         stdin=subprocess.DEVNULL)
    assert res.returncode == 0, res.stdout + res.stderr
    data = json.loads(out.read_text())
    sides = data["seconds_per_token"]
    assert {"transformers RwkvForCausalLM", "rwkv package (cpu fp32)", "floor: one torch.mv, same bytes",
            "neox forward_rnn (unfused)"} <= set(sides)
    assert all(v is not None and v > 0 for v in sides.values()), sides
    contended = data["seconds_per_token_contended"]
    assert len(contended) == 2 and all(v > 0 for v in contended.values())
    assert set(data["context_growth"]) == {"RWKV-4 (neox, RNN)", "GPT-NeoX (neox, KV cache)"}
    assert all(v > 0 for row in data["context_growth"].values() for v in row.values())
    if "neox RWKVStepper (C++ step)" in sides:  # bf16-valued weights: every matrix stored as exact bf16
        line = next(x for x in res.stdout.splitlines() if x.startswith("neox C++ step:"))
        total, bf16 = (float(t.split(" MB")[0].split()[-1]) for t in line.split(", ")[2:4])
        assert total == bf16 > 0, line

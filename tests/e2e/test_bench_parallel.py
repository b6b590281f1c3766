"""tools/bench/parallel.py runs every layout side by side and prints sane numbers.

The independent checks: one process issues no communication (0 %), every split layout does (> 0 %), and
all layouts train the same global batch to the same loss as the single process (the bench's own
sanity column, compared here against its single row).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BENCH = str(ROOT / "tools/bench/parallel.py")
LAYOUTS = {"single": 1, "tp2": 2, "pp2": 2, "dp2": 2, "tp2-pp2-dp2": 8}


def run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, BENCH, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def test_bench_prints_every_layout_with_sane_numbers(tmp_path):
    out_json = tmp_path / "bench.json"
    res = run("--layouts", ",".join(LAYOUTS), "--steps", "2", "--warmup", "1", "--layers", "4", "--hidden", "32",
              "--seq", "16", "--json", str(out_json))
    assert res.returncode == 0, res.stdout + res.stderr
    lines = res.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("layout"))
    for col in ("ranks", "median step ms", "vs single", "comm %"):
        assert col in lines[header]
    table = {line.split()[0]: line.split() for line in lines[header + 2:] if line and not line.startswith("note")}
    assert list(table) == list(LAYOUTS), res.stdout

    rows = {r["layout"]: r for r in json.loads(out_json.read_text())["rows"]}
    assert list(rows) == list(LAYOUTS)
    single = rows["single"]
    for name, ranks in LAYOUTS.items():
        r = rows[name]
        assert r["ranks"] == ranks and int(table[name][1]) == ranks
        assert math.isfinite(r["median_step_ms"]) and 0 < r["median_step_ms"] < 60_000, r
        assert table[name][3] == f"{r['median_step_ms'] / single['median_step_ms']:.2f}x"
        assert 0 <= r["comm_pct"] <= 100, r
        if name == "single":
            assert r["comm_pct"] == 0.0  # one process never enters torch.distributed
        else:
            assert r["comm_pct"] > 0.0, f"{name}: no communication measured"
        assert abs(r["loss"] - single["loss"]) <= 1e-5 * abs(single["loss"]), (name, r["loss"], single["loss"])


def test_bench_rejects_unknown_layout():
    res = run("--layouts", "single,tp2-qq3", timeout=60)
    assert res.returncode != 0
    assert "qq3" in res.stderr and "tp2-pp2-dp2" in res.stderr

"""The SLURM example stays a valid bash script that launches train.py with srun."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tools/slurm/train.sbatch"


def test_sbatch_parses_as_bash():
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("bash not installed")
    r = subprocess.run([bash, "-n", str(SCRIPT)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_sbatch_launches_train_py_with_srun():
    text = SCRIPT.read_text()
    code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    # srun ... python train.py -c ... (possibly continued over lines)
    assert re.search(r"\bsrun\b[^\n]*\\?\s*\n?\s*python train\.py -c", code), "no `srun ... python train.py -c`"
    assert (ROOT / "train.py").is_file() and (ROOT / "configs/20B.yml").is_file()
    assert "configs/20B.yml" in code
    # one task per GPU, and the rendezvous from the node list
    assert "#SBATCH --ntasks-per-node=8" in text and "#SBATCH --gpus-per-node=8" in text
    assert "scontrol show hostnames" in code and "export MASTER_PORT" in code and "MASTER_ADDR" in code

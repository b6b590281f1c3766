"""End to end on a small built corpus: train.py trains, saves, resumes exactly; neox.load and generate.py read it."""

import json
import subprocess
import sys
from pathlib import Path

import torch

import neox

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
import train  # noqa: E402


def _overrides(corpus, run_dir, **extra):
    kv = {
        "vocab_file": corpus["tokenizer_file"], "data_path": corpus["data_prefix"], "split": "90,10,0",
        "num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "seq_length": 64,
        "max_position_embeddings": 64, "train_micro_batch_size_per_gpu": 4, "train_iters": 8,
        "eval_interval": 4, "eval_iters": 2, "log_interval": 2, "save": str(run_dir),
        "checkpoint_factor": 4, "lr": 3e-3, "warmup": 0.1,
    }
    kv.update(extra)
    return [f"{k}={v}" for k, v in kv.items()]


def _train_losses(run_dir: Path) -> dict[int, float]:
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in recs if r["kind"] == "train"}


def test_train_load_generate_and_exact_resume(corpus, tmp_path, capsys):
    full = tmp_path / "full"
    assert train.main(["-c", str(ROOT / "configs/tiny/neox.yml"), *_overrides(corpus, full, log_interval=1)]) == 0
    out = capsys.readouterr().out
    assert "step 8/8" in out and "tok/s" in out and "ETA" in out
    evals = [json.loads(line) for line in (full / "metrics.jsonl").read_text().splitlines()]
    eval_losses = [r["loss"] for r in evals if r["kind"] == "eval"]
    first_train = [r["loss"] for r in evals if r["kind"] == "train"][0]
    assert eval_losses[-1] < first_train - 0.5  # it learns something even in 8 steps
    assert (full / "latest").read_text().strip() == "global_step8"
    assert (full / "global_step4" / "manifest.json").is_file()

    # exact resume: stop after 4 steps, resume from the checkpoint, compare steps 5..8 bitwise
    part = tmp_path / "part"
    args = ["-c", str(ROOT / "configs/tiny/neox.yml")]
    assert train.main([*args, *_overrides(corpus, part, exit_interval=4, log_interval=1)]) == 0
    assert train.main([*args, *_overrides(corpus, part, log_interval=1, load=str(part))]) == 0
    assert "resumed from" in capsys.readouterr().out
    a, b = _train_losses(full), _train_losses(part)
    assert [a[s] for s in range(1, 9)] == [b[s] for s in range(1, 9)]

    # neox.load gives the real vocab; logits agree with a model rebuilt from the checkpoint
    model = neox.load(full)
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    logits = model(ids)
    assert logits.shape == (1, 5, 512)
    assert torch.isfinite(logits).all()

    # the generate CLI runs on it (subprocess: what a user types)
    res = subprocess.run([sys.executable, str(ROOT / "tools/generate.py"), "--load", str(full), "--prompt",
                          "def ", "--max-new-tokens", "8", "--temperature", "0"],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("def ")


def test_config_error_is_one_line(tmp_path, capsys):
    assert train.main(["-c", str(ROOT / "configs/tiny/neox.yml"), "hiden_size=8"]) == 2
    err = capsys.readouterr().err
    assert "hiden_size" in err and "hidden_size" in err

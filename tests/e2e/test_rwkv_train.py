"""End to end: `train.py -c configs/tiny/rwkv.yml` trains RWKV-4 on a small built corpus (the loss falls),
saves a checkpoint that neox.load reads back, and the loaded model's parallel and RNN modes agree."""

import json
import math
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
        "num_layers": 2, "hidden_size": 64, "seq_length": 64, "max_position_embeddings": 64,
        "train_micro_batch_size_per_gpu": 4, "train_iters": 12, "eval_interval": 6, "eval_iters": 2,
        "log_interval": 1, "save": str(run_dir), "checkpoint_factor": 6, "lr": 3e-3, "warmup": 0.1,
    }
    kv.update(extra)
    return [f"{k}={v}" for k, v in kv.items()]


def test_tiny_rwkv_trains_saves_and_loads(corpus, tmp_path):
    run = tmp_path / "run"
    assert train.main(["-c", str(ROOT / "configs/tiny/rwkv.yml"), *_overrides(corpus, run)]) == 0
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_losses = [r["loss"] for r in recs if r["kind"] == "train"]
    eval_losses = [r["loss"] for r in recs if r["kind"] == "eval"]
    assert len(train_losses) == 12 and all(math.isfinite(x) for x in train_losses)  # every step logged
    assert eval_losses[-1] < train_losses[0] - 0.5, (train_losses, eval_losses)  # it learns
    assert (run / "latest").read_text().strip() == "global_step12"
    manifest = json.loads((run / "global_step12" / "manifest.json").read_text())
    assert manifest["config"]["model_type"] == "rwkv"

    model = neox.load(run)  # CausalLM over the RWKV weights, real vocab only
    ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
    with torch.no_grad():
        logits = model(ids)
        assert logits.shape == (1, 6, 512) and torch.isfinite(logits).all()
        rwkv = model.model
        state, steps = rwkv.init_state(1), []
        for t in range(ids.shape[1]):
            step, state = rwkv.forward_rnn(ids[:, t], state)
            steps.append(step[..., :512])
    assert (torch.stack(steps, 1) - logits).abs().max().item() <= 1e-4

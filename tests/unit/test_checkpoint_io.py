"""Checkpoint files: round trips, atomic publication, and clear errors for broken or foreign checkpoints."""

import errno
import json
import os
import signal
import time

import pytest
import torch

from neox.checkpoint import io
from neox.checkpoint.io import CheckpointError, load_model_checkpoint, resolve_step_dir, save_model_checkpoint
from neox.checkpoint.training_state import load_checkpoint, save_checkpoint
from neox.config import NeoXConfig


def _cfg() -> NeoXConfig:
    return NeoXConfig.from_dict({"num_layers": 2, "hidden_size": 8, "num_attention_heads": 2, "seq_length": 16,
                                 "vocab_size": 100, "train_iters": 5, "lr": 1e-3})


def _sd(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"a.weight": torch.randn(4, 3, generator=g), "b.bias": torch.randn(5, generator=g)}


def test_round_trip_and_latest(tmp_path):
    cfg = _cfg()
    save_model_checkpoint(tmp_path, _sd(0), cfg, iteration=1)
    step2 = save_model_checkpoint(tmp_path, _sd(1), cfg, iteration=2)
    assert (tmp_path / "latest").read_text().strip() == "global_step2"
    assert resolve_step_dir(tmp_path) == step2
    cfg2, sd = load_model_checkpoint(tmp_path)
    assert cfg2.to_dict() == cfg.to_dict()
    assert all(torch.equal(sd[k], v) for k, v in _sd(1).items())
    _, sd1 = load_model_checkpoint(tmp_path, step=1)
    assert torch.equal(sd1["a.weight"], _sd(0)["a.weight"])
    manifest = json.loads((step2 / "manifest.json").read_text())
    assert manifest["tensors"]["a.weight"]["shape"] == [4, 3] and manifest["layout"]["tp"] == 1


def _no_tmp_left(run_dir):
    return not [p for p in run_dir.iterdir() if p.name.startswith(".")]


def test_failed_write_keeps_previous(tmp_path):
    cfg = _cfg()
    save_model_checkpoint(tmp_path, _sd(0), cfg, iteration=1)

    def boom(tmp):
        (tmp / "half.safetensors").write_bytes(b"x" * 10)
        raise RuntimeError("crash while writing")

    with pytest.raises(RuntimeError, match="crash"):
        io.write_checkpoint_dir(tmp_path, 2, boom)
    assert (tmp_path / "latest").read_text().strip() == "global_step1"
    assert not (tmp_path / "global_step2").exists() and _no_tmp_left(tmp_path)

    def full_disk(tmp):
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(CheckpointError, match="free disk space"):
        io.write_checkpoint_dir(tmp_path, 2, full_disk)
    assert resolve_step_dir(tmp_path).name == "global_step1" and _no_tmp_left(tmp_path)
    load_model_checkpoint(tmp_path)  # still loads


def test_kill_9_during_write_never_breaks_latest(tmp_path):
    """SIGKILL a writer at random moments: `latest` always names a complete, loadable checkpoint."""
    cfg = _cfg()
    save_model_checkpoint(tmp_path, _sd(0), cfg, iteration=0)
    big = {"w": torch.randn(512, 1024)}  # 2 MB, so the kill often lands mid-write
    for delay in (0.0, 0.005, 0.02, 0.05):
        pid = os.fork()
        if pid == 0:  # child: write checkpoints forever
            try:
                for it in range(1, 10_000):
                    save_model_checkpoint(tmp_path, big, cfg, iteration=it)
            finally:
                os._exit(0)
        time.sleep(delay)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        _, sd = load_model_checkpoint(tmp_path)
        assert set(sd) in ({"w"}, {"a.weight", "b.bias"})


def test_broken_and_foreign_checkpoints(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        resolve_step_dir(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="not a neox checkpoint"):
        resolve_step_dir(tmp_path)
    step = save_model_checkpoint(tmp_path, _sd(0), _cfg(), iteration=3)
    m = json.loads((step / "manifest.json").read_text())
    m["tensors"]["a.weight"]["shape"] = [5, 3]
    (step / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(CheckpointError, match="a.weight.*shape"):
        load_model_checkpoint(tmp_path)
    (step / "manifest.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_model_checkpoint(tmp_path)
    (step / "manifest.json").write_text(json.dumps({"format": "deepspeed"}))
    with pytest.raises(CheckpointError, match="not a neox checkpoint"):
        load_model_checkpoint(tmp_path)


def test_training_state_round_trip(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(2, 3)).sum().backward()
    opt.step()
    torch.manual_seed(42)
    save_checkpoint(tmp_path, 7, model=model, optimizer=opt, config=_cfg(), trainer_state={"consumed_samples": 56})
    expected_next = torch.rand(3)

    model2 = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    opt2 = torch.optim.AdamW(model2.parameters(), lr=0.1)
    state = load_checkpoint(tmp_path, model=model2, optimizer=opt2)
    assert state == {"consumed_samples": 56, "iteration": 7}
    assert torch.equal(torch.rand(3), expected_next)  # RNG restored
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)
        assert torch.equal(opt.state[p]["exp_avg_sq"], opt2.state[q]["exp_avg_sq"])

    wrong = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Linear(5, 2))
    with pytest.raises(CheckpointError, match=r"tensor '0.weight'.*another model shape"):
        load_checkpoint(tmp_path, model=wrong)

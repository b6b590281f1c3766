"""train.py as users run it: preemption (SIGTERM) saves and exits cleanly; NaN losses stop the run with a
good checkpoint; a checkpoint of another model shape is refused by name; a bug reaches torchrun's error file."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from neox.checkpoint.io import load_model_checkpoint
from neox.training import runner

from .test_train_cli import ROOT, _overrides, train


def _train_steps(run_dir: Path) -> list[int]:
    if not (run_dir / "metrics.jsonl").is_file():
        return []
    return [json.loads(x)["step"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()
            if json.loads(x)["kind"] == "train"]


def test_sigterm_saves_checkpoint_and_exits_cleanly(corpus, tmp_path):
    run_dir = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "train.py"), "-c", str(ROOT / "configs/tiny/neox.yml"),
           *_overrides(corpus, run_dir, train_iters=10_000, log_interval=1, checkpoint_factor=100_000)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while len(_train_steps(run_dir)) < 3 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert "stop signal (SIGTERM)" in out
    latest = (run_dir / "latest").read_text().strip()
    step = int(latest.removeprefix("global_step"))
    assert step >= 3 and step == max(_train_steps(run_dir))
    load_model_checkpoint(run_dir)  # complete and loadable


def test_nan_losses_stop_with_last_good_checkpoint(corpus, tmp_path, monkeypatch, capsys):
    """Batches from step 4 on carry a NaN loss weight: steps are skipped, then the run stops."""
    original = runner.build_pretraining

    def poisoned(*args, **kwargs):
        stage = original(*args, **kwargs)
        make = stage._train_batches

        def batches(start):
            for i, b in enumerate(make(start)):
                if i >= 3:
                    b = dict(b, loss_mask=b["loss_mask"] * float("nan"))
                yield b
        stage._train_batches = batches
        stage._it = batches(0)
        return stage

    monkeypatch.setattr(runner, "build_pretraining", poisoned)
    run_dir = tmp_path / "nan"
    assert train.main(["-c", str(ROOT / "configs/tiny/neox.yml"),
                       *_overrides(corpus, run_dir, train_iters=20, max_nonfinite_losses=2, checkpoint_factor=2)]) == 1
    captured = capsys.readouterr()
    out = captured.out
    assert captured.err.startswith("training stopped: ") and "max_nonfinite_losses=2" in captured.err
    assert "step 4: loss is nan; update skipped (1 of 2 tolerated)" in out
    assert (run_dir / "latest").read_text().strip() == "global_step5"  # steps 4-5 skipped: weights of step 3
    _, sd5 = load_model_checkpoint(run_dir)
    _, sd2 = load_model_checkpoint(run_dir, step=2)
    assert all(torch.isfinite(t).all() for t in sd5.values())
    assert any(not torch.equal(sd5[k], sd2[k]) for k in sd5)  # step 3 did train


def test_checkpoint_of_another_shape_is_refused(corpus, tmp_path, capsys):
    run_dir = tmp_path / "shape"
    assert train.main(["-c", str(ROOT / "configs/tiny/neox.yml"), *_overrides(corpus, run_dir, train_iters=2)]) == 0
    capsys.readouterr()
    assert train.main(["-c", str(ROOT / "configs/tiny/neox.yml"),
                       *_overrides(corpus, tmp_path / "other", hidden_size=32, load=str(run_dir))]) == 2
    err = capsys.readouterr().err
    assert err.startswith("checkpoint error: ") and re.search(r"tensor 'embed.weight'.*another model shape", err)


def test_unexpected_exception_reaches_torchrun_error_file(tmp_path):
    """A bug (not a config/checkpoint/NaN error) keeps its traceback, and train.py's @record writes it to
    the error file torchrun reads for its failure summary."""
    err_file = tmp_path / "error.json"
    code = ("import sys, runpy; import neox.training.runner as r\n"
            "def boom(*a, **k): raise ZeroDivisionError('a bug inside pretrain')\n"
            "r.pretrain = boom\n"
            f"sys.argv = ['train.py', '-c', {str(ROOT / 'configs/tiny/neox.yml')!r}]\n"
            f"runpy.run_path({str(ROOT / 'train.py')!r}, run_name='__main__')\n")
    env = {**os.environ, "TORCHELASTIC_ERROR_FILE": str(err_file), "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120, stdin=subprocess.DEVNULL)
    assert proc.returncode != 0 and "ZeroDivisionError: a bug inside pretrain" in proc.stderr
    record = json.loads(err_file.read_text())
    assert "a bug inside pretrain" in json.dumps(record)

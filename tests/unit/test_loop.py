"""The loop's policies with a scripted Stage: non-finite losses, stop signals, pruning, metrics sinks."""

import json
import os
import signal
import sys
import types
from pathlib import Path

import pytest

from neox.training.loop import LoopSettings, NonFiniteLossError, prune_checkpoints, run
from neox.training.progress import ProgressLogger
from neox.training.sinks import WandbSink
from neox.training.stage import StepResult


class ScriptedStage:
    name = "scripted"

    def __init__(self, losses, on_step=None):
        self.losses, self.on_step, self.saved = losses, on_step or {}, []

    def train_step(self, step):
        if step in self.on_step:
            self.on_step[step]()
        return StepResult(loss=self.losses[step - 1], lr=1e-3, tokens=100, grad_norm=1.0)

    def evaluate(self, step):
        return {"loss": 1.0}

    def save(self, run_dir, step):
        self.saved.append(step)
        d = Path(run_dir) / f"global_step{step}"
        d.mkdir(parents=True, exist_ok=True)
        (Path(run_dir) / "latest").write_text(d.name)
        return d

    def load(self, path, step=None):
        return 0


class ListSink:
    def __init__(self):
        self.records, self.closed = [], False

    def log(self, kind, step, values):
        self.records.append((kind, step, dict(values)))

    def close(self):
        self.closed = True


def test_nonfinite_losses_are_skipped_then_stop_with_checkpoint(tmp_path, capsys):
    stage = ScriptedStage([3.0, 2.9, float("nan"), 2.8, float("inf"), float("nan"), 2.5])
    settings = LoopSettings(train_iters=7, save_dir=str(tmp_path), max_nonfinite_losses=2, log_interval=1)
    with pytest.raises(NonFiniteLossError) as e:
        run(stage, settings, ProgressLogger(7))
    assert "step 6" in str(e.value) and "global_step5" in str(e.value)
    assert stage.saved == [5]  # the weights after step 5 (its NaN update was skipped) are the last good ones
    out = capsys.readouterr().out
    assert "step 3: loss is nan; update skipped (1 of 2 tolerated)" in out


def test_stop_signal_saves_and_exits(tmp_path, capsys):
    stage = ScriptedStage([1.0] * 10, on_step={4: lambda: os.kill(os.getpid(), signal.SIGTERM)})
    summary = run(stage, LoopSettings(train_iters=10, save_dir=str(tmp_path), checkpoint_factor=100),
                  ProgressLogger(10))
    assert stage.saved == [4] and summary["last_step"] == 4 and "SIGTERM" in summary["stopped"]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handler restored


def test_exit_interval_and_checkpoint_factor(tmp_path):
    stage = ScriptedStage([1.0] * 10)
    summary = run(stage, LoopSettings(train_iters=10, save_dir=str(tmp_path), checkpoint_factor=2,
                                      exit_interval=5, extra_save_iters=[1]), ProgressLogger(10), start_step=2)
    assert stage.saved == [4, 6, 7] and summary["last_step"] == 7


def test_prune_keeps_newest_and_latest(tmp_path):
    for s in (1, 2, 3, 10, 20):
        (tmp_path / f"global_step{s}").mkdir()
    (tmp_path / "latest").write_text("global_step2")
    (tmp_path / "other").mkdir()
    removed = prune_checkpoints(tmp_path, 2)
    assert sorted(p.name for p in removed) == ["global_step1", "global_step3"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["global_step10", "global_step2", "global_step20",
                                                          "latest", "other"]


def test_progress_line_flops_mfu_and_sinks(tmp_path, capsys):
    sink = ListSink()
    logger = ProgressLogger(10, log_dir=tmp_path, sinks=[sink], flops_per_token=6e9, num_devices=2,
                            peak_flops=1e12)
    logger.step(1, 1000, loss=2.0, lr=1e-4, grad_norm=0.5, loss_scale=1024.0)
    logger.eval(1, 1.5)
    logger.close()
    line = capsys.readouterr().out.splitlines()[0]
    for part in ("step  1/10", "loss 2.0000", "lr 1.000e-04", "grad norm 0.500", "loss scale 1024",
                 "tok/s", "TFLOP/s/dev", "MFU", "ms/step", "ETA"):
        assert part in line, part
    kind, step, values = sink.records[0]
    assert kind == "train" and step == 1
    # 6e9 FLOPs/token * tokens/s / 2 devices; MFU against 1 TFLOP/s
    assert values["tflops_per_device"] == pytest.approx(values["tokens_per_s"] * 6e9 / 2 / 1e12)
    assert values["mfu"] == pytest.approx(values["tflops_per_device"])
    assert sink.records[1][0] == "eval" and sink.closed
    recs = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in recs] == ["train", "eval"]


def test_tensorboard_sink_writes_events(tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard not installed")
    from neox.training.sinks import TensorBoardSink

    sink = TensorBoardSink(tmp_path / "tb")
    sink.log("train", 1, {"loss": 2.0})
    sink.close()
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))


def test_wandb_sink_offline_without_credentials(monkeypatch):
    calls = {}

    class Run:
        def log(self, values, step):
            calls.setdefault("log", []).append((values, step))

        def finish(self):
            calls["finish"] = True

    fake = types.SimpleNamespace(init=lambda **kw: calls.setdefault("init", kw) and Run())
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    sink = WandbSink(project="p", group=None, name="n", config={"a": 1}, run_dir=None)
    sink.log("train", 3, {"loss": 1.0, "note": "x"})
    sink.close()
    assert calls["init"]["mode"] == "offline" and calls["init"]["config"] == {"a": 1}
    assert calls["log"] == [({"train/loss": 1.0}, 3)] and calls["finish"]


def test_real_wandb_offline_run(tmp_path, monkeypatch):
    """The real package, no network and no credentials: the run is written locally (offline mode)."""
    pytest.importorskip("wandb", reason="wandb not installed")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    sink = WandbSink(project="neox-test", group=None, name="offline", config={"lr": 1e-3}, run_dir=str(tmp_path))
    sink.log("train", 1, {"loss": 2.5})
    sink.log("train", 2, {"loss": 2.0})
    sink.close()
    runs = list(tmp_path.rglob("offline-run-*"))
    assert runs and any(p.suffix == ".wandb" for r in runs for p in r.iterdir())

"""What the user sees: one progress line per ``log_interval`` steps, and a JSON-lines metrics file."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path


def format_duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


def format_count(x: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.2f}{unit}"
    return f"{x:.0f}"


class ProgressLogger:
    """Prints ``step k/N | loss | lr | grad norm | tokens/s | time/step | ETA`` and appends every
    metric record to ``metrics.jsonl`` (when ``log_dir`` is given). Only rank 0 should print."""

    def __init__(self, total_steps: int, *, log_dir: str | Path | None = None, enabled: bool = True,
                 stream=None, sinks: list | None = None, flops_per_token: float | None = None,
                 num_devices: int = 1, peak_flops: float | None = None):
        self.total = total_steps
        self.enabled = enabled
        self.stream = stream or sys.stdout
        self.sinks = sinks or []
        # model FLOPs per trained token (Megatron's formula, neox.config.plan) -> TFLOP/s per device, MFU
        self.flops_per_token, self.num_devices, self.peak_flops = flops_per_token, num_devices, peak_flops
        self.metrics_path = None
        if log_dir is not None and enabled:
            Path(log_dir).mkdir(parents=True, exist_ok=True)
            self.metrics_path = Path(log_dir) / "metrics.jsonl"
        self._t0 = time.perf_counter()
        self._window_t = self._t0
        self._window_tokens = 0
        self._window_steps = 0

    def print(self, msg: str) -> None:
        if self.enabled:
            print(msg, file=self.stream, flush=True)

    def record(self, kind: str, step: int, **values) -> None:
        if not self.enabled:
            return
        for sink in self.sinks:
            sink.log(kind, step, values)
        if self.metrics_path is not None:
            rec = {"kind": kind, "step": step, "time": round(time.time(), 3), **values}
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(rec) + "\n")

    def step(self, step: int, tokens: int, *, loss: float, lr: float, grad_norm: float | None = None,
             log: bool = True, **extra) -> dict:
        """Account one finished optimizer step; print a line when ``log`` is true."""
        self._window_tokens += tokens
        self._window_steps += 1
        if not log:
            return {}
        now = time.perf_counter()
        dt = max(now - self._window_t, 1e-9)
        per_step = dt / self._window_steps
        tok_s = self._window_tokens / dt
        eta = per_step * (self.total - step)
        values = {"loss": loss, "lr": lr, "tokens_per_s": tok_s, "step_time_s": per_step, **extra}
        if grad_norm is not None:
            values["grad_norm"] = grad_norm
        if self.flops_per_token:
            values["tflops_per_device"] = tok_s * self.flops_per_token / self.num_devices / 1e12
            if self.peak_flops:
                values["mfu"] = values["tflops_per_device"] * 1e12 / self.peak_flops
        parts = [f"step {step:>{len(str(self.total))}}/{self.total}", f"loss {loss:.4f}", f"lr {lr:.3e}"]
        if grad_norm is not None:
            parts.append(f"grad norm {grad_norm:.3f}")
        for key, val in extra.items():
            parts.append(f"{key.replace('_', ' ')} {val:.4g}" if isinstance(val, float) else f"{key} {val}")
        parts.append(f"{format_count(tok_s)} tok/s")
        if "tflops_per_device" in values:
            parts.append(f"{values['tflops_per_device']:.3g} TFLOP/s/dev")
        if "mfu" in values:
            parts.append(f"MFU {100 * values['mfu']:.1f}%")
        parts += [f"{per_step * 1000:.0f} ms/step",
                  f"elapsed {format_duration(now - self._t0)}", f"ETA {format_duration(eta)}"]
        self.print(" | ".join(parts))
        self.record("train", step, **values)
        self._window_t, self._window_tokens, self._window_steps = now, 0, 0
        return values

    def eval(self, step: int, loss: float, **extra) -> None:
        ppl = math.exp(min(loss, 50.0))
        self.print(f"eval at step {step}: loss {loss:.4f} | perplexity {ppl:.2f}")
        self.record("eval", step, loss=loss, perplexity=ppl, **extra)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()
        self.sinks = []

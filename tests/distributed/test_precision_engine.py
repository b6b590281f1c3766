"""Mixed precision through the real training engine: bf16 tracks fp32; fp16 overflow skips the step
and lowers the loss scale on every rank, then training continues."""

from __future__ import annotations

import math

from megatron_ext.testing import run_distributed
from megatron_ext.topology import ParallelState
from neox.config import NeoXConfig
from neox.data.gpt_dataset import make_batch_iterator
from neox.training.engine import Engine

from .test_equivalence import STEPS, SyntheticSamples, _cfg, reference


def _train(cfg_dict: dict, tp: int, pp: int, steps: int = STEPS):
    cfg = NeoXConfig.from_dict(cfg_dict)
    ps = ParallelState.from_sizes(tp=tp, pp=pp)
    engine = Engine(cfg, ps, init_seed=cfg.training.seed)
    t = cfg.training
    for g in engine.optimizer.param_groups:
        g["lr"] = cfg.optimizer.lr
    it = make_batch_iterator(SyntheticSamples(steps * t.global_batch(ps.dp_size) + 8),
                             t.train_micro_batch_size_per_gpu, dp_rank=ps.dp_rank, dp_size=ps.dp_size)
    out = []
    for _ in range(steps):
        loss, res = engine.train_batch([next(it) for _ in range(t.gradient_accumulation_steps)])
        out.append((loss, res.skipped, res.loss_scale))
    return out


def test_bf16_tracks_fp32_tp2_pp2_dp2_zero1():
    base = dict(model_parallel_size=2, pipe_parallel_size=2, zero_stage=1, warmup=0.0, lr_decay_style="constant")
    fp32 = reference(_cfg(**base), dp=2)["losses"]
    cfg = _cfg(precision="bf16", **base)
    results = run_distributed(_train, 8, cfg.to_dict(), 2, 2, timeout=240)
    losses = [loss for loss, skipped, _ in results[0]]
    assert all(not skipped for _, skipped, _ in results[0])
    for a, b in zip(losses, fp32):
        assert abs(a - b) / b < 2e-2, (losses, fp32)  # bf16 has ~3 significant digits
    assert losses[-1] < losses[0]


def test_fp16_overflow_skips_and_lowers_scale():
    # 2**26 overflows fp16 gradients at once: the first steps are skipped while the scale halves
    cfg = _cfg(precision="fp16", initial_scale_power=26, hysteresis=1, loss_scale_window=1000,
               model_parallel_size=2, pipe_parallel_size=1, warmup=0.0, lr_decay_style="constant")
    results = run_distributed(_train, 4, cfg.to_dict(), 2, 1, 12, timeout=240)
    for r in results:
        assert r == results[0]  # every rank skips the same steps and holds the same scale
    steps = results[0]
    skipped = [s for _, s, _ in steps]
    scales = [sc for _, _, sc in steps]
    assert skipped[0] and not skipped[-1], steps
    first_ok = skipped.index(False)
    assert all(skipped[:first_ok]) and not any(skipped[first_ok:]), "overflows stop once the scale fits"
    assert scales[first_ok] < 2.0 ** 26
    for a, b in zip(scales[:first_ok], scales[1:first_ok + 1]):
        assert b == a / 2  # each overflow halves the scale (hysteresis 1)
    losses = [loss for loss, _, _ in steps[first_ok:]]
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0]

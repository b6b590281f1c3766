"""Exact resume in parallel layouts: stop at step k, restore from the checkpoint in fresh processes,
and every later loss equals the uninterrupted run's bit for bit (CPU, float32)."""

from __future__ import annotations

import pytest
import torch

from megatron_ext.testing import run_distributed
from megatron_ext.topology import ParallelState
from neox.checkpoint.training_state import load_checkpoint, save_checkpoint
from neox.config import NeoXConfig
from neox.data.gpt_dataset import make_batch_iterator
from neox.training.engine import Engine
from neox.training.optim import LRSchedule

from .test_equivalence import SyntheticSamples, _cfg

STEPS, STOP = 6, 3


def _run(cfg_dict: dict, tp: int, pp: int, vpp, run_dir: str, start: int, stop: int, resume: bool):
    cfg = NeoXConfig.from_dict(cfg_dict)
    ps = ParallelState.from_sizes(tp=tp, pp=pp, vpp=vpp)
    t, o = cfg.training, cfg.optimizer
    torch.manual_seed(t.seed)
    engine = Engine(cfg, ps, init_seed=t.seed)
    consumed = 0
    if resume:
        state = load_checkpoint(run_dir, model=list(engine.chunks), optimizer=engine.optimizer, ps=ps,
                                rng_tracker=engine.tracker)
        assert state["iteration"] == start
        consumed = state["consumed_samples"]
    sched = LRSchedule(lr=o.lr, min_lr=o.min_lr, decay_style=o.lr_decay_style,
                       decay_iters=o.decay_iters(t.train_iters), warmup=o.warmup_steps(t.train_iters))
    gb = t.global_batch(ps.dp_size)
    it = make_batch_iterator(SyntheticSamples(STEPS * gb + 8), t.train_micro_batch_size_per_gpu,
                             start_sample=consumed, dp_rank=ps.dp_rank, dp_size=ps.dp_size)
    losses = {}
    for step in range(start + 1, stop + 1):
        sched.apply(engine.optimizer, step)
        losses[step], _ = engine.train_batch([next(it) for _ in range(t.gradient_accumulation_steps)])
        consumed += gb
    if not resume:
        save_checkpoint(run_dir, stop, model=list(engine.chunks), optimizer=engine.optimizer, config=cfg, ps=ps,
                        rng_tracker=engine.tracker, trainer_state={"consumed_samples": consumed})
    return losses


@pytest.mark.parametrize("tp,pp,dp,vpp,extra", [
    (2, 2, 2, None, dict(zero_stage=1, sequence_parallel=True)),
    (1, 2, 2, 2, dict(no_weight_tying=False, hidden_dropout=0.1, attention_dropout=0.1)),
    (2, 1, 2, None, dict(precision="bf16", zero_stage=1)),
])
def test_resume_is_bitwise(tmp_path, tp, pp, dp, vpp, extra):
    cfg = _cfg(model_parallel_size=tp, pipe_parallel_size=pp, num_virtual_pipeline_stages=vpp, **extra).to_dict()
    n = tp * pp * dp
    full = run_distributed(_run, n, cfg, tp, pp, vpp, str(tmp_path / "full"), 0, STEPS, False, timeout=240)[0]
    first = run_distributed(_run, n, cfg, tp, pp, vpp, str(tmp_path / "part"), 0, STOP, False, timeout=240)[0]
    rest = run_distributed(_run, n, cfg, tp, pp, vpp, str(tmp_path / "part"), STOP, STEPS, True, timeout=240)[0]
    assert {**first, **rest} == full  # exact float equality, every step

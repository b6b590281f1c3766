"""Resharding a training checkpoint keeps training exactly on course.

Layout A trains 3 steps and saves, then continues 3 steps (losses LA). The checkpoint is resharded to
layout B (other TP / PP / DP, ZeRO on or off, vocab re-padded) and B continues 3 steps from it (LB).
The reference is A's own continuation: LB must equal LA within 1e-5 relative. A negative control
continues B with the weights but a fresh optimizer and must miss LA, so the check can fail.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from megatron_ext.testing import run_distributed
from megatron_ext.topology import ParallelState
from neox.checkpoint.io import load_model_checkpoint
from neox.checkpoint.reshard import reshard_checkpoint, stage_layer_ranges
from neox.checkpoint.training_state import load_checkpoint
from neox.data.gpt_dataset import make_batch_iterator
from neox.training.engine import Engine, pipeline_layout
from neox.training.optim import LRSchedule
from neox.training.pretrain import PretrainStage
from tests.distributed.test_equivalence import VOCAB, SyntheticSamples
from tests.distributed.test_equivalence import _cfg as _base_cfg

SAVE_AT, STEPS, GLOBAL_BATCH = 3, 6, 8


def _cfg(tp: int, pp: int, dp: int, **kw):
    """Same global batch (8 sequences) in every layout: micro 2 x accumulation (8 / (2 dp))."""
    base = dict(num_layers=4, model_parallel_size=tp, pipe_parallel_size=pp, train_iters=STEPS,
                train_micro_batch_size_per_gpu=2, gradient_accumulation_steps=GLOBAL_BATCH // (2 * dp))
    base.update(kw)
    return _base_cfg(**base)


def _stage(cfg, ps) -> PretrainStage:
    t, o = cfg.training, cfg.optimizer
    torch.manual_seed(t.seed)
    engine = Engine(cfg, ps, init_seed=t.seed)
    schedule = LRSchedule(lr=o.lr, min_lr=o.min_lr, decay_style=o.lr_decay_style,
                          decay_iters=o.decay_iters(t.train_iters), warmup=o.warmup_steps(t.train_iters))
    ds = SyntheticSamples(STEPS * GLOBAL_BATCH + 8)

    def batches(start: int):
        return make_batch_iterator(ds, t.train_micro_batch_size_per_gpu, start_sample=start,
                                   dp_rank=ps.dp_rank, dp_size=ps.dp_size)

    return PretrainStage(cfg, engine, schedule, train_batches=batches)


def _continue(stage: PretrainStage, start: int) -> list[float]:
    return [stage.train_step(step).loss for step in range(start + 1, STEPS + 1)]


def _train_and_save(cfg_dict: dict, run_dir: str) -> list[float]:
    from neox.config import NeoXConfig

    cfg = NeoXConfig.from_dict(cfg_dict)
    ps = ParallelState.from_sizes(tp=cfg.parallel.tp_size, pp=cfg.parallel.pp_size)
    stage = _stage(cfg, ps)
    for step in range(1, SAVE_AT + 1):
        assert not stage.train_step(step).skipped
    stage.save(run_dir, SAVE_AT)
    return _continue(stage, SAVE_AT)


def _load_and_continue(cfg_dict: dict, run_dir: str, control: bool) -> dict:
    from neox.config import NeoXConfig

    cfg = NeoXConfig.from_dict(cfg_dict)
    ps = ParallelState.from_sizes(tp=cfg.parallel.tp_size, pp=cfg.parallel.pp_size)
    stage = _stage(cfg, ps)
    start = stage.load(run_dir)
    out = {"start": start, "consumed": stage.consumed_samples, "losses": _continue(stage, start)}
    if control:
        out["control"] = _continue_with_fresh_optimizer(cfg, ps, run_dir, start)
    return out


def _continue_with_fresh_optimizer(cfg, ps, run_dir: str, start: int) -> list[float]:
    """The control: the checkpoint's weights and data position, a fresh optimizer state (must NOT match)."""
    fresh = _stage(cfg, ps)
    state = load_checkpoint(run_dir, model=list(fresh.engine.chunks), optimizer=None, ps=ps)
    fresh.consumed_samples = int(state["consumed_samples"])
    fresh._it = fresh._train_batches(fresh.consumed_samples)
    return _continue(fresh, start)


def _rel(a, b) -> float:
    a, b = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    return ((a - b).abs() / b.abs()).max().item()


def _check_weights_equal(src, dst):
    """The resharded model is the same model: real vocab rows and every other tensor bit-equal."""
    _, a = load_model_checkpoint(src)
    cfg_b, b = load_model_checkpoint(dst)
    assert set(a) == set(b)
    for name, t in a.items():
        if name in ("embed.weight", "lm_head.weight"):
            assert b[name].shape[0] == cfg_b.model.padded_vocab_size(cfg_b.parallel.tp_size)
            assert torch.equal(b[name][:VOCAB], t[:VOCAB]), name
            assert not b[name][t.shape[0]:].any()  # new padding rows are zero
        else:
            assert torch.equal(b[name], t), name


def _pair(tmp_path, name, a: dict, targets: list[tuple[dict, bool]]):
    cfg_a = _cfg(**a)
    run_a = tmp_path / f"{name}_A"
    world_a = a["tp"] * a["pp"] * a["dp"]
    la = run_distributed(_train_and_save, world_a, cfg_a.to_dict(), str(run_a), timeout=240)
    assert all(r == la[0] for r in la)
    la = la[0]
    for b, control in targets:
        run_b = tmp_path / f"{name}_tp{b['tp']}_pp{b['pp']}_dp{b['dp']}"
        reshard_checkpoint(run_a, run_b, tp=b["tp"], pp=b["pp"], dp=b["dp"])
        _check_weights_equal(run_a, run_b)
        res = run_distributed(_load_and_continue, b["tp"] * b["pp"] * b["dp"], _cfg(**b).to_dict(), str(run_b),
                              control, timeout=240)
        r0 = res[0]
        assert r0["start"] == SAVE_AT and r0["consumed"] == SAVE_AT * GLOBAL_BATCH
        assert all(r["losses"] == r0["losses"] for r in res)
        rel = _rel(r0["losses"], la)
        print(f"\n[reshard] {name} -> {b}: LB {r0['losses']} vs LA {la} (max rel {rel:.1e})")
        assert rel <= 1e-5, f"{name} -> {b}: losses after resharding {r0['losses']} vs original layout {la}"
        if control:
            miss = _rel(r0["control"], la)
            print(f"[reshard] control with a fresh optimizer: max rel {miss:.1e}")
            assert miss > 1e-4, f"a fresh optimizer should change the losses (rel {miss:.1e}); the test is blind"


def test_tp2_pp2_dp2_zero1_tied_to_tp1_pp2_plain_and_tp4_pp1_dp2_zero1(tmp_path):
    """ZeRO-1 source with a tied embedding split over two stages (its copy's state is read from the
    first stage); targets drop ZeRO and TP, or widen TP (vocab re-padded 256 -> 512 rows)."""
    _pair(tmp_path, "tied", dict(tp=2, pp=2, dp=2, zero_stage=1, no_weight_tying=False), [
        (dict(tp=1, pp=2, dp=1, zero_stage=0, no_weight_tying=False), True),
        (dict(tp=4, pp=1, dp=2, zero_stage=1, no_weight_tying=False), False),
    ])


def test_tp1_pp2_plain_untied_to_tp2_pp1_dp2_zero1(tmp_path):
    """Plain (torch optimizer) source without fp32 masters; ZeRO-1 target takes its masters from the
    weights and its shard of each moment; the untied head is re-sliced over TP."""
    _pair(tmp_path, "untied", dict(tp=1, pp=2, dp=1, zero_stage=0, no_weight_tying=True), [
        (dict(tp=2, pp=1, dp=2, zero_stage=1, no_weight_tying=True), False),
    ])


@pytest.mark.parametrize("pp,vpp,method", [(1, None, "uniform"), (2, None, "uniform"), (4, None, "uniform"),
                                           (2, 2, "uniform"), (2, None, "parameters"), (4, None, "parameters")])
def test_stage_layer_ranges_match_the_engine(pp, vpp, method):
    cfg = _base_cfg(pipe_partition_method=method, num_virtual_pipeline_stages=vpp)
    want = [pipeline_layout(cfg, SimpleNamespace(pp_size=pp, pp_rank=r, vpp_size=vpp or 1, tp_size=2))
            for r in range(pp)]
    assert stage_layer_ranges(cfg, 2, pp, vpp) == want

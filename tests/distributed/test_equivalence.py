"""The spine: every parallel layout trains the tiny GPT-NeoX to the same losses and parameters as one
process (float32, 5 optimizer steps, within 1e-5 relative).

Each rank runs the real training engine (neox.training.engine: pipeline schedule, DP buckets, ZeRO-1,
sequence parallel, activation checkpointing) on the same synthetic samples a single process sees, in
the same global order (Megatron's: DP rank r takes the r-th micro-batch of each chunk of B * dp).
"""

from __future__ import annotations

import time

import pytest
import torch

from megatron_ext.testing import run_distributed
from megatron_ext.topology import ParallelState
from neox.checkpoint.training_state import shard_state
from neox.config import NeoXConfig
from neox.data.gpt_dataset import make_batch_iterator
from neox.training.engine import Engine
from neox.training.optim import LRSchedule

VOCAB, SEQ, STEPS = 200, 16, 5
TIMINGS: dict[str, float] = {}


def _cfg(**kw) -> NeoXConfig:
    base = dict(num_layers=8, hidden_size=32, num_attention_heads=4, seq_length=SEQ, vocab_size=VOCAB,
                rotary_pct=0.5, gpt_j_residual=True, no_weight_tying=True, lr=1e-3, weight_decay=0.1,
                train_iters=STEPS, train_micro_batch_size_per_gpu=2, gradient_accumulation_steps=4,
                lr_decay_style="cosine", warmup=0.2, min_lr=1e-4, clip_grad=0.5, seed=7)
    base.update(kw)
    return NeoXConfig.from_dict(base)


class SyntheticSamples:
    """Deterministic GPT samples: sample i depends only on i (like an indexed dataset)."""

    def __init__(self, n: int):
        g = torch.Generator().manual_seed(1234)
        self.data = torch.randint(0, VOCAB, (n, SEQ + 1), generator=g)

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        row = self.data[i]
        return {"tokens": row[:-1], "labels": row[1:], "loss_mask": torch.ones(SEQ)}


def train(cfg: NeoXConfig, ps: ParallelState) -> dict:
    """Train STEPS steps on this rank; return losses and this rank's parameter shards."""
    t, o = cfg.training, cfg.optimizer
    torch.manual_seed(t.seed)
    engine = Engine(cfg, ps, init_seed=t.seed)
    schedule = LRSchedule(lr=o.lr, min_lr=o.min_lr, decay_style=o.lr_decay_style,
                          decay_iters=o.decay_iters(t.train_iters), warmup=o.warmup_steps(t.train_iters))
    ds = SyntheticSamples(STEPS * t.global_batch(ps.dp_size) + 8)
    it = make_batch_iterator(ds, t.train_micro_batch_size_per_gpu, dp_rank=ps.dp_rank, dp_size=ps.dp_size)
    losses = []
    for step in range(1, STEPS + 1):
        schedule.apply(engine.optimizer, step)
        loss, res = engine.train_batch([next(it) for _ in range(t.gradient_accumulation_steps)])
        assert not res.skipped
        losses.append(loss)
    tensors, partition = shard_state(list(engine.chunks))
    return {"losses": losses, "tp": ps.tp_rank, "pp": ps.pp_rank, "dp": ps.dp_rank,
            "tensors": tensors, "partition": partition}


def _rank_main(cfg_dict: dict, tp: int, pp: int, vpp: int | None):
    ps = ParallelState.from_sizes(tp=tp, pp=pp, vpp=vpp)
    return train(NeoXConfig.from_dict(cfg_dict), ps)


def _assemble(results: list[dict]) -> dict[str, torch.Tensor]:
    """Full tensors from DP rank 0's shards: concatenate TP shards along each tensor's partition dim."""
    parts: dict[str, list] = {}
    dims: dict[str, int | None] = {}
    for r in results:
        if r["dp"] != 0:
            continue
        for name, t in r["tensors"].items():
            parts.setdefault(name, []).append((r["tp"], t))
            dims[name] = r["partition"][name]
    full = {}
    for name, lst in parts.items():
        lst.sort(key=lambda x: x[0])
        full[name] = lst[0][1] if dims[name] is None else torch.cat([t for _, t in lst], dim=dims[name])
    return full


_REFERENCE: dict[str, dict] = {}


def reference(cfg: NeoXConfig, dp: int) -> dict:
    """One process, same global batch: micro-batch B * dp with the same accumulation steps."""
    key = repr(sorted(cfg.to_dict().items())) + f"dp{dp}"
    if key not in _REFERENCE:
        d = cfg.to_dict()
        d.update(train_micro_batch_size_per_gpu=cfg.training.train_micro_batch_size_per_gpu * dp,
                 model_parallel_size=1, pipe_parallel_size=1, num_virtual_pipeline_stages=None,
                 sequence_parallel=False, zero_stage=0, pipeline_schedule="1f1b")
        ref = train(NeoXConfig.from_dict(d), ParallelState.single())
        _REFERENCE[key] = {"losses": ref["losses"], "params": ref["tensors"]}
    return _REFERENCE[key]


def comparable(pname: str, t: torch.Tensor, cfg: NeoXConfig) -> torch.Tensor:
    """The part of a parameter whose value is determined by the math, not by rounding noise.

    Padded vocabulary rows depend on the TP size (never used). The attention KEY bias outside the
    rotary dimensions has an exactly zero gradient (q.b_k is then the same for every key, and softmax
    ignores constants; see test_key_bias_gradient_is_zero), so Adam turns pure float rounding noise into
    its updates: those entries are excluded. Everything else is compared.
    """
    if pname in ("embed.weight", "lm_head.weight"):
        return t[:VOCAB]
    if pname.endswith("attention.query_key_value.bias"):
        m = cfg.model
        t = t.view(m.num_attention_heads, 3, m.head_dim)  # [heads, (q, k, v), head_dim]
        keep = torch.ones_like(t, dtype=torch.bool)
        keep[:, 1, m.rotary_dim:] = False
        return t[keep]
    return t


def check_layout(name: str, *, tp: int, pp: int, dp: int, vpp: int | None = None, **cfg_kw):
    cfg = _cfg(model_parallel_size=tp, pipe_parallel_size=pp, num_virtual_pipeline_stages=vpp, **cfg_kw)
    ref = reference(cfg, dp)
    t0 = time.perf_counter()
    results = run_distributed(_rank_main, tp * pp * dp, cfg.to_dict(), tp, pp, vpp, timeout=240)
    TIMINGS[name] = time.perf_counter() - t0
    losses = results[0]["losses"]
    for r in results:  # every rank reports the same loss
        assert r["losses"] == losses
    ref_losses = torch.tensor(ref["losses"], dtype=torch.float64)
    rel = ((torch.tensor(losses, dtype=torch.float64) - ref_losses).abs() / ref_losses.abs()).max().item()
    assert rel <= 1e-5, f"{name}: losses {losses} vs single process {ref['losses']} (max rel {rel:.2e})"
    full = _assemble(results)
    assert set(full) == set(ref["params"]), f"{name}: parameter names differ"
    # The whole parameter vector within 1e-5 relative; each tensor within 5e-5 (Adam normalises every
    # element's step, so entries with tiny gradients carry float-rounding noise a little further).
    worst, diff2, ref2 = 0.0, 0.0, 0.0
    for pname, want in ref["params"].items():
        got = full[pname]
        assert got.shape[1:] == want.shape[1:], f"{name}: {pname} shape {tuple(got.shape)} vs {tuple(want.shape)}"
        got, want = comparable(pname, got, cfg).double(), comparable(pname, want, cfg).double()
        err = ((got - want).norm() / want.norm().clamp_min(1e-12)).item()
        worst = max(worst, err)
        diff2 += (got - want).square().sum().item()
        ref2 += want.square().sum().item()
        assert err <= 5e-5, f"{name}: {pname} differs from the single process (rel {err:.2e})"
    total = (diff2 / ref2) ** 0.5
    assert total <= 1e-5, f"{name}: parameters differ from the single process (rel {total:.2e})"
    print(f"\n[equivalence] {name}: {tp * pp * dp} ranks, max rel loss diff {rel:.2e}, "
          f"params rel diff {total:.2e} (worst tensor {worst:.2e}), {TIMINGS[name]:.1f} s")


# Each feature appears in at least one 8-rank layout together with the others.
LAYOUTS = {
    "tp2-pp2-dp2 sp zero1 1f1b": dict(tp=2, pp=2, dp=2, sequence_parallel=True, zero_stage=1),
    "tp2-pp2-dp2 interleaved tied": dict(tp=2, pp=2, dp=2, vpp=2, no_weight_tying=False),
    "tp4-pp2-dp1 sp interleaved": dict(tp=4, pp=2, dp=1, vpp=2, sequence_parallel=True),
    "tp1-pp4-dp2 zero1 gpipe": dict(tp=1, pp=4, dp=2, zero_stage=1, pipeline_schedule="gpipe"),
    "tp4-pp1-dp2 sp zero1 accum2": dict(tp=4, pp=1, dp=2, sequence_parallel=True, zero_stage=1,
                                        gradient_accumulation_steps=2),
    "tp2-pp4-dp1 act-ckpt sequential": dict(tp=2, pp=4, dp=1, checkpoint_activations=True, gpt_j_residual=False),
    "tp1-pp2-dp4 interleaved zero1": dict(tp=1, pp=2, dp=4, vpp=2, zero_stage=1),
    "tp2-pp1-dp4 tied sp act-ckpt": dict(tp=2, pp=1, dp=4, no_weight_tying=False, sequence_parallel=True,
                                         checkpoint_activations=True, checkpoint_num_layers=2),
    "tp1-pp1-dp8 zero1 accum1": dict(tp=1, pp=1, dp=8, zero_stage=1, gradient_accumulation_steps=1),
    "tp2-pp1-dp1": dict(tp=2, pp=1, dp=1),
    "tp1-pp2-dp1 tied 1f1b": dict(tp=1, pp=2, dp=1, no_weight_tying=False),
    "tp1-pp1-dp2 fsdp zero2": dict(tp=1, pp=1, dp=2, zero_stage=2),
    "tp1-pp1-dp4 fsdp zero3": dict(tp=1, pp=1, dp=4, zero_stage=3, gradient_accumulation_steps=2),
    "tp1-pp1-dp1 pp-free reference path": dict(tp=1, pp=1, dp=1),
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_matches_single_process(name):
    check_layout(name, **LAYOUTS[name])


def test_key_bias_gradient_is_zero():
    """Justifies `comparable`: the key bias gets no gradient (up to rounding), every other tensor does."""
    from neox.models.registry import build_model

    cfg = _cfg()
    model = build_model(cfg.model, ParallelState.single(), init_seed=3)
    batch = SyntheticSamples(4)[0]
    model.loss(model(batch["tokens"][None]), batch["labels"][None]).backward()
    m = cfg.model
    for i in range(m.num_layers):
        g = model.layers[str(i)].attention.query_key_value.bias.grad.view(m.num_attention_heads, 3, m.head_dim)
        zero, rest = g[:, 1, m.rotary_dim:], comparable("attention.query_key_value.bias", g, cfg)
        assert zero.abs().max() < 1e-5 * rest.abs().max()
        assert rest.abs().max() > 1e-4


def test_summary_of_timings():
    """Not a check: prints how long each layout took (pytest -s), for the closing note."""
    for name, secs in TIMINGS.items():
        print(f"[equivalence timing] {name}: {secs:.1f} s")

"""RWKV-4 through the 3D-parallel engine: every layout trains to the losses and parameters of one process.

Reuses the GPT-NeoX equivalence harness (tests/distributed/test_equivalence.py: same synthetic data,
engine, optimizer schedule, reference run and assembly of TP shards) with model_type rwkv. Each feature
appears in an 8-rank layout: TP (channel split of time/channel mixing), SP (token shift across sequence
shards), PP (1F1B, interleaved, GPipe), DP with ZeRO-1, activation checkpointing. Losses and the whole
parameter vector must match within 1e-5 relative, each tensor within 5e-5 -- except tensors that start
at exactly zero (RWKV zero-initialises att.key/receptance/output and ffn.receptance/value, and norm
biases are zero): their first gradients are tiny and partly cancelling, and Adam turns the rounding of
the gradient sum into full-size steps. Plain DP=2 (no model parallelism, only the summation order
changes) already spreads them by ~3e-4 after 5 steps, so they are held to 1e-3 each (and still count
in the 1e-5 whole-vector check). A small TP test checks the stateful (RNN) path against one process.
"""

from __future__ import annotations

import pytest
import torch

from megatron_ext.tensor_parallel import gather_from_tensor_parallel_region
from megatron_ext.testing import run_distributed
from megatron_ext.topology import ParallelState
from neox.config import ModelConfig
from neox.models.rwkv import RWKV
from neox.ops.wkv import prebuild
from tests.distributed import test_equivalence as eq

LAYOUTS = {
    "rwkv tp2-pp2-dp2 sp zero1 1f1b": dict(tp=2, pp=2, dp=2, sequence_parallel=True, zero_stage=1),
    "rwkv tp4-pp2-dp1 sp interleaved": dict(tp=4, pp=2, dp=1, vpp=2, sequence_parallel=True),
    "rwkv tp1-pp4-dp2 gpipe": dict(tp=1, pp=4, dp=2, pipeline_schedule="gpipe"),
    "rwkv tp2-pp1-dp4 act-ckpt": dict(tp=2, pp=1, dp=4, checkpoint_activations=True, checkpoint_num_layers=2),
}


@pytest.fixture(scope="module", autouse=True)
def _built_wkv():
    prebuild("cpu")  # build/load the extension once, before ranks fork


def check_rwkv_layout(name: str, *, tp: int, pp: int, dp: int, vpp: int | None = None, **cfg_kw) -> None:
    cfg = eq._cfg(model_parallel_size=tp, pipe_parallel_size=pp, num_virtual_pipeline_stages=vpp,
                  model_type="rwkv", num_layers=4, **cfg_kw)
    ref = eq.reference(cfg, dp)
    results = run_distributed(eq._rank_main, tp * pp * dp, cfg.to_dict(), tp, pp, vpp, timeout=240)
    losses = results[0]["losses"]
    assert all(r["losses"] == losses for r in results), "ranks report different losses"
    want_losses = torch.tensor(ref["losses"], dtype=torch.float64)
    rel = ((torch.tensor(losses, dtype=torch.float64) - want_losses).abs() / want_losses.abs()).max().item()
    assert rel <= 1e-5, f"{name}: losses {losses} vs single process {ref['losses']} (max rel {rel:.2e})"
    full = eq._assemble(results)
    assert set(full) == set(ref["params"]), f"{name}: parameter names differ"
    init = RWKV(cfg.model, ParallelState.single(), init_seed=cfg.training.seed).state_dict()
    diff2 = ref2 = 0.0
    for pname, want in ref["params"].items():
        got, want = eq.comparable(pname, full[pname], cfg).double(), eq.comparable(pname, want, cfg).double()
        err = ((got - want).norm() / want.norm().clamp_min(1e-12)).item()
        tol = 1e-3 if not init[pname].any() else 5e-5
        assert err <= tol, f"{name}: {pname} differs from the single process (rel {err:.2e} > {tol})"
        diff2 += (got - want).square().sum().item()
        ref2 += want.square().sum().item()
    total = (diff2 / ref2) ** 0.5
    assert total <= 1e-5, f"{name}: parameters differ from the single process (rel {total:.2e})"
    print(f"\n[rwkv equivalence] {name}: max rel loss diff {rel:.2e}, params rel diff {total:.2e}")


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_rwkv_layout_matches_single_process(name):
    check_rwkv_layout(name, **LAYOUTS[name])


def _cfg() -> ModelConfig:
    return ModelConfig(model_type="rwkv", num_layers=2, hidden_size=16, seq_length=8, vocab_size=50,
                       no_weight_tying=True)


def _perturbed(ps: ParallelState) -> RWKV:
    """The same perturbed weights on any TP size: noise is drawn for the full tensor, then sliced."""
    model = RWKV(_cfg(), ps, init_seed=3).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            dim = p.tp_partition_dim
            shape = list(p.shape)
            if dim is not None:
                shape[dim] *= ps.tp_size
            if name in ("embed.weight", "lm_head.weight"):  # rows past the real vocab: TP-dependent padding
                noise = torch.randn(50, 16, generator=g) * 0.3
                noise = torch.cat([noise, noise.new_zeros(shape[0] - 50, 16)])
            else:
                noise = torch.randn(shape, generator=g) * 0.3
            p.add_(noise.chunk(ps.tp_size, dim)[ps.tp_rank] if dim is not None else noise)
    return model


def _rnn_run(ps: ParallelState):
    model = _perturbed(ps)
    ids = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full, state = model(ids[:, :5], return_state=True)  # parallel prefix, then RNN steps
        steps = []
        for t in range(5, 8):
            logits, state = model.forward_rnn(ids[:, t], state)
            steps.append(logits)
        local = torch.cat([full, torch.stack(steps, 1)], 1)  # [B, T, Vpad/tp]
        return gather_from_tensor_parallel_region(local, ps)[..., :50]


def _rank(tp: int):
    return _rnn_run(ParallelState.from_sizes(tp=tp))


def test_tensor_parallel_rnn_mode_matches_single_process():
    want = _rnn_run(ParallelState.single())
    for got in run_distributed(_rank, 2, 2, timeout=120):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)

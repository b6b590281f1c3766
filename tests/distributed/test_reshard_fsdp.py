"""FSDP (ZeRO-2/3) optimizer state reshards both ways and keeps training on course.

As in test_reshard.py, layout A trains 3 steps, saves, and continues 3 steps (losses LA, final
weights WA): that continuation is the independent reference. The checkpoint is resharded (FSDP
shards -> universal state -> another DP size, ZeRO-1, FSDP or one process) and each target continues
3 steps from it; its losses and final weights must match A's. The model has hidden size 30, so at DP4
FSDP2's dim-0 chunks are uneven (qkv rows 90 -> 23, 23, 23, 21; norms 30 -> 8, 8, 8, 6). A control
continues with the weights but a fresh optimizer and must miss LA, so the check can fail.

Tolerance: a resharded target reduces gradients in another order than A (FSDP's reduce-scatter vs
bucketed all-reduce vs one process summing micro-batches), so float32 results agree to rounding, not
bit for bit: losses within 1e-6 relative, weights within 1e-6 relative + 1e-7 absolute (weights are
~0.02; the largest difference seen is 2.4e-8, on elements near zero such as biases, where a relative
bound alone would be meaningless). Resuming FSDP at its own layout from its native files is exact.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn

from megatron_ext.testing import run_distributed
from megatron_ext.topology import ParallelState
from neox.checkpoint.reshard import reshard_checkpoint
from neox.checkpoint.training_state import shard_state
from tests.distributed.test_reshard import (
    GLOBAL_BATCH,
    SAVE_AT,
    _cfg,
    _check_weights_equal,
    _continue,
    _continue_with_fresh_optimizer,
    _rel,
    _stage,
)

UNEVEN = dict(hidden_size=30, num_attention_heads=3, rotary_pct=1.0)  # head_dim 10


def _layout_cfg(lay: dict):
    return _cfg(**lay, **UNEVEN)


def _weights(stage) -> dict | None:
    tensors, _ = shard_state(list(stage.engine.chunks))  # gathers FSDP shards: every rank calls it
    return tensors if dist.get_rank() == 0 else None


def _train_and_save(cfg_dict: dict, run_dir: str) -> dict:
    from neox.config import NeoXConfig

    cfg = NeoXConfig.from_dict(cfg_dict)
    ps = ParallelState.from_sizes(tp=cfg.parallel.tp_size, pp=cfg.parallel.pp_size)
    stage = _stage(cfg, ps)
    for step in range(1, SAVE_AT + 1):
        assert not stage.train_step(step).skipped
    stage.save(run_dir, SAVE_AT)
    return {"losses": _continue(stage, SAVE_AT), "weights": _weights(stage)}


def _load_and_continue(cfg_dict: dict, run_dir: str, control: bool) -> dict:
    from neox.config import NeoXConfig

    cfg = NeoXConfig.from_dict(cfg_dict)
    ps = ParallelState.from_sizes(tp=cfg.parallel.tp_size, pp=cfg.parallel.pp_size)
    stage = _stage(cfg, ps)
    assert stage.engine.fsdp == (cfg.parallel.zero_stage >= 2 and ps.dp_size > 1)
    start = stage.load(run_dir)
    out = {"start": start, "consumed": stage.consumed_samples, "losses": _continue(stage, start),
           "weights": _weights(stage)}
    if control:
        out["control"] = _continue_with_fresh_optimizer(cfg, ps, run_dir, start)
    return out


def _check(tag: str, got: dict, ref: dict, exact: bool = False) -> None:
    assert got["start"] == SAVE_AT and got["consumed"] == SAVE_AT * GLOBAL_BATCH
    rel = _rel(got["losses"], ref["losses"])
    print(f"\n[reshard-fsdp] {tag}: losses {got['losses']} vs {ref['losses']} (max rel {rel:.1e})")
    assert got["weights"].keys() == ref["weights"].keys()
    for name, want in ref["weights"].items():
        if exact:
            assert torch.equal(got["weights"][name], want), f"{tag}: {name}"
        else:
            torch.testing.assert_close(got["weights"][name], want, rtol=1e-6, atol=1e-7, msg=f"{tag}: {name}")
    if exact:
        assert got["losses"] == ref["losses"], tag
    else:
        assert rel <= 1e-6, f"{tag}: losses {got['losses']} vs the original layout's {ref['losses']}"
    if "control" in got:
        miss = _rel(got["control"], ref["losses"])
        print(f"[reshard-fsdp] {tag} control with a fresh optimizer: max rel {miss:.1e}")
        assert miss > 1e-4, f"a fresh optimizer should change the losses (rel {miss:.1e}); the test is blind"


def _source(tmp_path, name: str, lay: dict) -> tuple:
    run_a = tmp_path / name
    res = run_distributed(_train_and_save, lay["dp"], _layout_cfg(lay).to_dict(), str(run_a), timeout=120)
    assert all(r["losses"] == res[0]["losses"] for r in res)
    return run_a, res[0]


def _target(tmp_path, run_a, ref: dict, lay: dict, control: bool = False) -> None:
    run_b = tmp_path / f"{run_a.name}_to_dp{lay['dp']}_zero{lay['zero_stage']}"
    reshard_checkpoint(run_a, run_b, tp=1, pp=1, dp=lay["dp"])
    _check_weights_equal(run_a, run_b)
    res = run_distributed(_load_and_continue, lay["dp"], _layout_cfg(lay).to_dict(), str(run_b), control,
                          timeout=120)
    assert all(r["losses"] == res[0]["losses"] for r in res)
    _check(f"{run_a.name} -> dp{lay['dp']} zero{lay['zero_stage']}", res[0], ref)


def test_fsdp_zero3_dp4_to_zero1_dp2_fsdp_dp2_and_one_process(tmp_path):
    src = dict(tp=1, pp=1, dp=4, zero_stage=3)
    run_a, ref = _source(tmp_path, "zero3_dp4", src)
    # the native files resume exactly at their own layout
    same = run_distributed(_load_and_continue, 4, _layout_cfg(src).to_dict(), str(run_a), False, timeout=120)
    _check("zero3 dp4 native resume", same[0], ref, exact=True)
    with pytest.raises(RuntimeError, match=r"data-parallel size 4 \(this run: 2\).*tools/reshard.py"):
        run_distributed(_load_and_continue, 2, _layout_cfg(dict(tp=1, pp=1, dp=2, zero_stage=3)).to_dict(),
                        str(run_a), False, timeout=120)  # native files are per layout: reshard first
    _target(tmp_path, run_a, ref, dict(tp=1, pp=1, dp=2, zero_stage=1), control=True)
    _target(tmp_path, run_a, ref, dict(tp=1, pp=1, dp=2, zero_stage=3), control=True)
    _target(tmp_path, run_a, ref, dict(tp=1, pp=1, dp=1, zero_stage=0))


def test_fsdp_zero2_dp2_to_fsdp_zero3_dp4_and_one_process(tmp_path):
    run_a, ref = _source(tmp_path, "zero2_dp2", dict(tp=1, pp=1, dp=2, zero_stage=2))
    _target(tmp_path, run_a, ref, dict(tp=1, pp=1, dp=4, zero_stage=3))
    _target(tmp_path, run_a, ref, dict(tp=1, pp=1, dp=1, zero_stage=0))


def test_zero1_dp2_to_fsdp_zero3_dp4(tmp_path):
    run_a, ref = _source(tmp_path, "zero1_dp2", dict(tp=1, pp=1, dp=2, zero_stage=1))
    _target(tmp_path, run_a, ref, dict(tp=1, pp=1, dp=4, zero_stage=3), control=True)


# ------------------------------------------------------- shard ranges against FSDP2 itself
def _shard_ranges():
    """Real FSDP2 over 4 ranks on tensors with 3 and 5 rows: uneven chunks and empty last shards."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from neox.checkpoint.training_state import _as_fsdp_shard, fsdp_shard

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 5))
    fully_shard(model, mesh=init_device_mesh("cpu", (dist.get_world_size(),)))
    out = {}
    for name, p in model.named_parameters():
        lo, hi, local = fsdp_shard(p)
        full = p.full_tensor().detach()
        assert torch.equal(p.to_local().detach(), full.reshape(-1)[lo:hi].view(local)), name  # FSDP's own shard
        assert torch.equal(_as_fsdp_shard(full.reshape(-1)[lo:hi].view(local), p).full_tensor(), full), name
        out[name] = local[0]
    return out


def test_fsdp_shard_matches_fsdp2_chunking():
    rows = run_distributed(_shard_ranges, 4, timeout=60)
    assert [r["0.weight"] for r in rows] == [1, 1, 1, 0]  # 3 rows: torch.chunk gives 1, 1, 1 and none
    assert [r["1.weight"] for r in rows] == [2, 2, 1, 0]  # 5 rows: 2, 2, 1 and none
    assert [r["1.bias"] for r in rows] == [2, 2, 1, 0]

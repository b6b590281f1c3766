"""Pipeline schedules run on gloo ranks equal one process running the same layers on the same data.

Toy model: 8 x (Linear(D, D) + tanh), MSE loss on the last stage, built from one seed on every rank.
Each child runs every (schedule, vpp, microbatches) case and compares, in the child, its losses and
its layers' gradients with a plain single-process loop over the microbatches.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from megatron_ext.pipeline import get_schedule, partition_layers, run_schedule
from megatron_ext.testing import run_distributed
from megatron_ext.topology import ParallelState

L, B, T, D = 8, 2, 3, 16
TOL = 1e-6
SCHEDULES = ("gpipe", "1f1b", "interleaved", "forward_only")


def _layers() -> list[nn.Linear]:
    torch.manual_seed(0)
    return [nn.Linear(D, D) for _ in range(L)]


def _batch(mb: int, dp_rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * dp_rank + mb)
    return torch.randn(B, T, D, generator=g), torch.randn(B, T, D, generator=g)  # [B, T, D] input, target


def _reference(m: int, dp_rank: int):
    """Single process: per-microbatch losses, final grads, and grads before the last microbatch."""
    layers = _layers()
    losses, partial = [], None
    for mb in range(m):
        if mb == m - 1:
            partial = [None if lin.weight.grad is None else lin.weight.grad.clone() for lin in layers]
        h, target = _batch(mb, dp_rank)
        for lin in layers:
            h = torch.tanh(lin(h))
        loss = F.mse_loss(h, target) / m
        loss.backward()
        losses.append(loss.detach())
    return losses, [(lin.weight.grad, lin.bias.grad) for lin in layers], partial


def _run_case(ps: ParallelState, name: str, vpp: int, m: int) -> dict:
    layers = _layers()
    ranges = partition_layers(L, ps.pp_size, vpp)[ps.pp_rank]  # [(start, stop)] per local chunk
    chunks = [nn.ModuleList(layers[a:b]) for a, b in ranges]
    last = ps.pp_rank == ps.pp_size - 1

    def forward_step(c: int, mb: int, x):
        inp, target = _batch(mb, ps.dp_rank)
        h = inp if x is None else x
        for lin in chunks[c]:
            h = torch.tanh(lin(h))
        if last and c == vpp - 1:
            return F.mse_loss(h, target) / m
        return h

    ref_losses, ref_grads, ref_partial = _reference(m, ps.dp_rank)
    hook_errors = []

    def on_last_backward(c: int):  # must fire once per chunk, before the last microbatch's backward
        a = ranges[c][0]
        got, want = chunks[c][0].weight.grad, ref_partial[a]
        hook_errors.append((c, (got - want).abs().max().item() if got is not None and want is not None else 1.0))

    fwd_only = name == "forward_only"
    actions = get_schedule(name, ps.pp_size, ps.pp_rank, m, vpp)
    losses = run_schedule(actions, ps=ps, chunks=chunks, forward_step=forward_step, num_microbatches=m,
                          tensor_shape=(B, T, D), dtype=torch.float32, device="cpu", forward_only=fwd_only,
                          on_last_backward=None if fwd_only else on_last_backward)
    out = {"n_losses": len(losses), "loss": 0.0, "grad": 0.0}
    if last:
        out["loss"] = max((a - b).abs().item() for a, b in zip(losses, ref_losses))
    mine = [i for a, b in ranges for i in range(a, b)]
    if fwd_only:
        out["grad"] = float(any(p.grad is not None for i in mine for p in layers[i].parameters()))
    else:
        diffs = [(p.grad - r).abs().max().item() for i in mine for p, r in zip((layers[i].weight, layers[i].bias),
                                                                                 ref_grads[i])]
        out["grad"] = max(diffs)
        out["hooks"] = sorted(c for c, _ in hook_errors)
        out["hook_err"] = max(e for _, e in hook_errors)
    return out


def _worker(pp: int, cases: list[tuple[str, int, int]]) -> dict:
    ps = ParallelState.from_sizes(tp=1, pp=pp)
    return {case: _run_case(ps, *case) for case in cases}


def _cases():
    return [(name, vpp, m) for name in SCHEDULES for vpp in (1, 2) for m in (4, 8)]


def _check(results: list[dict], pp: int, ranks_per_stage: int = 1) -> None:
    for rank, res in enumerate(results):
        pp_rank = rank // ranks_per_stage
        for (name, vpp, m), out in res.items():
            where = f"rank {rank} {name} vpp={vpp} M={m}"
            if pp_rank == pp - 1:
                assert out["n_losses"] == m, where
                assert out["loss"] < TOL, where
            else:
                assert out["n_losses"] == 0, where
            if name == "forward_only":
                assert out["grad"] == 0.0, f"{where}: forward_only left gradients"
            else:
                assert out["grad"] < TOL, f"{where}: grad diff {out['grad']}"
                assert out["hooks"] == list(range(vpp)), f"{where}: on_last_backward calls {out['hooks']}"
                assert out["hook_err"] < TOL, f"{where}: on_last_backward fired at the wrong time"


@pytest.mark.parametrize("pp", [2, 4])
def test_schedules_equal_single_process(pp):
    results = run_distributed(_worker, pp, pp, _cases(), timeout=60)
    _check(results, pp)


def test_pp2_dp2_independent_replicas():
    # 4 ranks, pp groups [0, 2] and [1, 3]: peers must be mapped to global ranks; each replica has its own data
    cases = [("1f1b", 1, 4), ("interleaved", 2, 4), ("forward_only", 2, 4)]

    def worker():
        ps = ParallelState.from_sizes(tp=1, pp=2, dp=2)
        assert ps.pp_ranks == [ps.dp_rank, 2 + ps.dp_rank]
        return {case: _run_case(ps, *case) for case in cases}

    results = run_distributed(worker, 4, timeout=60)
    _check(results, 2, ranks_per_stage=2)

"""Pipeline schedules run on gloo ranks equal one process running the same layers on the same data.

Toy model: 8 x (Linear(D, D) + tanh), MSE loss on the last stage, built from one seed on every rank.
Each child runs every (schedule, vpp, microbatches) case and compares, in the child, its losses and
its layers' gradients with a plain single-process loop over the microbatches.
"""

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from megatron_ext.pipeline import get_schedule, partition_layers, run_schedule
from megatron_ext.pipeline.p2p import send_recv_shapes
from megatron_ext.testing import run_distributed
from megatron_ext.topology import ParallelState

L, B, T, D = 8, 2, 3, 16
TOL = 1e-6
SCHEDULES = ("gpipe", "1f1b", "interleaved", "forward_only")


def _layers(device="cpu") -> list[nn.Linear]:
    torch.manual_seed(0)
    return [nn.Linear(D, D).to(device) for _ in range(L)]


def _batch(mb: int, dp_rank: int, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * dp_rank + mb)
    x, target = torch.randn(B, T, D, generator=g), torch.randn(B, T, D, generator=g)  # [B, T, D]
    return x.to(device), target.to(device)


def _reference(m: int, dp_rank: int, device="cpu"):
    """Single process: per-microbatch losses, final grads, and grads before the last microbatch."""
    layers = _layers(device)
    losses, partial = [], None
    for mb in range(m):
        if mb == m - 1:
            partial = [None if lin.weight.grad is None else lin.weight.grad.clone() for lin in layers]
        h, target = _batch(mb, dp_rank, device)
        for lin in layers:
            h = torch.tanh(lin(h))
        loss = F.mse_loss(h, target) / m
        loss.backward()
        losses.append(loss.detach())
    return losses, [(lin.weight.grad, lin.bias.grad) for lin in layers], partial


def _run_case(ps: ParallelState, name: str, vpp: int, m: int, device="cpu") -> dict:
    layers = _layers(device)
    ranges = partition_layers(L, ps.pp_size, vpp)[ps.pp_rank]  # [(start, stop)] per local chunk
    chunks = [nn.ModuleList(layers[a:b]) for a, b in ranges]
    last = ps.pp_rank == ps.pp_size - 1

    def forward_step(c: int, mb: int, x):
        inp, target = _batch(mb, ps.dp_rank, device)
        h = inp if x is None else x
        for lin in chunks[c]:
            h = torch.tanh(lin(h))
        if last and c == vpp - 1:
            return F.mse_loss(h, target) / m
        return h

    ref_losses, ref_grads, ref_partial = _reference(m, ps.dp_rank, device)
    hook_errors = []

    def on_last_backward(c: int):  # must fire once per chunk, before the last microbatch's backward
        a = ranges[c][0]
        got, want = chunks[c][0].weight.grad, ref_partial[a]
        hook_errors.append((c, (got - want).abs().max().item() if got is not None and want is not None else 1.0))

    fwd_only = name == "forward_only"
    actions = get_schedule(name, ps.pp_size, ps.pp_rank, m, vpp)
    losses = run_schedule(actions, ps=ps, chunks=chunks, forward_step=forward_step, num_microbatches=m,
                          tensor_shape=(B, T, D), dtype=torch.float32, device=device, forward_only=fwd_only,
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
    # optional shape handshake along the chain: every stage tells the next one a shape of its own
    got = send_recv_shapes((ps.pp_rank + 1, 7), None if ps.is_last_stage else ps.next_pp_rank,
                           None if ps.is_first_stage else ps.prev_pp_rank, ps.pp_group)
    assert got == (None if ps.is_first_stage else (ps.pp_rank, 7)), got
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


def _released_outputs(pp: int) -> dict:
    """1F1B over residual layers (the add keeps no copy of its output): once sent, a stage's outputs hold
    one element each, and the gradients still equal one process's."""
    ps = ParallelState.from_sizes(tp=1, pp=pp)
    m, layers = 4, _layers()
    (a, b), = partition_layers(L, pp, 1)[ps.pp_rank]
    chunk, last = nn.ModuleList(layers[a:b]), ps.is_last_stage
    outs: dict[int, torch.Tensor] = {}

    def forward_step(c: int, mb: int, x):
        h, target = _batch(mb, ps.dp_rank)
        h = h if x is None else x
        for lin in chunk:
            h = lin(h) + h
        if last:
            return F.mse_loss(h, target) / m
        outs[mb] = h
        return h

    sizes = []
    run_schedule(get_schedule("1f1b", pp, ps.pp_rank, m), ps=ps, chunks=[chunk], forward_step=forward_step,
                 num_microbatches=m, tensor_shape=(B, T, D), dtype=torch.float32, device="cpu",
                 on_last_backward=lambda c: sizes.extend(o.untyped_storage().nbytes() for o in outs.values()))
    ref = _layers()
    for mb in range(m):
        h, target = _batch(mb, ps.dp_rank)
        for lin in ref:
            h = lin(h) + h
        (F.mse_loss(h, target) / m).backward()
    err = max((p.grad - r.grad).abs().max().item() for i in range(a, b)
              for p, r in zip(layers[i].parameters(), ref[i].parameters()))
    return {"sizes": sizes, "outs": len(outs), "err": err}


@pytest.mark.parametrize("pp", [2, 4])
def test_sent_outputs_release_their_values(pp):
    for rank, res in enumerate(run_distributed(_released_outputs, pp, pp, timeout=60)):
        assert res["err"] <= TOL, (rank, res)
        if rank < pp - 1:  # every output was sent before the stage's last backward
            assert res["outs"] == 4 and res["sizes"] == [4] * 4, (rank, res)


def test_pp2_dp2_independent_replicas():
    # 4 ranks, pp groups [0, 2] and [1, 3]: peers must be mapped to global ranks; each replica has its own data
    cases = [("1f1b", 1, 4), ("interleaved", 2, 4), ("forward_only", 2, 4)]

    def worker():
        ps = ParallelState.from_sizes(tp=1, pp=2, dp=2)
        assert ps.pp_ranks == [ps.dp_rank, 2 + ps.dp_rank]
        return {case: _run_case(ps, *case) for case in cases}

    results = run_distributed(worker, 4, timeout=60)
    _check(results, 2, ranks_per_stage=2)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL pipeline test needs 2 CUDA devices")
def test_schedules_nccl():
    # same checks with CUDA tensors over NCCL (tag-free, per-pair FIFO p2p); one GPU per rank
    cases = [("gpipe", 1, 4), ("1f1b", 1, 4), ("interleaved", 2, 4), ("forward_only", 2, 4)]

    def worker():
        device = torch.device("cuda", dist.get_rank())
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = False
        ps = ParallelState.from_sizes(tp=1, pp=2)
        return {case: _run_case(ps, *case, device=device) for case in cases}

    results = run_distributed(worker, 2, timeout=120, backend="nccl")
    _check(results, 2)

"""DataParallel (bucketed grad buffers) equals single-process training over the global batch."""


import pytest
import torch
import torch.distributed as dist
from torch import nn

from megatron_ext.data_parallel import DataParallel
from megatron_ext.testing import run_distributed
from megatron_ext.topology import ParallelState


def run(fn, world: int, *args):
    return run_distributed(fn, world, *args, timeout=60)  # results come back through torch.save


GLOBAL_BATCH, STEPS, LR = 24, 3, 1e-2


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4))


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(GLOBAL_BATCH, 8, generator=g), torch.randn(GLOBAL_BATCH, 4, generator=g)


def reference_training() -> tuple[list[float], list[torch.Tensor]]:
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.1)
    losses = []
    for step in range(STEPS):
        x, y = batch(step)
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, [p.detach().clone() for p in model.parameters()]


def dp_training(accum: int, bucket_size: int, optimizer_zero_grad: bool = False):
    ps = ParallelState.from_sizes(dp=dist.get_world_size())
    model = make_model()
    ddp = DataParallel(model, ps, bucket_size=bucket_size)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.1)
    per_rank = GLOBAL_BATCH // ps.dp_size
    losses, launched_early = [], []
    for step in range(STEPS):
        x, y = batch(step)
        mine = slice(ps.dp_rank * per_rank, (ps.dp_rank + 1) * per_rank)
        x, y = x[mine], y[mine]
        opt.zero_grad() if optimizer_zero_grad else ddp.zero_grad()  # set_to_none must also work
        local = torch.zeros(1)
        for i, (mb_x, mb_y) in enumerate(zip(x.chunk(accum), y.chunk(accum), strict=True)):
            ddp.set_is_last_microbatch(i == accum - 1)
            loss = nn.functional.mse_loss(ddp(mb_x), mb_y) / accum
            loss.backward()
            local += loss.detach()
        # overlap: the last micro-batch's backward already started every bucket's all-reduce
        launched_early.append(all(b.handle is not None for b in ddp.buckets))
        ddp.finish_grad_sync()
        opt.step()
        dist.all_reduce(local)
        losses.append(local.item() / ps.dp_size)
    return losses, [p.detach().clone() for p in model.parameters()], launched_early, len(ddp.buckets)


@pytest.mark.parametrize("world,accum,bucket_size,opt_zero", [
    (2, 1, 25_000_000, False),   # one bucket larger than all params
    (2, 3, 1, True),             # buckets smaller than one param -> one param per bucket
    (4, 1, 300, False),          # a few multi-param buckets
    (4, 3, 10 ** 9, True),
])
def test_dp_equals_single_process(world, accum, bucket_size, opt_zero):
    ref_losses, ref_params = reference_training()
    results = run(dp_training, world, accum, bucket_size, opt_zero)
    n_params = len(ref_params)
    for losses, params, launched_early, n_buckets in results:
        assert launched_early == [True] * STEPS
        if bucket_size == 1:
            assert n_buckets == n_params
        if bucket_size >= 10 ** 6:
            assert n_buckets == 1
        torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-6, atol=1e-7)
        for p, r in zip(params, ref_params, strict=True):
            torch.testing.assert_close(p, r, rtol=1e-6, atol=1e-7)


def _no_sync_and_unused():
    ps = ParallelState.from_sizes(dp=dist.get_world_size())
    model = make_model()
    model.unused = nn.Parameter(torch.ones(3))  # never gets a grad: its bucket launches in finish_grad_sync
    ddp = DataParallel(model, ps, bucket_size=1)
    x = torch.full((2, 8), float(ps.dp_rank + 1))
    with ddp.no_sync():
        ddp(x).sum().backward()
    no_sync_quiet = all(b.handle is None for b in ddp.buckets)
    ddp(x).sum().backward()
    ddp.finish_grad_sync()
    grads = [p.grad.clone() for p in model.parameters()]
    views = all(p.grad.data_ptr() >= ddp.buffers[0].data.data_ptr() for p in model.parameters())
    return no_sync_quiet, views, grads


def test_no_sync_unused_param_and_views():
    (q0, v0, g0), (q1, v1, g1) = run(_no_sync_and_unused, 2)
    assert q0 and q1 and v0 and v1
    # reference: both micro-batches of both ranks, summed per rank then averaged over ranks
    model = make_model()
    for r in (0, 1):
        model(torch.full((2, 8), float(r + 1))).sum().backward()
        model(torch.full((2, 8), float(r + 1))).sum().backward()
    ref = [torch.zeros(3)] + [p.grad / 2 for p in model.parameters()]  # own params come first
    for a, b, r in zip(g0, g1, ref, strict=True):
        torch.testing.assert_close(a, r, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(b, r, rtol=1e-6, atol=1e-7)


def test_dp_size_one_issues_no_collectives():
    # torch.distributed is not initialised here: any collective would raise
    ref_losses, ref_params = reference_training()
    model = make_model()
    ddp = DataParallel(model, ParallelState.single(), bucket_size=7)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.1)
    for step in range(STEPS):
        x, y = batch(step)
        ddp.zero_grad()
        with ddp.no_sync():
            (nn.functional.mse_loss(ddp(x[:12]), y[:12]) / 2).backward()
        (nn.functional.mse_loss(ddp(x[12:]), y[12:]) / 2).backward()
        ddp.finish_grad_sync()
        opt.step()
    for p, r in zip(model.parameters(), ref_params, strict=True):
        torch.testing.assert_close(p, r, rtol=1e-6, atol=1e-7)

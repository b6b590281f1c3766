"""ZeRO-1 DistributedOptimizer equals unsharded AdamW (params, losses, gathered optimizer state)."""

import copy

import pytest
import torch
import torch.distributed as dist
from torch import nn

from megatron_ext.data_parallel import DataParallel, DistributedOptimizer
from megatron_ext.testing import run_distributed
from megatron_ext.topology import ParallelState


def run(fn, world: int, *args):
    return run_distributed(fn, world, *args, timeout=60)  # results come back through torch.save


GLOBAL_BATCH, STEPS, LR, WD = 24, 3, 1e-2, 0.1


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4))


def groups(model: nn.Module) -> list[dict]:
    """Weight decay on matrices only (as gpt-neox): two groups with different options."""
    params = list(model.parameters())
    return [{"params": [p for p in params if p.dim() >= 2]},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


def batch(step: int):
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(GLOBAL_BATCH, 8, generator=g), torch.randn(GLOBAL_BATCH, 4, generator=g)


def reference():
    model = make_model()
    opt = torch.optim.AdamW(groups(model), lr=LR, weight_decay=WD)
    losses = []
    for step in range(STEPS):
        x, y = batch(step)
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    state = {n: opt.state[p] for n, p in model.named_parameters()}
    return losses, dict(model.named_parameters()), state


def _one_step(ddp, opt, ps, step, accum):
    per = GLOBAL_BATCH // ps.dp_size
    x, y = batch(step)
    x, y = x[ps.dp_rank * per:(ps.dp_rank + 1) * per], y[ps.dp_rank * per:(ps.dp_rank + 1) * per]
    opt.zero_grad()
    local = torch.zeros(1)
    for i, (mx, my) in enumerate(zip(x.chunk(accum), y.chunk(accum), strict=True)):
        ddp.set_is_last_microbatch(i == accum - 1)
        loss = nn.functional.mse_loss(ddp(mx), my) / accum
        loss.backward()
        local += loss.detach()
    ddp.finish_grad_sync()
    result = opt.step()
    dist.all_reduce(local)
    return local.item() / ps.dp_size, result


def zero_training(accum: int, bucket_size: int, reduce_scatter: bool):
    ps = ParallelState.from_sizes(dp=dist.get_world_size())
    model = make_model()
    ddp = DataParallel(model, ps, bucket_size=bucket_size, reduce_scatter=reduce_scatter)
    opt = DistributedOptimizer(ddp, torch.optim.AdamW, param_groups=groups(model), lr=LR, weight_decay=WD)
    n_local = sum(piece.master.numel() for piece in opt.pieces)
    losses, saved = [], None
    for step in range(STEPS):
        loss, result = _one_step(ddp, opt, ps, step, accum)
        assert not result.skipped
        losses.append(loss)
        if step == STEPS - 2:
            saved = copy.deepcopy(opt.state_dict())
    full_state = opt.gather_full_state()
    final = {n: p.detach().clone() for n, p in model.named_parameters()}

    # checkpoint round trip: a fresh model + optimizer loads the state after step STEPS-2, redoes the last
    model2 = make_model(seed=123)
    ddp2 = DataParallel(model2, ps, bucket_size=bucket_size, reduce_scatter=reduce_scatter)
    opt2 = DistributedOptimizer(ddp2, torch.optim.AdamW, param_groups=groups(model2), lr=LR, weight_decay=WD)
    opt2.load_state_dict(saved)
    _one_step(ddp2, opt2, ps, STEPS - 1, accum)
    resumed = {n: p.detach().clone() for n, p in model2.named_parameters()}
    return losses, final, full_state, resumed, n_local


@pytest.mark.parametrize("world,accum,bucket_size,reduce_scatter", [
    (2, 1, 25_000_000, True),
    (3, 2, 300, True),   # dp=3: buckets need padding
    (4, 2, 1, True),     # one param per bucket; 4-element biases give 1 element per rank
    (2, 3, 300, False),  # all-reduce then slice
])
def test_zero1_equals_unsharded(world, accum, bucket_size, reduce_scatter):
    ref_losses, ref_params, ref_state = reference()
    results = run(zero_training, world, accum, bucket_size, reduce_scatter)
    total = sum(p.numel() for p in ref_params.values())
    assert sum(r[4] for r in results) == total  # shards partition the parameters exactly
    assert max(r[4] for r in results) < total or world == 1
    for losses, final, full_state, resumed, _ in results:
        torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-6, atol=1e-7)
        for name, ref in ref_params.items():
            torch.testing.assert_close(final[name], ref.detach(), rtol=1e-6, atol=1e-7)
            torch.testing.assert_close(resumed[name], ref.detach(), rtol=1e-6, atol=1e-7)
            torch.testing.assert_close(full_state[name]["master"], ref.detach(), rtol=1e-6, atol=1e-7)
            for key in ("exp_avg", "exp_avg_sq"):
                torch.testing.assert_close(full_state[name][key], ref_state[name][key], rtol=1e-5, atol=1e-9)
            assert full_state[name]["step"] == float(ref_state[name]["step"])


def _zero_vs_plain_dp():
    ps = ParallelState.from_sizes(dp=dist.get_world_size())
    out = []
    for zero in (False, True):
        model = make_model()
        ddp = DataParallel(model, ps, bucket_size=100, reduce_scatter=zero)
        if zero:
            opt = DistributedOptimizer(ddp, torch.optim.SGD, lr=0.1, momentum=0.9)
        else:
            opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        for step in range(STEPS):
            _one_step(ddp, opt, ps, step, 1)
        out.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    return out


def test_zero1_equals_plain_dp_sgd():
    for plain, zero in run(_zero_vs_plain_dp, 2):
        torch.testing.assert_close(zero, plain, rtol=1e-6, atol=1e-7)

"""ZeRO-2/3 through FSDP2 on CPU/gloo: 2 ranks train like one process over the global batch."""


import pytest
import torch
import torch.distributed as dist
from torch import nn

from megatron_ext.data_parallel.fsdp import shard_model
from megatron_ext.testing import run_distributed
from megatron_ext.topology import ParallelState

GLOBAL_BATCH, STEPS, LR = 8, 3, 1e-2


def run(fn, world: int, *args):
    return run_distributed(fn, world, *args, timeout=60)  # results come back through torch.save


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4))


def batch(step: int):
    g = torch.Generator().manual_seed(300 + step)
    return torch.randn(GLOBAL_BATCH, 8, generator=g), torch.randn(GLOBAL_BATCH, 4, generator=g)


def reference():
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
    return losses, {n: p.detach().clone() for n, p in model.named_parameters()}


def _fsdp_training(stage: int):
    ps = ParallelState.from_sizes(dp=dist.get_world_size())
    model = shard_model(make_model(), ps, stage)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.1)
    per = GLOBAL_BATCH // ps.dp_size
    losses = []
    for step in range(STEPS):
        x, y = batch(step)
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x[ps.dp_rank * per:][:per]), y[ps.dp_rank * per:][:per])
        loss.backward()
        opt.step()
        total = loss.detach().clone()
        dist.all_reduce(total)
        losses.append(total.item() / ps.dp_size)
    full = {n: p.full_tensor().detach().clone() for n, p in model.named_parameters()}
    local_numel = sum(p.to_local().numel() for p in model.parameters())  # DTensor shards
    return losses, full, local_numel


@pytest.mark.parametrize("stage", [2, 3])
def test_fsdp_equals_single_process(stage):
    ref_losses, ref_params = reference()
    total = sum(p.numel() for p in ref_params.values())
    results = run(_fsdp_training, 2, stage)
    assert sum(r[2] for r in results) == total and all(r[2] < total for r in results)  # really sharded
    for losses, params, _ in results:
        torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-5, atol=1e-6)
        assert params.keys() == ref_params.keys()
        for name, ref in ref_params.items():
            torch.testing.assert_close(params[name], ref, rtol=1e-5, atol=1e-6)


def test_shard_model_rejects_tp_pp_and_bad_stage():
    ps = ParallelState(tp_size=2, world_size=2)
    with pytest.raises(ValueError, match="tp=1 and pp=1"):
        shard_model(make_model(), ps, 3)
    with pytest.raises(ValueError, match="stage must be 2 or 3"):
        shard_model(make_model(), ParallelState.single(), 1)

"""clip_grad_norm over TP x DP and TP x PP equals torch.nn.utils.clip_grad_norm_ on the unsplit model."""


import pytest
import torch
import torch.distributed as dist
from torch import nn

from megatron_ext.data_parallel import DataParallel, DistributedOptimizer, clip_grad_norm
from megatron_ext.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    gather_from_sequence_parallel_region,
    scatter_to_sequence_parallel_region,
)
from megatron_ext.testing import run_distributed
from megatron_ext.topology import ParallelState

MAX_NORM = 0.05
BATCH = 8


def run(fn, world: int, *args):
    return run_distributed(fn, world, *args, timeout=60)  # results come back through torch.save


class TPModel(nn.Module):
    def __init__(self, ps: ParallelState):
        super().__init__()
        torch.manual_seed(0)
        self.norm = nn.LayerNorm(8)  # replicated over TP (no tp_partition_dim attribute)
        self.fc1 = ColumnParallelLinear(8, 16, ps)  # weight/bias split (dim 0)
        self.fc2 = RowParallelLinear(16, 8, ps)  # weight split (dim 1), bias replicated
        with torch.no_grad():
            self.norm.weight.add_(0.1)

    def forward(self, x):
        return self.fc2(nn.functional.gelu(self.fc1(self.norm(x))))


def data():
    g = torch.Generator().manual_seed(7)
    return torch.randn(BATCH, 8, generator=g), torch.randn(BATCH, 8, generator=g)


def reference_tp():
    model = TPModel(ParallelState.single())
    x, y = data()
    nn.functional.mse_loss(model(x), y).backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM).item()
    return norm, {n: p.grad.clone() for n, p in model.named_parameters()}


def _tp_dp_clip():
    ps = ParallelState.from_sizes(tp=2, dp=2)
    x, y = data()
    per = BATCH // ps.dp_size
    x, y = x[ps.dp_rank * per:(ps.dp_rank + 1) * per], y[ps.dp_rank * per:(ps.dp_rank + 1) * per]

    model = TPModel(ps)
    ddp = DataParallel(model, ps, bucket_size=50)
    nn.functional.mse_loss(ddp(x), y).backward()
    ddp.finish_grad_sync()
    norm = clip_grad_norm(model.parameters(), MAX_NORM, ps)
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}

    # ZeRO-1: SGD(lr=1) moves each param by exactly its clipped grad
    model_z = TPModel(ps)
    ddp_z = DataParallel(model_z, ps, bucket_size=50, reduce_scatter=True)
    opt = DistributedOptimizer(ddp_z, torch.optim.SGD, lr=1.0, clip_grad=MAX_NORM)
    before = {n: p.detach().clone() for n, p in model_z.named_parameters()}
    nn.functional.mse_loss(ddp_z(x), y).backward()
    ddp_z.finish_grad_sync()
    result = opt.step()
    deltas = {n: before[n] - p.detach() for n, p in model_z.named_parameters()}
    dims = {n: getattr(p, "tp_partition_dim", None) for n, p in model.named_parameters()}
    return ps.tp_rank, norm, grads, result.grad_norm, deltas, dims


def test_clip_tp2_dp2_matches_torch():
    ref_norm, ref_grads = reference_tp()
    assert ref_norm > MAX_NORM  # the test must actually clip
    for tp_rank, norm, grads, zero_norm, deltas, dims in run(_tp_dp_clip, 4):
        assert abs(norm - ref_norm) <= 1e-6 * ref_norm
        assert abs(zero_norm - ref_norm) <= 1e-6 * ref_norm
        for name, ref in ref_grads.items():
            dim = dims[name]
            want = ref if dim is None else ref.chunk(2, dim=dim)[tp_rank]
            torch.testing.assert_close(grads[name], want, rtol=1e-5, atol=1e-8)
            torch.testing.assert_close(deltas[name], want, rtol=1e-4, atol=1e-7)


# ------------------------------------------------------------------ sequence parallelism under DP / ZeRO
class SPModel(nn.Module):
    """[T, B, 8] in and out; the norm and the row bias see only this TP rank's tokens (partial grads)."""

    def __init__(self, ps: ParallelState):
        super().__init__()
        torch.manual_seed(0)
        self.ps = ps
        self.norm = nn.LayerNorm(8)
        for p in self.norm.parameters():
            p.sequence_parallel = True
        self.fc1 = ColumnParallelLinear(8, 16, ps, sequence_parallel=True)
        self.fc2 = RowParallelLinear(16, 8, ps, sequence_parallel=True)
        with torch.no_grad():
            self.fc2.bias.add_(0.1)

    def forward(self, x):
        h = scatter_to_sequence_parallel_region(x, self.ps)  # [T/tp, B, 8]
        h = self.fc2(nn.functional.gelu(self.fc1(self.norm(h))))  # [T/tp, B, 8]
        return gather_from_sequence_parallel_region(h, self.ps, reduce_grad=False)  # [T, B, 8]


def sp_data():
    g = torch.Generator().manual_seed(11)
    return torch.randn(4, BATCH, 8, generator=g), torch.randn(4, BATCH, 8, generator=g)  # [T, B, H]


def _sp_dp(zero: bool):
    ps = ParallelState.from_sizes(tp=2, dp=2)
    x, y = sp_data()
    per = BATCH // ps.dp_size
    x, y = x[:, ps.dp_rank * per:][:, :per], y[:, ps.dp_rank * per:][:, :per]
    model = SPModel(ps)
    ddp = DataParallel(model, ps, bucket_size=40, reduce_scatter=zero)
    opt = DistributedOptimizer(ddp, torch.optim.SGD, lr=1.0) if zero else None
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    nn.functional.mse_loss(ddp(x), y).backward()
    ddp.finish_grad_sync()
    if zero:
        opt.step()
        grads = {n: before[n] - p.detach() for n, p in model.named_parameters()}
    else:
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return ps.tp_rank, grads, {n: getattr(p, "tp_partition_dim", None) for n, p in model.named_parameters()}


@pytest.mark.parametrize("zero", [False, True])
def test_sequence_parallel_grads_summed_over_tp_before_dp(zero):
    ref = SPModel(ParallelState.single())
    x, y = sp_data()
    nn.functional.mse_loss(ref(x), y).backward()
    ref_grads = {n: p.grad for n, p in ref.named_parameters()}
    for tp_rank, grads, dims in run(_sp_dp, 4, zero):
        for name, want in ref_grads.items():
            if dims[name] is not None:
                want = want.chunk(2, dim=dims[name])[tp_rank]
            torch.testing.assert_close(grads[name], want, rtol=1e-4 if zero else 1e-5, atol=1e-7)


# ------------------------------------------------------------------ pipeline-split parameters (tp=2 x pp=2)
# name: (shape, tp_partition_dim, stage or "shared")
PP_PARAMS = {
    "w0": ((4, 6), 0, 0), "r0": ((5,), None, 0),
    "w1": ((6, 4), 1, 1), "r1": ((3,), None, 1),
    "emb": ((10, 4), 0, "shared"),  # tied embedding: a copy on the first and on the last stage
}


def full_grads() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return {n: torch.randn(shape, generator=g) for n, (shape, _, _) in PP_PARAMS.items()}


def _pp_clip():
    ps = ParallelState.from_sizes(tp=2, pp=2)
    grads = full_grads()
    params = {}
    for name, (_shape, dim, stage) in PP_PARAMS.items():
        if stage != "shared" and stage != ps.pp_rank:
            continue
        g = grads[name] if dim is None else grads[name].chunk(ps.tp_size, dim=dim)[ps.tp_rank]
        p = nn.Parameter(torch.zeros_like(g))
        p.tp_partition_dim = dim
        if stage == "shared":
            p.shared_embedding = True
        p.grad = g.clone()
        params[name] = p
    inf_norm = clip_grad_norm(params.values(), 0.0, ps, norm_type=float("inf"))  # measure only
    norm = clip_grad_norm(params.values(), 1.0, ps)
    return ps.tp_rank, ps.pp_rank, inf_norm, norm, {n: p.grad for n, p in params.items()}


def test_clip_pipeline_split_and_tied_embedding():
    grads = full_grads()
    ref_inf = max(g.abs().max().item() for g in grads.values())
    ref = {n: g.clone().requires_grad_() for n, g in grads.items()}
    for n, t in ref.items():
        t.grad = grads[n].clone()
    ref_norm = torch.nn.utils.clip_grad_norm_(list(ref.values()), 1.0).item()
    assert ref_norm > 1.0
    for tp_rank, _pp_rank, inf_norm, norm, local in run(_pp_clip, 4):
        assert inf_norm == ref_inf
        assert abs(norm - ref_norm) <= 1e-6 * ref_norm
        for name, g in local.items():
            dim = PP_PARAMS[name][1]
            want = ref[name].grad if dim is None else ref[name].grad.chunk(2, dim=dim)[tp_rank]
            torch.testing.assert_close(g, want, rtol=1e-6, atol=1e-8)


def test_clip_single_process_equals_torch():
    model = TPModel(ParallelState.single())
    x, y = data()
    nn.functional.mse_loss(model(x), y).backward()
    ref_model = TPModel(ParallelState.single())
    nn.functional.mse_loss(ref_model(x), y).backward()
    norm = clip_grad_norm(model.parameters(), MAX_NORM, ParallelState.single())
    ref = torch.nn.utils.clip_grad_norm_(ref_model.parameters(), MAX_NORM).item()
    assert abs(norm - ref) <= 1e-6 * ref and not dist.is_initialized()
    for p, r in zip(model.parameters(), ref_model.parameters(), strict=True):
        torch.testing.assert_close(p.grad, r.grad, rtol=1e-6, atol=1e-9)

"""Tensor / sequence parallel layers equal a single-process plain-torch model, forward and backward.

Each TP size runs the same checks on `tp` gloo ranks; the reference is built in every child from the
full master weights with nn.functional (F.linear / F.embedding / F.cross_entropy), never from our
layers. Layout: [T, B, H] (sequence first), the sequence-parallel convention of megatron_ext.
"""

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron_ext.tensor_parallel import (
    ColumnParallelLinear,
    RNGStatesTracker,
    RowParallelLinear,
    VocabParallelEmbedding,
    gather_from_sequence_parallel_region,
    scatter_to_sequence_parallel_region,
    scatter_to_tensor_parallel_region,
    seed_all,
    sync_sequence_parallel_grads,
    vocab_parallel_cross_entropy,
)
from megatron_ext.testing import run_distributed
from megatron_ext.topology import ParallelState

T, B, H, FF, V, REAL_V = 8, 3, 16, 32, 64, 50
TOL = 1e-6


def _full(t: torch.Tensor, dim, ps: ParallelState) -> torch.Tensor:
    """Reassemble a TP-sharded tensor (test helper, plain collectives, no autograd)."""
    if dim is None or ps.tp_size == 1:
        return t.detach().clone()
    parts = [torch.empty_like(t) for _ in range(ps.tp_size)]
    dist.all_gather(parts, t.detach().contiguous(), group=ps.tp_group)
    return torch.cat(parts, dim=dim)


def _diff(a, b):
    return (a - b).abs().max().item() / max(1.0, b.abs().max().item())


def _check_mlp(ps: ParallelState, sp: bool, seq_dim: int = 0) -> dict:
    torch.manual_seed(1)
    col = ColumnParallelLinear(H, FF, ps, sequence_parallel=sp, sequence_dim=seq_dim)
    row = RowParallelLinear(FF, H, ps, sequence_parallel=sp, sequence_dim=seq_dim)
    torch.manual_seed(1)
    w1 = torch.nn.init.normal_(torch.empty(FF, H), std=0.02)  # same RNG stream as the layers consumed
    w2 = torch.nn.init.normal_(torch.empty(H, FF), std=0.02)
    with torch.no_grad():  # non-zero biases so a missing/duplicated bias add would show
        b1 = torch.linspace(-0.1, 0.1, FF)
        b2 = torch.linspace(0.2, -0.2, H)
        col.bias.copy_(b1.chunk(ps.tp_size)[ps.tp_rank])
        row.bias.copy_(b2)
    g = torch.Generator().manual_seed(2)
    shape = (T, B, H) if seq_dim == 0 else (B, T, H)
    x_ref = torch.randn(shape, generator=g, requires_grad=True)
    proj = torch.randn(shape, generator=g)
    x = x_ref.detach().clone().requires_grad_(True)

    xs = scatter_to_sequence_parallel_region(x, ps, seq_dim) if sp else x  # [T/tp, B, H] with sp
    y = row(F.gelu(col(xs)))
    if sp:
        assert y.shape[seq_dim] == T // ps.tp_size
        y = gather_from_sequence_parallel_region(y, ps, seq_dim, reduce_grad=False)
    (y * proj).sum().backward()
    sync_sequence_parallel_grads(row, ps)

    w1r, w2r = w1.clone().requires_grad_(True), w2.clone().requires_grad_(True)
    b1r, b2r = b1.clone().requires_grad_(True), b2.clone().requires_grad_(True)
    y_ref = F.linear(F.gelu(F.linear(x_ref, w1r, b1r)), w2r, b2r)
    (y_ref * proj).sum().backward()
    return {
        "init_w1": _diff(_full(col.weight, 0, ps), w1), "init_w2": _diff(_full(row.weight, 1, ps), w2),
        "out": _diff(y, y_ref), "dx": _diff(x.grad, x_ref.grad),
        "dw1": _diff(_full(col.weight.grad, 0, ps), w1r.grad),
        "db1": _diff(_full(col.bias.grad, 0, ps), b1r.grad),
        "dw2": _diff(_full(row.weight.grad, 1, ps), w2r.grad), "db2": _diff(row.bias.grad, b2r.grad),
        "partition": (col.weight.tp_partition_dim, col.bias.tp_partition_dim,
                      row.weight.tp_partition_dim, row.bias.tp_partition_dim),
    }


def _check_embed_head_loss(ps: ParallelState, sp: bool, real_vocab) -> dict:
    torch.manual_seed(3)
    emb = VocabParallelEmbedding(V, H, ps, sequence_parallel=sp)
    head = ColumnParallelLinear(H, V, ps, bias=False, sequence_parallel=sp)
    torch.manual_seed(3)
    e_w = torch.nn.init.normal_(torch.empty(V, H), std=0.02).requires_grad_(True)
    h_w = torch.nn.init.normal_(torch.empty(V, H), std=0.02).requires_grad_(True)
    g = torch.Generator().manual_seed(4)
    hi = real_vocab or V
    ids = torch.randint(0, V, (T, B), generator=g)
    tgt = torch.randint(0, hi, (T, B), generator=g)
    scale = 30.0  # sharper logits exercise the max subtraction

    x = emb(ids)  # [T/tp, B, H] with sp, else [T, B, H]
    logits = head(x * scale)  # [T, B, V/tp]
    loss_tok = vocab_parallel_cross_entropy(logits, tgt, ps, real_vocab_size=real_vocab)
    loss_tok.mean().backward()

    logits_ref = F.linear(F.embedding(ids, e_w) * scale, h_w)[..., :hi]
    loss_ref = F.cross_entropy(logits_ref.reshape(-1, hi), tgt.reshape(-1), reduction="none").view(T, B)
    loss_ref.mean().backward()

    # the loss on its own, from full logits, including the logits' gradient
    z_ref = (torch.randn(T, B, V, generator=g) * 5 + 100).requires_grad_(True)  # exp would overflow
    z = z_ref.detach().clone().requires_grad_(True)
    lt = vocab_parallel_cross_entropy(scatter_to_tensor_parallel_region(z, ps), tgt, ps, real_vocab)
    (lt * torch.arange(T * B).view(T, B)).sum().backward()  # non-uniform upstream grad
    lt_ref = F.cross_entropy(z_ref[..., :hi].reshape(-1, hi), tgt.reshape(-1), reduction="none").view(T, B)
    (lt_ref * torch.arange(T * B).view(T, B)).sum().backward()
    return {
        "init_emb": _diff(_full(emb.weight, 0, ps), e_w.detach()),
        "loss": _diff(loss_tok, loss_ref), "d_emb": _diff(_full(emb.weight.grad, 0, ps), e_w.grad),
        "d_head": _diff(_full(head.weight.grad, 0, ps), h_w.grad),
        "ce_loss": _diff(lt, lt_ref), "ce_grad": _diff(z.grad, z_ref.grad),
        "partition": (emb.weight.tp_partition_dim, head.weight.tp_partition_dim),
    }


def _check_gathered_io(ps: ParallelState) -> dict:
    """Column with gather_output=True feeding Row with input_is_parallel=False (full tensors between)."""
    torch.manual_seed(5)
    col = ColumnParallelLinear(H, FF, ps, gather_output=True)
    row = RowParallelLinear(FF, H, ps, input_is_parallel=False)
    torch.manual_seed(5)
    w1 = torch.nn.init.normal_(torch.empty(FF, H), std=0.02).requires_grad_(True)
    w2 = torch.nn.init.normal_(torch.empty(H, FF), std=0.02).requires_grad_(True)
    g = torch.Generator().manual_seed(6)
    x_ref = torch.randn(T, B, H, generator=g, requires_grad=True)
    x = x_ref.detach().clone().requires_grad_(True)
    mid = col(x)
    assert mid.shape[-1] == FF
    y = row(torch.tanh(mid))
    y.pow(2).sum().backward()
    y_ref = F.linear(torch.tanh(F.linear(x_ref, w1)), w2)
    y_ref.pow(2).sum().backward()
    return {"out": _diff(y, y_ref), "dx": _diff(x.grad, x_ref.grad),
            "dw1": _diff(_full(col.weight.grad, 0, ps), w1.grad),
            "dw2": _diff(_full(row.weight.grad, 1, ps), w2.grad),
            "partition": (0, 0)}


def _all_checks(tp: int, sp: bool) -> list:
    ps = ParallelState.from_sizes(tp=tp) if dist.is_initialized() else ParallelState.single()
    assert ps.tp_size == tp
    checks = [_check_mlp(ps, sp), _check_embed_head_loss(ps, sp, None)]
    checks.append(_check_embed_head_loss(ps, sp, REAL_V))
    return checks + ([_check_mlp(ps, sp, seq_dim=1)] if sp else [_check_gathered_io(ps)])  # [B, T, H] too


def _assert_close(results):
    for rank, per_rank in enumerate(results):
        for check in per_rank:
            partition = check.pop("partition")
            assert partition in ((0, 0, 1, None), (0, 0)), partition
            bad = {k: v for k, v in check.items() if not v <= TOL}
            assert not bad, f"rank {rank}: {bad}"


def test_tp1_in_process_without_torch_distributed():
    if dist.is_initialized():
        pytest.skip("a process group is active in this process")
    # any torch.distributed call would raise: no default process group exists here
    _assert_close([_all_checks(1, sp=False)])
    _assert_close([_all_checks(1, sp=True)])


@pytest.mark.parametrize("tp,sp", [(2, False), (4, False), (2, True), (4, True)])
def test_tensor_parallel_matches_single_process(tp, sp):
    _assert_close(run_distributed(_all_checks, tp, tp, sp, timeout=90))


def _column_saved_bytes(tp: int) -> list:
    """Bytes autograd keeps for backward of a sequence-parallel ColumnParallelLinear, parameters aside."""
    ps = ParallelState.from_sizes(tp=tp)
    col = ColumnParallelLinear(H, FF, ps, sequence_parallel=True)
    params = {p.untyped_storage().data_ptr() for p in col.parameters()}
    x = torch.randn(T // tp, B, H, requires_grad=True)  # this rank's sequence shard
    seen = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = col(x)
    y.sum().backward()
    return [sum(seen.values()), x.numel() * x.element_size(), y.shape[0]]


@pytest.mark.parametrize("tp", [2, 4])
def test_sequence_parallel_column_keeps_only_its_shard(tp):
    """Under SP the column layer's saved input is this rank's [T/tp, B, H] shard, not the gathered [T, B, H]
    (backward gathers it again); the output still covers the whole sequence."""
    for saved, shard, out_len in run_distributed(_column_saved_bytes, tp, tp, timeout=60):
        assert saved == shard and out_len == T


def test_padded_vocab_columns_get_no_mass():
    ps = ParallelState.single()
    z = torch.randn(5, V, requires_grad=True)
    tgt = torch.randint(0, REAL_V, (5,))
    vocab_parallel_cross_entropy(z, tgt, ps, real_vocab_size=REAL_V).sum().backward()
    assert torch.all(z.grad[:, REAL_V:] == 0)
    with pytest.raises(ValueError, match="real_vocab_size"):
        vocab_parallel_cross_entropy(z, tgt, ps, real_vocab_size=V + 1)


@pytest.mark.parametrize("real_vocab", [None, 7])
def test_cross_entropy_gradcheck_float64(real_vocab):
    ps = ParallelState.single()
    z = torch.randn(4, 3, 10, dtype=torch.float64, requires_grad=True)
    tgt = torch.randint(0, real_vocab or 10, (4, 3))
    assert torch.autograd.gradcheck(lambda t: vocab_parallel_cross_entropy(t, tgt, ps, real_vocab), (z,))


def test_layer_size_errors_are_clear():
    ps = ParallelState(tp_size=4, world_size=4)  # sizes only; construction never communicates
    with pytest.raises(ValueError, match="out_features=30 is not divisible by the tensor-parallel size 4"):
        ColumnParallelLinear(8, 30, ps)
    with pytest.raises(ValueError, match="in_features=6"):
        RowParallelLinear(6, 8, ps)
    with pytest.raises(ValueError, match="padded vocab"):
        VocabParallelEmbedding(50, 8, ps)


def _rng_streams():
    ps = ParallelState.from_sizes(tp=2)  # 4 ranks: tp=2 x dp=2
    tracker = seed_all(ps, 1234)
    a = torch.rand(4)
    with tracker.fork():
        tracked = torch.rand(4)
        drop = torch.nn.functional.dropout(torch.ones(64), p=0.5)
    b = torch.rand(4)  # must continue the default stream as if fork never happened
    saved = tracker.get_states()
    with tracker.fork():
        next_tracked = torch.rand(4)
    tracker.set_states(saved)
    with tracker.fork():
        replay = torch.rand(4)
    return ps.tp_rank, torch.cat([a, b]), tracked, drop, torch.equal(next_tracked, replay)


def test_rng_tracker_streams_per_tp_rank():
    out = run_distributed(_rng_streams, 4, timeout=60)
    torch.manual_seed(1234)
    default_ref = torch.rand(8)  # a plain single process draws the same default stream
    for tp_rank, default, tracked, drop, replay_ok in out:
        assert torch.equal(default, default_ref) and replay_ok
        same_tp = [o for o in out if o[0] == tp_rank]
        other_tp = [o for o in out if o[0] != tp_rank]
        assert all(torch.equal(tracked, o[2]) and torch.equal(drop, o[3]) for o in same_tp)
        assert not any(torch.equal(tracked, o[2]) or torch.equal(drop, o[3]) for o in other_tp)


def test_rng_tracker_errors():
    tracker = RNGStatesTracker("cpu")
    tracker.add("a", 1)
    with pytest.raises(ValueError, match="already exists"):
        tracker.add("a", 2)
    with pytest.raises(ValueError, match="seed 1 is already used"):
        tracker.add("b", 1)
    with pytest.raises(ValueError, match="not tracked"):
        with tracker.fork("missing"):
            pass

"""Chunked output layer + cross entropy equals the unfused loss, for any TP size and chunking.

References are independent of the fused code: pure-torch ``F.cross_entropy`` on the full logits of the
real vocab (one process, float64), float64 ``gradcheck``, and for the model ``loss(forward(...))``,
which materialises the logits and uses the unfused vocab-parallel cross entropy.
"""

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron_ext.tensor_parallel import (
    sync_sequence_parallel_grads,
    vocab_parallel_linear_cross_entropy,
    vocab_parallel_linear_cross_entropy_sum,
)
from megatron_ext.testing import run_distributed
from megatron_ext.topology import ParallelState
from neox.config import ModelConfig
from neox.models import ParallelOptions
from neox.models.gpt_neox import GPTNeoX

N, D, VPAD, REAL = 29, 12, 64, 53  # N prime: no chunk size > 1 divides it
CHUNKS = [1, 4, 7, 29, 100]


def problem(dtype=torch.float64):
    g = torch.Generator().manual_seed(3)
    h = torch.randn(N, D, generator=g, dtype=dtype)
    w = torch.randn(VPAD, D, generator=g, dtype=dtype)
    target = torch.randint(0, REAL, (N,), generator=g)
    grad = torch.randn(N, generator=g, dtype=dtype)  # non-uniform upstream grad per token
    return h, w, target, grad


def reference(real_vocab_size):
    """Pure torch on the full logits of the real vocab: per-token loss, d(sum grad*loss)/dh and /dW."""
    h, w, target, grad = problem()
    h.requires_grad_(True)
    w.requires_grad_(True)
    v = real_vocab_size or VPAD
    loss = F.cross_entropy(h @ w[:v].t(), target, reduction="none")
    gh, gw = torch.autograd.grad((loss * grad).sum(), (h, w))
    return loss.detach(), gh, gw


def _fused_worker(tp: int):
    ps = ParallelState.from_sizes(tp=tp) if tp > 1 else ParallelState.single()
    h, w, target, grad = problem()
    per = VPAD // tp
    w_local = w[ps.tp_rank * per: (ps.tp_rank + 1) * per]
    out = {}
    for real in (None, REAL):
        for chunk in CHUNKS:
            hh, ww = h.clone().requires_grad_(True), w_local.clone().requires_grad_(True)
            loss = vocab_parallel_linear_cross_entropy(hh, ww, target, ps, real_vocab_size=real, chunk_size=chunk)
            loss.backward(grad)
            hs, ws = h.clone().requires_grad_(True), w_local.clone().requires_grad_(True)
            total = vocab_parallel_linear_cross_entropy_sum(hs, ws, target, ps, token_weight=grad,
                                                            real_vocab_size=real, chunk_size=chunk)
            (2.5 * total).backward()
            out[(real, chunk)] = (loss.detach(), hh.grad, ww.grad, total.detach(), hs.grad, ws.grad)
    return out


def _run(tp: int):
    if tp == 1:
        return [_fused_worker(1)]
    return run_distributed(_fused_worker, tp, tp)


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_fused_equals_full_logits(tp):
    results = _run(tp)
    for real in (None, REAL):
        ref_loss, ref_gh, ref_gw = reference(real)
        for chunk in CHUNKS:
            per_rank = [r[(real, chunk)] for r in results]
            for loss, gh, _, total, gh_sum, _ in per_rank:  # replicated outputs: equal on every rank
                torch.testing.assert_close(loss, ref_loss, rtol=1e-10, atol=1e-10)
                torch.testing.assert_close(gh, ref_gh, rtol=1e-10, atol=1e-10)
                torch.testing.assert_close(total, (ref_loss * problem()[3]).sum(), rtol=1e-10, atol=1e-10)
                torch.testing.assert_close(gh_sum, 2.5 * ref_gh, rtol=1e-10, atol=1e-10)
            gw = torch.cat([r[2] for r in per_rank])  # vocab shards in rank order
            gw_sum = torch.cat([r[5] for r in per_rank])
            torch.testing.assert_close(gw, ref_gw, rtol=1e-10, atol=1e-10)
            torch.testing.assert_close(gw_sum, 2.5 * ref_gw, rtol=1e-10, atol=1e-10)
            if real is not None:  # padded vocab rows get exactly no gradient
                assert gw[REAL:].abs().max() == 0


def test_gradcheck_float64():
    ps = ParallelState.single()
    h, w, target, _ = problem()
    h, w = h[:9].requires_grad_(True), w[:20].requires_grad_(True)
    target = target[:9] % 17
    tw = torch.rand(9, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda a, b: vocab_parallel_linear_cross_entropy(a, b, target, ps, real_vocab_size=17, chunk_size=4), (h, w))
    assert torch.autograd.gradcheck(
        lambda a, b, c: vocab_parallel_linear_cross_entropy_sum(a, b, target, ps, token_weight=c, real_vocab_size=17,
                                                                chunk_size=2), (h, w, tw))


def count_mm(fn) -> int:
    """Matrix products (aten::mm, aten::addmm_) run by fn(); the profiler sees inside Function.forward."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return sum(e.count for e in prof.key_averages() if e.key in ("aten::mm", "aten::addmm", "aten::addmm_"))


def test_no_grad_and_bf16():
    ps = ParallelState.single()
    h, w, target, _ = problem()
    ref_loss, _, _ = reference(REAL)
    with torch.no_grad():  # forward only (evaluation): same value
        total = vocab_parallel_linear_cross_entropy_sum(h, w, target, ps, real_vocab_size=REAL, chunk_size=5)
    torch.testing.assert_close(total, ref_loss.sum())
    hg, wg = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
    for grad_mode, matmuls in ((False, 1), (True, 3)):  # no gradients formed in forward under no_grad
        with torch.set_grad_enabled(grad_mode):
            n = count_mm(lambda: vocab_parallel_linear_cross_entropy_sum(hg, wg, target, ps, chunk_size=N))
        assert n == matmuls, (grad_mode, n)
    hb, wb = h.bfloat16().requires_grad_(True), w.bfloat16().requires_grad_(True)
    total = vocab_parallel_linear_cross_entropy_sum(hb, wb, target, ps, real_vocab_size=REAL, chunk_size=5)
    assert total.dtype == torch.float32
    torch.testing.assert_close(total.double(), ref_loss.sum(), rtol=2e-2, atol=0)
    total.backward()
    assert hb.grad.dtype == torch.bfloat16 and wb.grad.dtype == torch.bfloat16


def test_bad_arguments():
    ps = ParallelState.single()
    h, w, target, _ = problem()
    with pytest.raises(ValueError, match="real_vocab_size"):
        vocab_parallel_linear_cross_entropy(h, w, target, ps, real_vocab_size=VPAD + 1)
    with pytest.raises(ValueError, match=r"\[N, D\]"):
        vocab_parallel_linear_cross_entropy(h[None], w, target, ps)
    with pytest.raises(ValueError, match="chunk_size"):
        vocab_parallel_linear_cross_entropy_sum(h, w, target, ps, chunk_size=0)


# ------------------------------------------------------------------------------------------- model
def make_cfg(tied: bool) -> ModelConfig:
    return ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=8, vocab_size=300,
                       rotary_pct=0.25, gpt_j_residual=True, no_weight_tying=not tied)


def model_batch():
    g = torch.Generator().manual_seed(9)
    ids = torch.randint(0, 300, (3, 9), generator=g)
    labels = ids[:, 1:].clone()
    labels[0, :2] = -100  # ignored positions
    loss_mask = torch.rand(3, 8, generator=g)
    return ids[:, :-1], labels, loss_mask


def _model_worker(tp: int, sequence_parallel: bool):
    ps = ParallelState.from_sizes(tp=tp) if tp > 1 else ParallelState.single()
    ids, labels, loss_mask = model_batch()
    out = {}
    for tied in (True, False):
        for mask in (None, loss_mask):
            losses, grads = [], []
            for fused in (False, True):
                model = GPTNeoX(make_cfg(tied), ps, init_seed=4,
                                options=ParallelOptions(sequence_parallel=sequence_parallel))
                loss = model.forward_loss(ids, labels, mask) if fused else model.loss(model(ids), labels, mask)
                loss.backward()
                sync_sequence_parallel_grads(model, ps)
                losses.append(loss.detach())
                grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
            out[(tied, mask is not None)] = (losses, grads)
            with torch.no_grad():
                model.eval()
                torch.testing.assert_close(model.forward_loss(ids, labels, mask), model.loss(model(ids), labels, mask))
    if tp > 1:  # every rank agrees on the loss
        t = out[(True, True)][0][1].reshape(1).clone()
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=ps.tp_group)
        assert t == out[(True, True)][0][1]
    return out


@pytest.mark.parametrize("tp,sp", [(1, False), (2, True), (2, False)])
def test_forward_loss_equals_loss_of_logits(tp, sp):
    results = [_model_worker(1, False)] if tp == 1 else run_distributed(_model_worker, tp, tp, sp)
    for res in results:
        for key, (losses, grads) in res.items():
            torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6, msg=f"{key}")
            assert grads[0].keys() == grads[1].keys()
            for name in grads[0]:
                torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-6,
                                           msg=f"{key} {name}")


def test_forward_loss_needs_last_stage():
    model = GPTNeoX(make_cfg(False), ParallelState.single(), post_process=False)
    ids, labels, _ = model_batch()
    with pytest.raises(ValueError, match="post_process"):
        model.forward_loss(ids, labels)

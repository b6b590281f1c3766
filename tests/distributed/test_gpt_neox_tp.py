"""Tensor parallelism equals one process: GPT-NeoX logits, loss and every gradient, TP = 2 and 4;
dropout draws from the right RNG stream on each TP rank.

The reference is the single-process model built with the same config and init seed; the TP ranks
gather their logits shards and gradient shards (along each parameter's tp_partition_dim) to compare.
"""

import pytest
import torch
import torch.distributed as dist

from megatron_ext.tensor_parallel import seed_all
from megatron_ext.testing import run_distributed
from megatron_ext.topology import ParallelState
from neox.config import ModelConfig
from neox.models import ParallelOptions
from neox.models.gpt_neox import GPTNeoX
from neox.models.gpt_neox import model as model_module

CONFIGS = {
    "tied-parallel-rot0.25": dict(gpt_j_residual=True, no_weight_tying=False, rotary_pct=0.25),
    "untied-sequential-rot1.0": dict(gpt_j_residual=False, no_weight_tying=True, rotary_pct=1.0),
}
SEED = 11


def make_cfg(overrides: dict) -> ModelConfig:
    # vocab 1000 pads to 1024 for tp 1, 2 and 4, so the embedding master weights have one shape
    return ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, seq_length=8, vocab_size=1000,
                       **overrides)


def batch():
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 1000, (2, 9), generator=g)
    return ids[:, :-1], ids[:, 1:]


def run_model(model: GPTNeoX):
    ids, labels = batch()
    logits = model(ids)
    loss = model.loss(logits, labels)
    loss.backward()
    return logits.detach(), loss.detach()


def _gather(t: torch.Tensor, dim: int, ps: ParallelState) -> torch.Tensor:
    parts = [torch.empty_like(t) for _ in range(ps.tp_size)]
    dist.all_gather(parts, t.contiguous(), group=ps.tp_group)
    return torch.cat(parts, dim=dim)


def _tp_worker(tp: int, overrides: dict):
    ps = ParallelState.from_sizes(tp=tp)
    model = GPTNeoX(make_cfg(overrides), ps, init_seed=SEED)
    logits, loss = run_model(model)
    logits = _gather(logits, -1, ps)
    grads, params = {}, {}
    for name, p in model.named_parameters():
        dim = p.tp_partition_dim
        grads[name] = p.grad if dim is None else _gather(p.grad, dim, ps)
        params[name] = p.detach() if dim is None else _gather(p.detach(), dim, ps)
    return (logits, loss, grads, params) if ps.tp_rank == 0 else None


@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_tp_matches_single_process(tp, name):
    ref_model = GPTNeoX(make_cfg(CONFIGS[name]), ParallelState.single(), init_seed=SEED)
    ref_logits, ref_loss = run_model(ref_model)
    logits, loss, grads, params = run_distributed(_tp_worker, tp, tp, CONFIGS[name], timeout=60)[0]
    for n, p in ref_model.named_parameters():  # layout-independent init: TP slices of the same weights
        assert torch.equal(params[n], p.detach()), n
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert set(grads) == {n for n, _ in ref_model.named_parameters()}
    for n, p in ref_model.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, rtol=1e-5, atol=1e-6, msg=lambda m, n=n: f"{n}: {m}")


# ---------------------------------------------------------------------------------------- dropout
# Provable with dropout on: hidden dropout acts on activations replicated over TP and draws from the
# default stream (seeded alike everywhere), so with attention dropout off a TP model equals the
# single-process model exactly. Attention dropout acts on each rank's own heads and draws from the
# tracker's per-rank stream, so it cannot match a single process; what must hold is that the ranks'
# attention masks differ (else every head shard repeats one mask) while their hidden masks agree
# (else replicated activations diverge across TP ranks). Under sequence parallelism hidden dropout
# acts on sequence shards, so its masks must differ across ranks too.
DROP_SEED = 123


def _hidden_dropout_worker(tp: int, overrides: dict):
    ps = ParallelState.from_sizes(tp=tp)
    tracker = seed_all(ps, DROP_SEED)
    model = GPTNeoX(make_cfg(overrides), ps, init_seed=SEED, rng_tracker=tracker)
    logits, loss = run_model(model)
    grads = {n: p.grad if p.tp_partition_dim is None else _gather(p.grad, p.tp_partition_dim, ps)
             for n, p in model.named_parameters()}
    logits = _gather(logits, -1, ps)
    return (logits, loss, grads) if ps.tp_rank == 0 else None


@pytest.mark.parametrize("name", list(CONFIGS))
def test_hidden_dropout_tp_matches_single_process(name):
    overrides = dict(CONFIGS[name], hidden_dropout=0.3, attention_dropout=0.0)
    with torch.random.fork_rng(devices=[]):
        tracker = seed_all(ParallelState.single(), DROP_SEED)
        ref = GPTNeoX(make_cfg(overrides), ParallelState.single(), init_seed=SEED, rng_tracker=tracker)
        ref_logits, ref_loss = run_model(ref)
        no_drop_logits = ref.eval()(batch()[0]).detach()
    assert not torch.allclose(ref_logits, no_drop_logits)  # dropout really acted
    logits, loss, grads = run_distributed(_hidden_dropout_worker, 2, 2, overrides, timeout=60)[0]
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    for n, p in ref.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, rtol=1e-5, atol=1e-6, msg=lambda m, n=n: f"{n}: {m}")


def _record_dropout_masks(model: GPTNeoX):
    """Lists filled during forward with the boolean drop masks of hidden and attention dropout."""
    hidden, attention = [], []
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.register_forward_hook(lambda m, args, out: hidden.append((out == 0) & (args[0] != 0)))
    original = model_module.causal_attention

    def spy(q, k, v, *, dropout_p, attn_mask, training):
        before = torch.get_rng_state()  # inside the model's fork(), this is the stream in use
        out = original(q, k, v, dropout_p=dropout_p, attn_mask=attn_mask, training=training)
        after = torch.get_rng_state()
        torch.set_rng_state(before)  # replay the same draw with V = identity: out = dropped probs
        tk = k.shape[-2]
        eye = torch.eye(tk, dtype=v.dtype).expand(*v.shape[:-2], tk, tk)
        probs = original(q, k, eye, dropout_p=dropout_p, attn_mask=attn_mask, training=training)
        torch.set_rng_state(after)
        torch.testing.assert_close(out, probs @ v)  # the replay drew the same mask
        causal = torch.ones(tk, tk, dtype=torch.bool).tril()
        attention.append((probs == 0) & causal)
        return out

    model_module.causal_attention = spy
    return hidden, attention


def _mask_worker(tp: int, sequence_parallel: bool, use_tracker: bool):
    ps = ParallelState.from_sizes(tp=tp)
    tracker = seed_all(ps, DROP_SEED)
    model = GPTNeoX(make_cfg(dict(hidden_dropout=0.3, attention_dropout=0.3)), ps, init_seed=SEED,
                    options=ParallelOptions(sequence_parallel=sequence_parallel),
                    rng_tracker=tracker if use_tracker else None)
    hidden, attention = _record_dropout_masks(model)
    run_model(model)
    assert len(hidden) == 1 + 2 * 2 and len(attention) == 2  # embedding + 2 per layer; 1 per layer
    assert all(m.any() for m in hidden + attention)
    return hidden, attention


@pytest.mark.parametrize("sequence_parallel", [False, True])
def test_dropout_streams_across_tp_ranks(sequence_parallel):
    (h0, a0), (h1, a1) = run_distributed(_mask_worker, 2, 2, sequence_parallel, True, timeout=60)
    for m0, m1 in zip(a0, a1):  # attention: this rank's heads -> per-rank stream
        assert not torch.equal(m0, m1)
    for m0, m1 in zip(h0, h1):  # hidden: replicated -> same mask; SP shards -> per-rank stream
        assert torch.equal(m0, m1) != sequence_parallel


def test_dropout_without_tracker_uses_default_stream():
    """Control for the test above: without a tracker the masks come from the shared default stream,
    so the attention masks coincide across ranks (the detector can tell the two apart)."""
    (h0, a0), (h1, a1) = run_distributed(_mask_worker, 2, 2, False, False, timeout=60)
    assert all(torch.equal(m0, m1) for m0, m1 in zip(a0 + h0, a1 + h1))

"""Sequence parallelism equals one process: GPT-NeoX logits, loss and every gradient, TP = 2 and 4.

The reference is the single-process model (same config and init seed, no SP). The SP ranks gather
their logits shards and their gradient shards (after sync_sequence_parallel_grads) along each
parameter's tp_partition_dim. A pipeline-style split (stage 1 returns [B, T/tp, D] shards, stage 2
takes them) must compose to the same logits.
"""

import pytest
import torch
import torch.distributed as dist

from megatron_ext.tensor_parallel import sync_sequence_parallel_grads
from megatron_ext.testing import run_distributed
from megatron_ext.topology import ParallelState
from neox.config import ModelConfig
from neox.models import ParallelOptions
from neox.models.gpt_neox import GPTNeoX

CONFIGS = {
    "tied-parallel-rot0.25": dict(gpt_j_residual=True, no_weight_tying=False, rotary_pct=0.25),
    "untied-sequential-rot1.0": dict(gpt_j_residual=False, no_weight_tying=True, rotary_pct=1.0),
}
SEED = 11
SP = ParallelOptions(sequence_parallel=True)


def make_cfg(overrides: dict) -> ModelConfig:
    base = dict(num_layers=3, hidden_size=64, num_attention_heads=4, seq_length=8, vocab_size=1000)
    return ModelConfig(**{**base, **overrides})


def batch():
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 1000, (2, 9), generator=g)
    return ids[:, :-1], ids[:, 1:]


def _gather(t: torch.Tensor, dim: int, ps: ParallelState) -> torch.Tensor:
    parts = [torch.empty_like(t) for _ in range(ps.tp_size)]
    dist.all_gather(parts, t.contiguous(), group=ps.tp_group)
    return torch.cat(parts, dim=dim)


def _sp_worker(tp: int, overrides: dict):
    ps = ParallelState.from_sizes(tp=tp)
    cfg = make_cfg(overrides)
    model = GPTNeoX(cfg, ps, init_seed=SEED, options=SP)
    ids, labels = batch()
    logits = model(ids)  # [B, T, V/tp]: the head gathers the sequence
    assert logits.shape == (2, 8, 1024 // tp)
    loss = model.loss(logits, labels)
    loss.backward()
    sync_sequence_parallel_grads(model, ps)
    tagged = sorted(n for n, p in model.named_parameters() if getattr(p, "sequence_parallel", False))
    grads, params = {}, {}
    for name, p in model.named_parameters():
        dim = p.tp_partition_dim
        grads[name] = p.grad if dim is None else _gather(p.grad, dim, ps)
        params[name] = p.detach() if dim is None else _gather(p.detach(), dim, ps)

    # pipeline-style split on the same ranks: hidden states travel as this rank's sequence shard
    first = GPTNeoX(cfg, ps, init_seed=SEED, options=SP, post_process=False, layer_range=(0, 1))
    last = GPTNeoX(cfg, ps, init_seed=SEED, options=SP, pre_process=False, layer_range=(1, 3))
    with torch.no_grad():
        hidden = first(ids)
        assert hidden.shape == (2, 8 // tp, 64), hidden.shape
        split_logits = _gather(last(hidden), -1, ps)
        with pytest.raises(ValueError, match="divisible by the tensor-parallel size"):
            model(ids[:, :6 if tp == 4 else 7])
    out = (_gather(logits.detach(), -1, ps), loss.detach(), grads, params, tagged, split_logits)
    return out if ps.tp_rank == 0 else None


@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_sp_matches_single_process(tp, name):
    ref = GPTNeoX(make_cfg(CONFIGS[name]), ParallelState.single(), init_seed=SEED)
    ids, labels = batch()
    ref_logits = ref(ids)
    ref_loss = ref.loss(ref_logits, labels)
    ref_loss.backward()
    logits, loss, grads, params, tagged, split_logits = run_distributed(
        _sp_worker, tp, tp, CONFIGS[name], timeout=60)[0]
    for n, p in ref.named_parameters():
        assert torch.equal(params[n], p.detach()), n
    torch.testing.assert_close(logits, ref_logits.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(split_logits, ref_logits.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss, ref_loss.detach(), rtol=1e-5, atol=1e-6)
    assert set(grads) == {n for n, _ in ref.named_parameters()}
    for n, p in ref.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, rtol=1e-5, atol=1e-6, msg=lambda m, n=n: f"{n}: {m}")
    # every replicated parameter that sees only a sequence shard is tagged for the TP grad all-reduce
    expected = sorted(n for n, p in ref.named_parameters()
                      if p.tp_partition_dim is None and not n.startswith("embed"))
    assert tagged == expected


def test_sp_needs_divisible_seq_length():
    ps = ParallelState(tp_size=2)  # construction alone needs no process group
    with pytest.raises(ValueError, match="seq_length"):
        GPTNeoX(make_cfg(dict(seq_length=9)), ps, options=SP)
    GPTNeoX(make_cfg(dict(seq_length=9)), ps)  # fine without SP


def test_sp_is_a_no_op_at_tp1():
    ref = GPTNeoX(make_cfg({}), ParallelState.single(), init_seed=SEED)
    sp = GPTNeoX(make_cfg({}), ParallelState.single(), init_seed=SEED, options=SP)
    assert not any(getattr(p, "sequence_parallel", False) for p in sp.parameters())
    ids, _ = batch()
    assert torch.equal(sp(ids), ref(ids))

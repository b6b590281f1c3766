"""Tensor parallelism equals one process: GPT-NeoX logits, loss and every gradient, TP = 2 and 4.

The reference is the single-process model built with the same config and init seed; the TP ranks
gather their logits shards and gradient shards (along each parameter's tp_partition_dim) to compare.
"""

import pytest
import torch
import torch.distributed as dist

from megatron_ext.testing import run_distributed
from megatron_ext.topology import ParallelState
from neox.config import ModelConfig
from neox.models.gpt_neox import GPTNeoX

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

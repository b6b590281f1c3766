"""Activation checkpointing recomputes layers in backward without changing a single bit.

With dropout on (hidden and attention, the latter on the tracker's model-parallel stream), a model with
checkpoint_activations gives bit-identical loss and gradients to the same model without it: one
process, and TP = 2 (with and without sequence parallelism). A control shows that plain
torch.utils.checkpoint, which does not replay the tracker, would not.
"""

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from megatron_ext.tensor_parallel import seed_all, sync_sequence_parallel_grads
from megatron_ext.testing import run_distributed
from megatron_ext.topology import ParallelState
from neox.config import ModelConfig
from neox.models import ParallelOptions
from neox.models.gpt_neox import GPTNeoX
from neox.models.gpt_neox import model as model_module

SEED = 3


def make_cfg(**kw) -> ModelConfig:
    base = dict(num_layers=3, hidden_size=32, num_attention_heads=4, seq_length=8, vocab_size=300,
                rotary_pct=0.5, hidden_dropout=0.2, attention_dropout=0.2)
    return ModelConfig(**{**base, **kw})


def train_step(ps: ParallelState, options: ParallelOptions, cfg: ModelConfig | None = None):
    """Seeded forward + backward; returns loss, grads (by name), tracker states and layer call counts."""
    tracker = seed_all(ps, SEED)
    model = GPTNeoX(cfg or make_cfg(), ps, init_seed=1, options=options, rng_tracker=tracker)
    calls = []
    for name, layer in model.layers.items():
        layer.register_forward_pre_hook(lambda m, a, name=name: calls.append(name))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 300, (2, 9), generator=g)
    loss = model.loss(model(ids[:, :-1]), ids[:, 1:])
    loss.backward()
    sync_sequence_parallel_grads(model, ps)
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return loss.detach(), grads, tracker.get_states(), calls


def assert_bit_identical(a, b):
    loss_a, grads_a, states_a, _ = a
    loss_b, grads_b, states_b, _ = b
    assert torch.equal(loss_a, loss_b)
    assert grads_a.keys() == grads_b.keys()
    for n in grads_a:
        assert torch.equal(grads_a[n], grads_b[n]), n
    # recomputation replays the tracker and puts its state back: the next step draws the same masks
    assert all(torch.equal(states_a[k], states_b[k]) for k in states_a)


@pytest.mark.parametrize("num_layers_per_chunk", [1, 2, 3])
def test_checkpointing_is_bit_identical(num_layers_per_chunk):
    ps = ParallelState.single()
    with torch.random.fork_rng(devices=[]):
        plain = train_step(ps, ParallelOptions())
        ckpt = train_step(ps, ParallelOptions(checkpoint_activations=True,
                                              checkpoint_num_layers=num_layers_per_chunk))
    assert_bit_identical(plain, ckpt)
    assert plain[3] == ["0", "1", "2"]
    assert sorted(ckpt[3]) == ["0", "0", "1", "1", "2", "2"]  # every layer was recomputed once


def test_dropout_really_acts():
    ps = ParallelState.single()
    with torch.random.fork_rng(devices=[]):
        drop = train_step(ps, ParallelOptions())
        no_drop = train_step(ps, ParallelOptions(), make_cfg(hidden_dropout=0.0, attention_dropout=0.0))
    assert not torch.equal(drop[0], no_drop[0])


def test_plain_torch_checkpoint_would_not_replay_the_tracker(monkeypatch):
    """Control: without restoring the tracker, recomputed attention dropout differs and so do grads."""
    def plain_checkpoint(fn, *args, rng_tracker=None):
        return checkpoint(fn, *args, use_reentrant=False)

    ps = ParallelState.single()
    with torch.random.fork_rng(devices=[]):
        ref = train_step(ps, ParallelOptions())
        monkeypatch.setattr(model_module, "checkpoint_with_rng", plain_checkpoint)
        bad = train_step(ps, ParallelOptions(checkpoint_activations=True))
    assert torch.equal(ref[0], bad[0])  # the forward is the same ...
    assert any(not torch.equal(ref[1][n], bad[1][n]) for n in ref[1])  # ... the recomputation is not


def test_no_recomputation_without_grad():
    model = GPTNeoX(make_cfg(), ParallelState.single(), options=ParallelOptions(checkpoint_activations=True))
    calls = []
    model.layers["0"].register_forward_pre_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        model(torch.zeros(1, 4, dtype=torch.long))
    assert calls == [1]


def test_checkpoint_num_layers_must_be_positive():
    with pytest.raises(ValueError, match="checkpoint_num_layers"):
        ParallelOptions(checkpoint_activations=True, checkpoint_num_layers=0)


def _tp_worker(sequence_parallel: bool):
    ps = ParallelState.from_sizes(tp=2)
    plain = train_step(ps, ParallelOptions(sequence_parallel=sequence_parallel))
    ckpt = train_step(ps, ParallelOptions(sequence_parallel=sequence_parallel, checkpoint_activations=True,
                                          checkpoint_num_layers=2))
    assert_bit_identical(plain, ckpt)
    return True


@pytest.mark.parametrize("sequence_parallel", [False, True])
def test_checkpointing_is_bit_identical_tp2(sequence_parallel):
    assert run_distributed(_tp_worker, 2, sequence_parallel, timeout=60) == [True, True]

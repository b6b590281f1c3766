"""RWKV-4 model: transformers parity, parallel mode == RNN mode, state continuation, causality, init.

The independent references: transformers' RwkvForCausalLM (its CPU path is a plain loop), BlinkDL's init
formulas re-typed below as loops, and the model's own RNN mode against its parallel mode.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from megatron_ext.topology import ParallelState
from neox.config import ModelConfig
from neox.config.plan import count_parameters, stage_parameters
from neox.models import ParallelOptions, build_model
from neox.models.registry import get_model_spec
from neox.models.rwkv import RWKV, STATE_FIELDS

V, D, L, T, B = 61, 16, 3, 9, 2


def _cfg(**kw) -> ModelConfig:
    base = dict(model_type="rwkv", num_layers=L, hidden_size=D, seq_length=T, vocab_size=V,
                no_weight_tying=True, intermediate_size=40)
    base.update(kw)
    return ModelConfig(**base)


def _model(cfg: ModelConfig | None = None, seed: int = 0, noise: float = 0.3, **kw) -> RWKV:
    """A model with every parameter perturbed: the paper's init zeroes whole branches, which would make
    parallel / RNN comparisons trivially equal."""
    torch.manual_seed(seed)
    m = RWKV(cfg or _cfg(), ParallelState.single(), init_seed=seed + 1, **kw)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * noise)
    return m.eval()


def _ids(seed: int = 5, t: int = T) -> torch.Tensor:
    return torch.randint(0, V, (B, t), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------ transformers parity
def _to_hf(model: RWKV, cfg: ModelConfig):
    from transformers import RwkvConfig, RwkvForCausalLM

    hf = RwkvForCausalLM(RwkvConfig(vocab_size=V, context_length=T, hidden_size=D, num_hidden_layers=L,
                                    attention_hidden_size=D, intermediate_size=cfg.ffn_size,
                                    layer_norm_epsilon=cfg.layernorm_epsilon, rescale_every=0,
                                    tie_word_embeddings=False)).eval()
    att = {"time_mix_k": "time_mix_key", "time_mix_v": "time_mix_value", "time_mix_r": "time_mix_receptance"}
    sd = {}
    for name, t in model.state_dict().items():
        if name == "embed.weight":
            sd["rwkv.embeddings.weight"] = t[:V]
        elif name == "lm_head.weight":
            sd["head.weight"] = t[:V]
        elif name.startswith("ln_out."):
            sd["rwkv." + name] = t
        else:
            _, i, mod, rest = name.split(".", 3)
            if mod == "ln0":
                sd[f"rwkv.blocks.{i}.pre_ln.{rest}"] = t
            elif mod in ("ln1", "ln2"):
                sd[f"rwkv.blocks.{i}.{mod}.{rest}"] = t
            else:
                hf_mod = {"att": "attention", "ffn": "feed_forward"}[mod]
                if rest.startswith("time_mix"):
                    rest, t = (att[rest] if mod == "att" else att[rest]), t.view(1, 1, -1)
                sd[f"rwkv.blocks.{i}.{hf_mod}.{rest}"] = t
    hf.load_state_dict(sd, strict=True)
    return hf


def test_matches_transformers_logits_and_state():
    cfg = _cfg()
    model = _model(cfg)
    hf = _to_hf(model, cfg)
    ids = _ids()
    with torch.no_grad():
        out = hf(ids, use_cache=True)
        logits, state = model(ids, return_state=True)
    torch.testing.assert_close(logits[..., :V], out.logits, atol=2e-5, rtol=1e-5)
    for name, ours, theirs in zip(STATE_FIELDS, state, out.state):  # HF: 5 x [B, D, L], same order
        torch.testing.assert_close(ours.float(), theirs.float(), atol=2e-5, rtol=1e-5, msg=name)


def test_loss_matches_transformers():
    cfg = _cfg()
    model = _model(cfg, seed=3)
    hf = _to_hf(model, cfg)
    ids = _ids(7)
    with torch.no_grad():
        want = hf(ids, labels=ids).loss  # HF shifts internally
        got = model.loss(model(ids)[:, :-1], ids[:, 1:])
        fused = model.forward_loss(ids[:, :-1], ids[:, 1:])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fused, want, atol=1e-5, rtol=1e-5)


# -------------------------------------------------------------------------------- parallel vs RNN
def test_parallel_equals_rnn_token_by_token():
    model = _model()
    ids = _ids()
    with torch.no_grad():
        full, full_state = model(ids, return_state=True)
        state = model.init_state(B)
        steps = []
        for t in range(T):
            logits, state = model.forward_rnn(ids[:, t], state)
            steps.append(logits)
    assert (torch.stack(steps, 1) - full).abs().max().item() <= 1e-4
    for ours, want in zip(state, full_state):
        torch.testing.assert_close(ours, want, atol=1e-5, rtol=1e-5)


def test_continuation_from_parallel_state():
    model = _model(seed=4)
    ids = _ids(t=T)
    with torch.no_grad():
        full = model(ids)
        head, state = model(ids[:, :5], return_state=True)  # parallel prefix
        tail = model(ids[:, 5:], state=state)  # parallel continuation
        rnn, s = [], state
        for t in range(5, T):  # RNN continuation of the same prefix state
            logits, s = model.forward_rnn(ids[:, t: t + 1], s)
            rnn.append(logits)
    assert (torch.cat([head, tail], 1) - full).abs().max().item() <= 1e-4
    assert (torch.stack(rnn, 1) - full[:, 5:]).abs().max().item() <= 1e-4


def test_state_layout_and_shapes():
    model = _model()
    s = model.init_state(3)
    assert len(s) == 5 and STATE_FIELDS == ("ffn_x", "att_x", "aa", "bb", "pp")
    assert all(t.shape == (3, D, L) for t in s)
    assert [t.dtype for t in s[2:]] == [torch.float32] * 3 and bool((s[4] < -1e37).all())
    logits, s2 = model.forward_rnn(torch.zeros(3, dtype=torch.long), s)
    assert logits.shape == (3, model.padded_vocab_size) and all(a.shape == b.shape for a, b in zip(s, s2))
    assert model(_ids()).shape == (B, T, model.padded_vocab_size)
    with pytest.raises(ValueError, match="state"):
        model(_ids(), state=[t[:, :, :2] for t in s2[:]])


def test_causal():
    model = _model(seed=9)
    ids = _ids()
    changed = ids.clone()
    changed[:, 6] = (changed[:, 6] + 1) % V
    with torch.no_grad():
        a, b = model(ids), model(changed)
    torch.testing.assert_close(a[:, :6], b[:, :6], atol=0, rtol=0)
    assert (a[:, 6:] - b[:, 6:]).abs().max() > 1e-3


def test_pipeline_chunks_compose_and_init_is_layout_independent():
    cfg = _cfg()
    whole = RWKV(cfg, ParallelState.single(), init_seed=11)
    first = RWKV(cfg, ParallelState.single(), init_seed=11, post_process=False, layer_range=(0, 1))
    last = RWKV(cfg, ParallelState.single(), init_seed=11, pre_process=False, layer_range=(1, L))
    want = whole.state_dict()
    for part in (first, last):
        for name, t in part.state_dict().items():
            assert torch.equal(t, want[name]), name
    assert "layers.0.ln0.weight" in first.state_dict() and not any("ln0" in n for n in last.state_dict())
    whole = _model(seed=2)
    first.load_state_dict({k: v for k, v in whole.state_dict().items() if k in first.state_dict()})
    last.load_state_dict({k: v for k, v in whole.state_dict().items() if k in last.state_dict()})
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(last(first(ids)), whole(ids), atol=1e-6, rtol=1e-6)
        h, s1 = first(ids[:, :4], return_state=True)  # stage states cover their own layers
        out, s2 = last(h, return_state=True)
        _, s = whole(ids[:, :4], return_state=True)
    for a, b, w in zip(s1, s2, s):
        torch.testing.assert_close(torch.cat([a, b], -1), w)


def test_tp_slices_equal_the_single_process_init():
    """Each TP rank builds its slice of exactly the single-process tensors (padded vocab rows aside)."""
    cfg = _cfg()
    full = RWKV(cfg, ParallelState.single(), init_seed=5).state_dict()
    part = get_model_spec("rwkv").partition_dim
    for rank in range(2):
        ps = ParallelState(tp_size=2, tp_rank=rank, world_size=2)
        shard = RWKV(cfg, ps, init_seed=5)
        for name, t in shard.state_dict().items():
            p = dict(shard.named_parameters())[name]
            assert p.tp_partition_dim == part(name), name
            want = full[name]
            if part(name) is not None:
                if name in ("embed.weight", "lm_head.weight"):  # padding depends on tp: compare real rows
                    want = torch.cat([want[:V], want.new_zeros(cfg.padded_vocab_size(2) - V, D)])
                want = want.chunk(2, dim=part(name))[rank]
            assert torch.equal(t, want), name


# ----------------------------------------------------------------------------------------- init
def test_paper_initialisation():
    cfg = _cfg(num_layers=4, hidden_size=12, intermediate_size=48)
    m = RWKV(cfg, ParallelState.single(), init_seed=1)
    d, n = cfg.hidden_size, cfg.num_layers
    for i in range(n):  # BlinkDL's RWKV-4 "fancy init", as loops
        r01, r10 = i / (n - 1), 1.0 - i / n
        att, ffn = m.layers[str(i)].att, m.layers[str(i)].ffn
        decay = [-5 + 8 * (h / (d - 1)) ** (0.7 + 1.3 * r01) for h in range(d)]
        first = [math.log(0.3) + ((h + 1) % 3 - 1) * 0.5 for h in range(d)]
        x = [h / d for h in range(d)]
        expect = {att.time_decay: decay, att.time_first: first, att.time_mix_k: [v ** r10 for v in x],
                  att.time_mix_v: [v ** r10 + 0.3 * r01 for v in x], att.time_mix_r: [v ** (0.5 * r10) for v in x],
                  ffn.time_mix_k: [v ** r10 for v in x], ffn.time_mix_r: [v ** r10 for v in x]}
        for p, want in expect.items():
            torch.testing.assert_close(p.detach(), torch.tensor(want, dtype=torch.float32))
        for zero in (att.key, att.receptance, att.output, ffn.receptance, ffn.value):
            assert not zero.weight.any()
        w = att.value.weight.detach().double()  # orthogonal, gain 1
        torch.testing.assert_close(w @ w.T, torch.eye(d, dtype=torch.float64), atol=1e-5, rtol=0)
        k = ffn.key.weight.detach().double()  # [F, D], orthogonal columns, gain sqrt(F / D) = 2
        torch.testing.assert_close(k.T @ k, 4 * torch.eye(d, dtype=torch.float64), atol=1e-5, rtol=0)
    emb, head = m.embed.weight.detach().double(), m.lm_head.weight.detach().double()
    gain = 1e-4 * math.sqrt(V)
    torch.testing.assert_close(emb[:V].T @ emb[:V], gain ** 2 * torch.eye(d, dtype=torch.float64),
                               atol=1e-12, rtol=1e-5)
    torch.testing.assert_close(head[:V].T @ head[:V], 0.25 * V / d * torch.eye(d, dtype=torch.float64),
                               atol=1e-5, rtol=1e-5)
    assert not emb[V:].any() and not head[V:].any()
    for p in (m.layers["0"].ln0.weight, m.ln_out.weight):
        assert torch.equal(p, torch.ones_like(p))


def test_init_depends_on_seed_only():
    a, b = RWKV(_cfg(), ParallelState.single(), init_seed=1), RWKV(_cfg(), ParallelState.single(), init_seed=1)
    c = RWKV(_cfg(), ParallelState.single(), init_seed=2)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(a.embed.weight, c.embed.weight)


# --------------------------------------------------------------------------------- training path
def test_every_parameter_gets_gradient_and_checkpointing_matches():
    cfg = _cfg()
    ids = _ids()
    grads = []
    for ckpt in (False, True):
        m = _model(cfg, seed=6, options=ParallelOptions(checkpoint_activations=ckpt, checkpoint_num_layers=2)).train()
        m.loss(m(ids[:, :-1]), ids[:, 1:]).backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters()})
    for name, g in grads[0].items():
        assert g.abs().max() > 0, f"{name} got no gradient"
        torch.testing.assert_close(grads[1][name], g, atol=1e-6, rtol=1e-5, msg=name)


def test_gradients_match_transformers():
    cfg = _cfg()
    model = _model(cfg, seed=8).train()
    hf = _to_hf(model, cfg).train()
    ids = _ids(2)
    model.loss(model(ids[:, :-1]), ids[:, 1:]).backward()
    hf(ids, labels=ids).loss.backward()
    ours = model.layers["1"].att.time_decay.grad
    torch.testing.assert_close(ours, hf.rwkv.blocks[1].attention.time_decay.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(model.layers["0"].ffn.key.weight.grad,
                               hf.rwkv.blocks[0].feed_forward.key.weight.grad, atol=1e-5, rtol=1e-4)


def test_planner_counts_the_model():
    for cfg in (_cfg(), _cfg(intermediate_size=None, num_layers=2, hidden_size=24)):
        m = RWKV(cfg, ParallelState.single())
        assert count_parameters(cfg) == sum(p.numel() for p in m.parameters())
        shard = RWKV(cfg, ParallelState(tp_size=2, tp_rank=0, world_size=2))
        assert stage_parameters(cfg, tp=2)[0] == sum(p.numel() for p in shard.parameters())


def test_registry_and_config_errors():
    m = build_model(_cfg(), ParallelState.single(), init_seed=0)
    assert isinstance(m, RWKV)
    with pytest.raises(ValueError, match="no_weight_tying"):
        RWKV(dataclasses.replace(_cfg(), no_weight_tying=False), ParallelState.single())
    with pytest.raises(ValueError, match="attention mask"):
        m(_ids(), attention_mask=torch.tensor([[0] + [1] * (T - 1)] * B))
    with pytest.raises(ValueError, match="divisible"):
        RWKV(_cfg(hidden_size=15), ParallelState(tp_size=2, tp_rank=0, world_size=2))

"""GPT-NeoX model: shapes, causality, init statistics, layout-independent init, attention op."""

import math

import pytest
import torch

from megatron_ext.topology import ParallelState
from neox.config import ModelConfig
from neox.models import CausalLM, build_model, get_model_spec
from neox.models.gpt_neox import GPTNeoX
from neox.models.gpt_neox.rotary import apply_rotary, rotary_cos_sin
from neox.ops import build_attention_mask, causal_attention, causal_attention_reference


def tiny(**kw) -> ModelConfig:
    base = dict(num_layers=4, hidden_size=64, num_attention_heads=4, seq_length=16, vocab_size=1000,
                rotary_pct=0.25)
    base.update(kw)
    return ModelConfig(**base)


@pytest.mark.parametrize("tied", [True, False])
def test_shapes_and_names(tied):
    cfg = tiny(no_weight_tying=not tied)
    model = GPTNeoX(cfg, ParallelState.single())
    ids = torch.randint(0, 1000, (2, 11))
    assert model(ids).shape == (2, 11, 1024)  # padded to a multiple of 128
    names = set(model.state_dict())
    assert ("lm_head.weight" in names) == (not tied)
    assert "layers.3.attention.query_key_value.weight" in names and "final_norm.bias" in names
    assert model.state_dict()["layers.0.attention.query_key_value.weight"].shape == (192, 64)
    lm = CausalLM(model, cfg)
    assert lm(ids).shape == (2, 11, 1000)
    assert all(hasattr(p, "tp_partition_dim") for p in model.parameters())


def test_causal():
    model = GPTNeoX(tiny(gpt_j_residual=True), ParallelState.single()).eval()
    ids = torch.randint(0, 1000, (1, 12))
    changed = ids.clone()
    changed[0, 8] = (ids[0, 8] + 1) % 1000
    a, b = model(ids), model(changed)
    assert torch.equal(a[:, :8], b[:, :8])
    assert not torch.allclose(a[:, 8:], b[:, 8:])


@pytest.mark.parametrize("method,expected", [
    ("small_init", lambda cfg: math.sqrt(2 / (5 * cfg.hidden_size))),
    ("wang_init", lambda cfg: 2 / cfg.num_layers / math.sqrt(cfg.hidden_size)),
    ("normal", lambda cfg: cfg.init_method_std),
])
def test_init_std(method, expected):
    cfg = tiny(num_layers=3, hidden_size=128, init_method=method, output_layer_init_method=method,
               init_method_std=0.05, no_weight_tying=True)
    sd = GPTNeoX(cfg, ParallelState.single()).state_dict()
    std = expected(cfg)
    for name in ("layers.1.attention.query_key_value.weight", "layers.2.mlp.dense_4h_to_h.weight",
                 "embed.weight", "lm_head.weight"):
        assert abs(sd[name].std().item() - std) < 0.05 * std, name
        assert abs(sd[name].mean().item()) < 0.05 * std, name
    assert torch.equal(sd["layers.0.attention.dense.bias"], torch.zeros(128))
    assert torch.equal(sd["layers.0.input_norm.weight"], torch.ones(128))


def test_default_init_methods_per_layer_kind():
    cfg = tiny(num_layers=2, hidden_size=128)  # small_init, output layers wang_init
    sd = GPTNeoX(cfg, ParallelState.single()).state_dict()
    small, wang = math.sqrt(2 / (5 * 128)), 2 / 2 / math.sqrt(128)
    assert abs(sd["layers.0.mlp.dense_h_to_4h.weight"].std().item() - small) < 0.05 * small
    assert abs(sd["layers.0.attention.dense.weight"].std().item() - wang) < 0.05 * wang


@pytest.mark.parametrize("tied", [True, False])
def test_layer_range_holds_same_tensors(tied):
    cfg = tiny(no_weight_tying=not tied)
    ps = ParallelState.single()
    full = GPTNeoX(cfg, ps, init_seed=7).state_dict()
    torch.manual_seed(999)  # the global RNG state must not matter
    stage = GPTNeoX(cfg, ps, pre_process=False, layer_range=(2, 4), init_seed=7).state_dict()
    first = GPTNeoX(cfg, ps, post_process=False, layer_range=(0, 2), init_seed=7).state_dict()
    assert {k for k in stage if k.startswith("layers.")} == {k for k in full if k.startswith("layers.2.")
                                                          or k.startswith("layers.3.")}
    assert not any(k.startswith("layers.0") for k in stage) and "final_norm.weight" not in first
    for sd in (stage, first):
        for k, v in sd.items():
            assert torch.equal(v, full[k]), k
    other_seed = GPTNeoX(cfg, ps, init_seed=8).state_dict()
    key = "layers.2.mlp.dense_h_to_4h.weight"
    assert not torch.equal(other_seed[key], full[key])


def test_pipeline_stages_compose_to_full_model():
    cfg = tiny(gpt_j_residual=False, no_weight_tying=True)
    ps = ParallelState.single()
    full = GPTNeoX(cfg, ps).eval()
    a = GPTNeoX(cfg, ps, post_process=False, layer_range=(0, 1)).eval()
    b = GPTNeoX(cfg, ps, pre_process=False, layer_range=(1, 4)).eval()
    ids = torch.randint(0, 1000, (2, 9))
    torch.testing.assert_close(b(a(ids)), full(ids), rtol=0, atol=0)


def test_loss_ignores_vocab_padding_and_matches_torch():
    cfg = tiny(vocab_size=517, no_weight_tying=True)
    model = GPTNeoX(cfg, ParallelState.single())
    with torch.no_grad():  # make padded head rows large, as a careless loss would notice them
        model.lm_head.weight[517:] = 5.0
    ids = torch.randint(0, 517, (2, 10))
    logits = model(ids)
    loss = model.loss(logits[:, :-1], ids[:, 1:])
    ref = torch.nn.functional.cross_entropy(logits[:, :-1, :517].reshape(-1, 517), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(loss, ref)
    labels = ids[:, 1:].clone()
    labels[0, :4] = -100
    ref_masked = torch.nn.functional.cross_entropy(logits[:, :-1, :517].reshape(-1, 517), labels.reshape(-1))
    torch.testing.assert_close(model.loss(logits[:, :-1], labels), ref_masked)


def test_registry_builds_gpt_neox():
    cfg = tiny()
    m = build_model(cfg, ParallelState.single(), layer_range=(1, 2))
    assert isinstance(m, GPTNeoX) and list(m.layers) == ["1"]
    with pytest.raises(ValueError, match="unknown model_type"):
        get_model_spec("no_such_model")


@pytest.mark.parametrize("shape", [(2, 3, 7, 16), (1, 2, 1, 8)])
def test_reference_attention_equals_sdpa(shape):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(3))
    torch.testing.assert_close(causal_attention(q, k, v), causal_attention_reference(q, k, v))
    pad = torch.ones(shape[0], shape[2], dtype=torch.bool)
    pad[0, :2] = False  # left padding
    mask = build_attention_mask(shape[2], shape[2], pad)
    torch.testing.assert_close(causal_attention(q, k, v, attn_mask=mask),
                               causal_attention_reference(q, k, v, attn_mask=mask))
    # a query block continuing cached keys (Tq < Tk) sees all earlier keys
    kk, vv = torch.cat([k, k], 2), torch.cat([v, v], 2)
    torch.testing.assert_close(causal_attention(q, kk, vv), causal_attention_reference(q, kk, vv))


def test_reference_attention_is_plain_softmax():
    q, k, v = (torch.randn(1, 1, 3, 4, dtype=torch.float64) for _ in range(3))
    out = causal_attention_reference(q, k, v)
    s = (q[0, 0] @ k[0, 0].T) / 2.0
    p2 = torch.softmax(s[2], -1)
    torch.testing.assert_close(out[0, 0, 0], v[0, 0, 0])
    torch.testing.assert_close(out[0, 0, 2], p2 @ v[0, 0])


def test_rotary_is_a_rotation_of_pairs_half_apart():
    x = torch.randn(1, 1, 5, 8, dtype=torch.float64)
    cos, sin = rotary_cos_sin(torch.arange(5)[None], 4, 10000, torch.float64)
    y = apply_rotary(x, cos, sin)
    assert torch.equal(y[..., 4:], x[..., 4:])  # untouched dims
    torch.testing.assert_close(y[..., 0, :], x[..., 0, :])  # position 0: identity
    # dim j and j + 2 rotate together by angle pos * base^(-2j/4)
    pos, j = 3, 1
    theta = pos * 10000 ** (-2 * j / 4)
    a, b = x[0, 0, pos, j], x[0, 0, pos, j + 2]
    torch.testing.assert_close(y[0, 0, pos, j], a * math.cos(theta) - b * math.sin(theta))
    torch.testing.assert_close(y[0, 0, pos, j + 2], b * math.cos(theta) + a * math.sin(theta))


def test_left_padding_matches_unpadded():
    model = GPTNeoX(tiny(), ParallelState.single()).eval()
    ids = torch.randint(0, 1000, (1, 6))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], 1)
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1, 1]])
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(padded, position_ids=pos, attention_mask=mask)
    torch.testing.assert_close(out[:, 3:], model(ids), rtol=1e-5, atol=1e-5)


def test_tied_embedding_stages_share_and_sum_grads_to_full_model():
    """Tied embeddings split over two pipeline stages: each holds `embed.weight` (tagged
    shared_embedding); composing the stages gives the full model's logits, and the two copies' grads
    summed (what the all-reduce over the embedding group does) give the full model's gradient."""
    cfg = tiny(no_weight_tying=False)
    ps = ParallelState.single()
    full = GPTNeoX(cfg, ps, init_seed=5)
    first = GPTNeoX(cfg, ps, post_process=False, layer_range=(0, 2), init_seed=5)
    last = GPTNeoX(cfg, ps, pre_process=False, layer_range=(2, 4), init_seed=5)
    assert full.shared_embedding_params() == []
    assert first.shared_embedding_params() == [first.embed.weight]
    assert last.shared_embedding_params() == [last.embed.weight]
    assert "lm_head.weight" not in last.state_dict()
    ids = torch.randint(0, 1000, (2, 7))
    full_logits = full(ids)
    hidden = first(ids)
    assert hidden.shape == (2, 7, 64)
    stage_in = hidden.detach().requires_grad_()  # what a pipeline receives from the previous stage
    logits = last(stage_in)
    torch.testing.assert_close(logits, full_logits, rtol=0, atol=0)
    full_logits.square().mean().backward()
    logits.square().mean().backward()
    hidden.backward(stage_in.grad)
    torch.testing.assert_close(first.embed.weight.grad + last.embed.weight.grad, full.embed.weight.grad)
    untied = GPTNeoX(tiny(no_weight_tying=True), ps, post_process=False, layer_range=(0, 2))
    assert untied.shared_embedding_params() == []

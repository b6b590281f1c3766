"""Parity with transformers' GPTNeoXForCausalLM: logits, loss, and exact weight round trips.

The reference is transformers' eager attention path (explicit softmax), independent of our SDPA op.
Max abs logit differences are printed (pytest -s) and, when NEOX_PARITY_REPORT names a file, written
there as JSON for reports.
"""

import json
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")

from megatron_ext.topology import ParallelState  # noqa: E402
from neox.checkpoint.hf_gpt_neox import (  # noqa: E402
    hf_config_to_neox,
    hf_to_neox_state_dict,
    neox_config_to_hf,
    neox_to_hf_state_dict,
)
from neox.models import CausalLM  # noqa: E402
from neox.models.gpt_neox import GPTNeoX  # noqa: E402

SHAPES = {
    "L1-D64-rot0.25-par-untied-V1000": dict(num_hidden_layers=1, hidden_size=64, num_attention_heads=4,
                                            vocab_size=1000, rotary_pct=0.25, use_parallel_residual=True,
                                            tie_word_embeddings=False),
    "L2-D64-rot1.0-seq-tied-V517": dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                                        vocab_size=517, rotary_pct=1.0, use_parallel_residual=False,
                                        tie_word_embeddings=True),
    "L3-D96-rot0.25-seq-untied-V517-F200": dict(num_hidden_layers=3, hidden_size=96, num_attention_heads=6,
                                                vocab_size=517, rotary_pct=0.25, use_parallel_residual=False,
                                                tie_word_embeddings=False, intermediate_size=200),
    "L4-D128-rot1.0-par-tied-V1000-base500": dict(num_hidden_layers=4, hidden_size=128, num_attention_heads=8,
                                                  vocab_size=1000, rotary_pct=1.0, use_parallel_residual=True,
                                                  tie_word_embeddings=True, rotary_emb_base=500,
                                                  layer_norm_eps=1e-6),
    "L2-D64-rot0.5-par-untied-V128": dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=2,
                                          vocab_size=128, rotary_pct=0.5, use_parallel_residual=True,
                                          tie_word_embeddings=False),
}
RESULTS: dict[str, dict] = {}


def make_hf_model(shape: dict, seed: int = 0):
    """A random HF model whose biases and norms are non-trivial too (so their mapping is tested)."""
    kw = dict(intermediate_size=4 * shape["hidden_size"], max_position_embeddings=64,
              attn_implementation="eager")
    kw.update(shape)
    config = transformers.GPTNeoXConfig(**kw)
    torch.manual_seed(seed)
    model = transformers.GPTNeoXForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layernorm" in name or "layer_norm" in name:
                p.add_(0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.normal_(0.0, 0.02)
            else:
                p.normal_(0.0, 0.05)
    return model


def convert(hf_model):
    cfg = hf_config_to_neox(hf_model.config)
    sd = hf_to_neox_state_dict(hf_model.state_dict(), cfg)
    model = GPTNeoX(cfg.model, ParallelState.single()).eval()
    model.load_state_dict(sd, strict=True)
    return cfg, model


@pytest.fixture(scope="module", autouse=True)
def report():
    yield
    if RESULTS:
        print("\nHF GPT-NeoX parity (float32): max |logits_neox - logits_hf|")
        for name, r in RESULTS.items():
            print(f"  {name:42s} {r['max_abs_logit_diff']:.3e}  loss diff {r['loss_diff']:.2e}")
        path = os.environ.get("NEOX_PARITY_REPORT")
        if path:
            with open(path, "w") as f:
                json.dump(RESULTS, f, indent=1)


@pytest.mark.parametrize("name", list(SHAPES))
def test_logits_and_loss_match_transformers(name, record_property):
    hf = make_hf_model(SHAPES[name])
    cfg, neox_model = convert(hf)
    ids = torch.randint(0, hf.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = hf(ids, labels=ids)
        logits = neox_model(ids)  # [B, T, Vpad]
    v = hf.config.vocab_size
    assert logits.shape[-1] == cfg.model.padded_vocab_size(1) >= v
    diff = (logits[..., :v] - out.logits).abs().max().item()
    loss = neox_model.loss(logits[:, :-1], ids[:, 1:])
    loss_diff = abs(loss.item() - out.loss.item())
    RESULTS[name] = {"max_abs_logit_diff": diff, "loss_diff": loss_diff, "padded_vocab": logits.shape[-1]}
    record_property("max_abs_logit_diff", diff)
    print(f"\n[parity] {name}: max abs logit diff {diff:.3e}, loss diff {loss_diff:.2e}")
    assert diff <= 1e-4
    assert loss_diff <= 1e-5
    lm = CausalLM(neox_model, cfg.model)
    assert torch.equal(lm(ids), logits[..., :v])


def test_left_padded_batch_matches_transformers():
    hf = make_hf_model(SHAPES["L2-D64-rot1.0-seq-tied-V517"])
    _, neox_model = convert(hf)
    ids = torch.randint(0, 517, (2, 10), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[0, :4] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask, position_ids=pos).logits
        out = neox_model(ids, position_ids=pos, attention_mask=mask)[..., :517]
    real = mask.bool()
    assert (out[real] - ref[real]).abs().max().item() <= 1e-4


@pytest.mark.parametrize("name", ["L2-D64-rot1.0-seq-tied-V517", "L3-D96-rot0.25-seq-untied-V517-F200"])
def test_hf_neox_hf_round_trip_is_exact(name):
    hf = make_hf_model(SHAPES[name])
    cfg = hf_config_to_neox(hf.config)
    sd = hf_to_neox_state_dict(hf.state_dict(), cfg)
    vpad = cfg.model.padded_vocab_size(1)
    assert sd["embed.weight"].shape[0] == vpad and not sd["embed.weight"][517:].any()
    back = neox_to_hf_state_dict(sd, cfg)
    ref = hf.state_dict()
    assert set(back) == set(ref)
    for k, t in ref.items():
        assert torch.equal(back[k], t), k
    # config: exact with the original as base; architecture fields exact without it
    hf_cfg = hf.config.to_dict()
    assert neox_config_to_hf(cfg, base=hf_cfg).to_dict() == hf_cfg
    bare = neox_config_to_hf(cfg).to_dict()
    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                "intermediate_size", "hidden_act", "max_position_embeddings", "rope_parameters",
                "use_parallel_residual", "layer_norm_eps", "tie_word_embeddings", "attention_bias",
                "hidden_dropout", "attention_dropout"):
        assert bare[key] == hf_cfg[key], key


def test_unsupported_hf_configs_raise():
    hf = make_hf_model(SHAPES["L1-D64-rot0.25-par-untied-V1000"])
    for change in ({"hidden_act": "relu"}, {"attention_bias": False}):
        d = hf.config.to_dict() | change
        with pytest.raises(ValueError, match=next(iter(change))):
            hf_config_to_neox(d)
    cfg = hf_config_to_neox(hf.config)
    sd = hf.state_dict()
    sd["gpt_neox.layers.0.attention.extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="unexpected"):
        hf_to_neox_state_dict(sd, cfg)

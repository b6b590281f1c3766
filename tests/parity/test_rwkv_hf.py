"""Parity with transformers' RwkvForCausalLM: logits in both modes, states, and exact weight round trips.

Random HF models of several shapes (every parameter perturbed so no init symmetry hides a mapping error)
are converted to neox. Parallel mode is compared with HF's forward over the sequence; RNN mode (neox
forward_rnn and the fused stepper of neox.inference.rnn, one token at a time) with HF run token by token
carrying its state (use_cache). Max abs differences are printed (pytest -s).
"""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from neox.checkpoint.rwkv_convert import (  # noqa: E402
    hf_config_to_neox,
    hf_to_neox_state_dict,
    neox_config_to_hf,
    neox_to_hf_state_dict,
)
from neox.inference.rnn import RWKVStepper  # noqa: E402
from neox.models import CausalLM  # noqa: E402

SHAPES = {
    "L1-D32-V97": dict(num_hidden_layers=1, hidden_size=32, vocab_size=97),
    "L2-D64-V517-F200": dict(num_hidden_layers=2, hidden_size=64, vocab_size=517, intermediate_size=200),
    "L3-D96-V1000": dict(num_hidden_layers=3, hidden_size=96, vocab_size=1000, context_length=77),
    "L4-D128-V301": dict(num_hidden_layers=4, hidden_size=128, vocab_size=301, bos_token_id=3, eos_token_id=5),
}
TOL = 1e-4
T = 12


def random_hf(kwargs: dict, seed: int = 0):
    torch.manual_seed(seed)
    layers = kwargs.get("num_hidden_layers", 1)
    # transformers' RWKV init divides by (layers - 1): build 2 blocks and keep the first for one layer
    hf = transformers.RwkvForCausalLM(transformers.RwkvConfig(**{**kwargs, "num_hidden_layers": max(layers, 2)}))
    if layers == 1:
        hf.rwkv.blocks = hf.rwkv.blocks[:1]
        hf.config.num_hidden_layers = 1
    hf.eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "time_decay" in name:
                p.copy_(torch.empty_like(p).uniform_(-3, 1.5))
            elif "time_first" in name:
                p.copy_(torch.randn_like(p))
            elif "time_mix" in name:
                p.copy_(torch.rand_like(p))
            elif "ln" in name:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.2 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / p.shape[-1] ** 0.5)
    return hf


def to_neox(hf):
    cfg = hf_config_to_neox(hf.config)
    sd = hf_to_neox_state_dict(hf.state_dict(), cfg)
    return cfg, CausalLM.from_state_dict(cfg.model, sd).eval()


def hf_token_by_token(hf, ids):
    """HF logits [B, T, V] computed one token at a time carrying the state (use_cache), and the final
    state. Row by row: transformers' one-token path broadcasts [B, D] against [B, 1, D], so it is only
    right for batch 1."""
    rows, states = [], []
    for b in range(ids.shape[0]):
        state, out = None, []
        for t in range(ids.shape[1]):
            r = hf(ids[b: b + 1, t: t + 1], state=state, use_cache=True)
            state = [s.clone() for s in r.state]
            out.append(r.logits[:, 0])
        rows.append(torch.stack(out, 1))
        states.append(state)
    return torch.cat(rows), [torch.cat(f) for f in zip(*states)]


@pytest.mark.parametrize("name", sorted(SHAPES))
@torch.no_grad()
def test_logits_parallel_and_rnn(name):
    hf = random_hf(SHAPES[name])
    cfg, lm = to_neox(hf)
    v = cfg.model.vocab_size
    ids = torch.randint(0, v, (2, T), generator=torch.Generator().manual_seed(1))
    ref = hf(ids).logits  # [B, T, V]

    par = lm(ids)
    assert par.shape == ref.shape
    d_par = (par - ref).abs().max().item()

    ref_rnn, hf_state = hf_token_by_token(hf, ids)
    assert (ref_rnn - ref).abs().max().item() <= TOL  # HF's own two modes agree
    state, rnn = None, []
    for t in range(T):
        logits, state = lm.model.forward_rnn(ids[:, t], state)
        rnn.append(logits[:, :v])
    d_rnn = (torch.stack(rnn, 1) - ref_rnn).abs().max().item()

    stepper = RWKVStepper(lm.model)
    fstate, fused = stepper.init_state(2), []
    for t in range(T):
        logits, fstate = stepper.step(ids[:, t], fstate)
        fused.append(logits.clone())
    d_fused = (torch.stack(fused, 1) - ref_rnn).abs().max().item()
    print(f"\n{name}: max|logit diff| parallel {d_par:.2e} rnn {d_rnn:.2e} fused-rnn {d_fused:.2e}")
    assert d_par <= TOL and d_rnn <= TOL and d_fused <= TOL
    for ours, theirs, fused_s in zip(state, hf_state, stepper.to_model_state(fstate)):
        torch.testing.assert_close(ours, theirs, rtol=TOL, atol=TOL)
        torch.testing.assert_close(fused_s, theirs, rtol=TOL, atol=TOL)


@torch.no_grad()
def test_parallel_prefix_then_rnn_matches_hf():
    """A prompt in parallel mode returning the state, then RNN steps: the generation path."""
    hf = random_hf(SHAPES["L2-D64-V517-F200"], seed=3)
    cfg, lm = to_neox(hf)
    ids = torch.randint(0, cfg.model.vocab_size, (1, T), generator=torch.Generator().manual_seed(2))
    ref = hf(ids).logits
    _, state = lm.model(ids[:, :5], return_state=True)
    for t in range(5, T):
        logits, state = lm.model.forward_rnn(ids[:, t], state)
        assert (logits[:, : cfg.model.vocab_size] - ref[:, t]).abs().max().item() <= TOL


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_round_trip_bit_identical(name):
    hf = random_hf(SHAPES[name], seed=5)
    hf_sd = hf.state_dict()
    cfg = hf_config_to_neox(hf.config)
    back = neox_to_hf_state_dict(hf_to_neox_state_dict(hf_sd, cfg), cfg)
    assert set(back) == set(hf_sd)
    for k, t in hf_sd.items():
        assert back[k].shape == t.shape and back[k].dtype == t.dtype and torch.equal(back[k], t), k
    hf_cfg2 = neox_config_to_hf(cfg, base=hf.config.to_dict())
    assert hf_cfg2.to_dict() == hf.config.to_dict()
    bare = neox_config_to_hf(cfg).to_dict()  # without base: every architecture field still equal
    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "attention_hidden_size", "intermediate_size",
                "context_length", "layer_norm_epsilon", "tie_word_embeddings"):
        assert bare[key] == hf.config.to_dict()[key], key


def test_rejects_unsupported_configs():
    with pytest.raises(ValueError, match="attention_hidden_size"):
        hf_config_to_neox(transformers.RwkvConfig(hidden_size=32, attention_hidden_size=64, num_hidden_layers=1))
    cfg = hf_config_to_neox(transformers.RwkvConfig(hidden_size=32, num_hidden_layers=2, vocab_size=50))
    sd = random_hf(dict(hidden_size=32, num_hidden_layers=1, vocab_size=50)).state_dict()
    with pytest.raises(ValueError, match="missing"):
        hf_to_neox_state_dict(sd, cfg)

"""Parity with BlinkDL's own `rwkv` package (RWKV-4, strategy "cpu fp32") and exact .pth round trips.

A random RWKV-4 state dict in RWKV-LM's format (names and [1, 1, D] mixes) is torch.save'd, read by
`rwkv.model.RWKV` and converted to neox. The package's sequence mode (full_output) is compared with
neox's parallel forward, and its one-token mode carrying a state with neox's forward_rnn and fused
stepper, logits and the final state.
"""

import os

import pytest
import torch

os.environ.setdefault("RWKV_JIT_ON", "0")
os.environ.setdefault("RWKV_CUDA_ON", "0")
rwkv_model = pytest.importorskip("rwkv.model")

from neox.checkpoint.rwkv_convert import (  # noqa: E402
    blinkdl_config,
    blinkdl_to_neox_state_dict,
    load_blinkdl,
    neox_to_blinkdl_state_dict,
)
from neox.inference.rnn import RWKVStepper  # noqa: E402
from neox.models import CausalLM  # noqa: E402

SHAPES = {"L1-D32-V97": (1, 32, 97, 128), "L2-D64-V517-F200": (2, 64, 517, 200), "L4-D128-V301": (4, 128, 301, 512)}
TOL = 1e-4
T = 10


def random_blinkdl(layers: int, d: int, vocab: int, ffn: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """A RWKV-4 state dict as RWKV-LM's model.py names and shapes it (random values)."""
    g = torch.Generator().manual_seed(seed)

    def rn(*shape, scale=None):
        return torch.randn(*shape, generator=g) * (scale if scale is not None else shape[-1] ** -0.5)

    def ln(prefix):
        return {f"{prefix}.weight": 1 + rn(d, scale=0.2), f"{prefix}.bias": rn(d, scale=0.2)}

    sd = {"emb.weight": rn(vocab, d, scale=1.0)}
    for i in range(layers):
        b = f"blocks.{i}."
        if i == 0:
            sd.update(ln(b + "ln0"))
        sd.update(ln(b + "ln1"))
        sd.update(ln(b + "ln2"))
        sd[b + "att.time_decay"] = torch.rand(d, generator=g) * 4.5 - 3
        sd[b + "att.time_first"] = rn(d, scale=1.0)
        for m in ("k", "v", "r"):
            sd[b + f"att.time_mix_{m}"] = torch.rand(1, 1, d, generator=g)
        for w in ("key", "value", "receptance", "output"):
            sd[b + f"att.{w}.weight"] = rn(d, d)
        sd[b + "ffn.time_mix_k"] = torch.rand(1, 1, d, generator=g)
        sd[b + "ffn.time_mix_r"] = torch.rand(1, 1, d, generator=g)
        sd[b + "ffn.key.weight"] = rn(ffn, d)
        sd[b + "ffn.receptance.weight"] = rn(d, d)
        sd[b + "ffn.value.weight"] = rn(d, ffn)
    sd.update(ln("ln_out"))
    sd["head.weight"] = rn(vocab, d)
    return sd


@pytest.mark.parametrize("name", sorted(SHAPES))
@torch.no_grad()
def test_logits_match_rwkv_package(name, tmp_path):
    layers, d, vocab, ffn = SHAPES[name]
    path = tmp_path / "model.pth"
    torch.save(random_blinkdl(layers, d, vocab, ffn), path)
    ref_model = rwkv_model.RWKV(model=str(path), strategy="cpu fp32", verbose=False)

    sd = load_blinkdl(path)
    cfg = blinkdl_config(sd)
    assert (cfg.model.num_layers, cfg.model.hidden_size, cfg.model.vocab_size, cfg.model.ffn_size) == SHAPES[name]
    lm = CausalLM.from_state_dict(cfg.model, blinkdl_to_neox_state_dict(sd, cfg)).eval()

    tokens = torch.randint(0, vocab, (T,), generator=torch.Generator().manual_seed(1)).tolist()
    ref_seq, _ = ref_model.forward(tokens, None, full_output=True)  # [T, V]
    ref_rnn, ref_state = [], None
    for t in tokens:
        out, ref_state = ref_model.forward([t], ref_state)
        ref_rnn.append(out)
    ref_rnn = torch.stack(ref_rnn)

    par = lm(torch.tensor([tokens]))[0]
    state, rnn = None, []
    stepper = RWKVStepper(lm)
    fstate, fused = stepper.init_state(1), []
    for t in tokens:
        logits, state = lm.model.forward_rnn(torch.tensor([t]), state)
        rnn.append(logits[0, :vocab])
        fl, fstate = stepper.step(torch.tensor([t]), fstate)
        fused.append(fl[0])
    d_par = (par - ref_seq).abs().max().item()
    d_rnn = (torch.stack(rnn) - ref_rnn).abs().max().item()
    d_fused = (torch.stack(fused) - ref_rnn).abs().max().item()
    print(f"\n{name}: max|logit diff| vs rwkv package: parallel {d_par:.2e} rnn {d_rnn:.2e} fused-rnn {d_fused:.2e}")
    assert d_par <= TOL and d_rnn <= TOL and d_fused <= TOL
    # the package's state per layer: att x_prev, aa, bb, pp, ffn x_prev
    for i in range(layers):
        ours = [s[0, :, i] for s in state]  # ffn_x, att_x, aa, bb, pp
        theirs = ref_state[5 * i: 5 * i + 5]
        for a, b in zip([ours[1], ours[2], ours[3], ours[4], ours[0]], theirs):
            torch.testing.assert_close(a, b, rtol=TOL, atol=TOL)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_blinkdl_round_trip_bit_identical(dtype, tmp_path):
    src = {k: v.to(dtype) for k, v in random_blinkdl(3, 64, 517, 256, seed=4).items()}
    torch.save(src, tmp_path / "m.pth")
    sd = load_blinkdl(tmp_path / "m.pth")
    cfg = blinkdl_config(sd)
    neox_sd = blinkdl_to_neox_state_dict(sd, cfg)
    assert neox_sd["embed.weight"].shape[0] == cfg.model.padded_vocab_size(1)
    back = neox_to_blinkdl_state_dict(neox_sd, cfg)
    assert set(back) == set(src)
    for k, t in src.items():
        assert back[k].shape == t.shape and back[k].dtype == t.dtype and torch.equal(back[k], t), k


def test_rejects_other_rwkv_versions():
    sd = random_blinkdl(1, 32, 50, 128)
    sd["blocks.0.att.time_faaaa"] = sd.pop("blocks.0.att.time_first")  # an RWKV-5 name
    with pytest.raises(ValueError, match="RWKV-4"):
        blinkdl_to_neox_state_dict(sd, blinkdl_config(sd))

"""TP = 2 generation equals single-process generation token for token.

A full checkpoint (TP = 1 layout, vocab 517 padded to 640) is written once; each of two gloo ranks
loads its tensor-parallel slices (vocab re-padded to 768 for TP 2), caches only its own heads, and
generates with the vocab-parallel logits gathered. The reference is the same checkpoint loaded into
one process.
"""

import pytest
import torch

from megatron_ext.testing import run_distributed
from megatron_ext.topology import ParallelState
from neox.checkpoint.io import save_model_checkpoint
from neox.config import ModelConfig, NeoXConfig
from neox.inference import KVCache, SamplingParams, generate_batch
from neox.inference.loading import load_model_for_inference
from neox.models.gpt_neox import GPTNeoX

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [3, 4], [100, 200, 30, 40], [17]]
RUNS = {
    "greedy": dict(params=SamplingParams(temperature=0), max_new_tokens=14),
    "sampled": dict(params=SamplingParams(temperature=1.2, top_k=20, top_p=0.9), max_new_tokens=14, seed=5),
    "greedy-eod": dict(params=SamplingParams(temperature=0), max_new_tokens=14, eod_id=None),  # set below
}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    cfg = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, seq_length=64,
                      max_position_embeddings=64, vocab_size=517, rotary_pct=0.25, gpt_j_residual=True,
                      no_weight_tying=True)
    model = GPTNeoX(cfg, ParallelState.single())
    g = torch.Generator().manual_seed(0)
    sd = {}
    for name, t in model.state_dict().items():  # weights large enough that continuations vary
        sd[name] = t + 0.1 * torch.randn(t.shape, generator=g) if "norm" in name else 0.15 * torch.randn(
            t.shape, generator=g)
    sd["embed.weight"][517:] = 0
    sd["lm_head.weight"][517:] = 0
    return save_model_checkpoint(tmp_path_factory.mktemp("ckpt"), sd, NeoXConfig(model=cfg))


def run_all(model, eod):
    out = {}
    for name, kw in RUNS.items():
        kw = dict(kw, eod_id=eod) if name == "greedy-eod" else kw
        res = generate_batch(model, PROMPTS, return_logits=True, **kw)
        out[name] = (res.tokens, res.finish_reasons, torch.stack(res.step_logits))
    return out


def _tp_worker(path, eod):
    torch.manual_seed(0)
    ps = ParallelState.from_sizes(tp=2)
    _, model = load_model_for_inference(path, ps)
    cache = KVCache.for_model(model, 1, 4)
    assert cache.layer(0).k.shape == (1, 2, 4, 16)  # this rank's 2 of 4 heads
    assert model.embed.weight.shape[0] == 768 // 2
    return run_all(model, eod)


def test_tp2_generation_equals_one_process(checkpoint):
    torch.set_num_threads(1)
    _, single = load_model_for_inference(checkpoint)
    free = generate_batch(single, PROMPTS, params=SamplingParams(temperature=0), max_new_tokens=14).tokens
    eod = free[1][2]
    ref = run_all(single, eod)
    assert len(set(ref["greedy-eod"][1])) > 1  # some rows end on eod, some run to the length limit
    ranks = run_distributed(_tp_worker, 2, str(checkpoint), eod, timeout=90)
    for name in RUNS:
        tokens, reasons, logits = ref[name]
        for rank_out in ranks:
            got_tokens, got_reasons, got_logits = rank_out[name]
            assert got_tokens == tokens, name
            assert got_reasons == reasons, name
            assert (got_logits - logits).abs().max().item() <= 1e-5, name
        assert torch.equal(ranks[0][name][2], ranks[1][name][2])  # every rank saw the same gathered logits

"""Batched generation with a KV cache against independent references.

The reference for every greedy claim is the plain model run one prompt at a time, unpadded, recomputing
the whole sequence each step (a list of ints and an argmax). Stop rules are checked against a plain
list search over that reference's tokens.
"""

import pytest
import torch

from neox.config import ModelConfig
from neox.inference import KVCache, SamplingParams, generate, generate_batch
from neox.models import CausalLM

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [3, 4], [100, 200, 30, 40], [17]]
GREEDY = SamplingParams(temperature=0)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: threads only add contention
    yield
    torch.set_num_threads(n)


def make_lm(seed=0, **overrides) -> CausalLM:
    """A small model with weights large enough that greedy continuations vary (not one repeated id)."""
    kw = dict(num_layers=2, hidden_size=64, num_attention_heads=4, seq_length=64, max_position_embeddings=64,
              vocab_size=300, rotary_pct=0.5)
    kw.update(overrides)
    lm = CausalLM.from_config(ModelConfig(**kw))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in lm.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.15 * torch.randn(p.shape, generator=g))
    return lm.eval()


def reference_greedy(lm, prompt, n):
    """One prompt, no padding, no cache: full recompute, argmax of the last position."""
    ids, logits = list(prompt), []
    with torch.no_grad():
        for _ in range(n):
            last = lm(torch.tensor([ids]))[0, -1]
            logits.append(last)
            ids.append(int(last.argmax()))
    return ids[len(prompt):], logits


@pytest.fixture(scope="module")
def lm():
    return make_lm()


@pytest.fixture(scope="module")
def refs(lm):
    return [reference_greedy(lm, p, 16) for p in PROMPTS]


@pytest.mark.parametrize("parallel", [True, False])
def test_cached_and_uncached_match_the_per_prompt_reference(parallel):
    lm = make_lm(seed=1, gpt_j_residual=parallel, rotary_pct=1.0 if parallel else 0.25)
    cached = generate_batch(lm, PROMPTS, max_new_tokens=16, params=GREEDY, return_logits=True)
    full = generate_batch(lm, PROMPTS, max_new_tokens=16, params=GREEDY, return_logits=True, use_cache=False)
    assert cached.tokens == full.tokens
    assert cached.finish_reasons == ["length"] * len(PROMPTS)
    for a, b in zip(cached.step_logits, full.step_logits):
        assert (a - b).abs().max().item() <= 1e-5
    for r, p in enumerate(PROMPTS):
        tokens, logits = reference_greedy(lm, p, 16)
        assert cached.tokens[r] == tokens
        assert len(set(tokens)) > 2  # the model is not degenerate, so the comparison means something
        for s, ref in enumerate(logits):
            assert (cached.step_logits[s][r] - ref).abs().max().item() <= 1e-5


def test_model_forward_with_cache_in_chunks_equals_full_forward(lm):
    ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        full = lm(ids, attention_mask=mask, position_ids=pos)
        cache = KVCache.for_model(lm.model, 2, 16)
        parts = []
        for a, b in ((0, 6), (6, 9), (9, 10), (10, 12)):
            parts.append(lm(ids[:, a:b], attention_mask=mask[:, :b], position_ids=pos[:, a:b], kv_cache=cache))
            assert cache.seq_len == b
    got = torch.cat(parts, dim=1)
    real = mask.bool()
    assert (got[real] - full[real]).abs().max().item() <= 1e-5
    # default positions continue after the cached ones
    with torch.no_grad():
        cache = KVCache.for_model(lm.model, 2, 16)
        lm(ids[:, :7], kv_cache=cache)
        tail = lm(ids[:, 7:], kv_cache=cache)
        assert (tail - lm(ids)[:, 7:]).abs().max().item() <= 1e-5


def test_kv_cache_is_preallocated_per_layer_and_overflow_is_an_error(lm):
    cache = KVCache.for_model(lm.model, 3, 10)
    k = cache.layer(1).k
    assert k.shape == (3, 4, 10, 16)  # [B, heads_local, max_len, head_dim]
    assert cache.nbytes() == 2 * 2 * k.nbytes
    with torch.no_grad():
        lm(torch.zeros(3, 8, dtype=torch.long), kv_cache=cache)
        assert cache.layer(1).k.data_ptr() == k.data_ptr()  # written in place
        with pytest.raises(ValueError, match="KV cache overflow"):
            lm(torch.zeros(3, 3, dtype=torch.long), kv_cache=cache)


def test_sampling_is_reproducible_and_respects_top_k_and_top_p(lm):
    params = SamplingParams(temperature=1.3, top_k=5)
    a = generate_batch(lm, PROMPTS, max_new_tokens=12, params=params, seed=7, return_logits=True)
    b = generate_batch(lm, PROMPTS, max_new_tokens=12, params=params, seed=7)
    c = generate_batch(lm, PROMPTS, max_new_tokens=12, params=params, seed=8)
    assert a.tokens == b.tokens and a.tokens != c.tokens
    for s, logits in enumerate(a.step_logits):
        top5 = logits.topk(5, dim=-1).indices
        for r in range(len(PROMPTS)):
            assert a.tokens[r][s] in top5[r].tolist()
    # top-p: every pick lies in the nucleus, computed here by a plain sort over the tempered probs
    params = SamplingParams(temperature=0.9, top_p=0.6)
    res = generate_batch(lm, PROMPTS, max_new_tokens=12, params=params, seed=3, return_logits=True)
    picked_non_argmax = 0
    for s, logits in enumerate(res.step_logits):
        for r in range(len(PROMPTS)):
            probs = torch.softmax(logits[r] / 0.9, -1).tolist()
            order = sorted(range(len(probs)), key=lambda i: -probs[i])
            nucleus, mass = [], 0.0
            for i in order:
                if mass >= 0.6:
                    break
                nucleus.append(i)
                mass += probs[i]
            tok = res.tokens[r][s]
            assert tok in nucleus
            picked_non_argmax += tok != order[0]
    assert picked_non_argmax > 0  # it really sampled
    # temperature -> 0 is greedy
    cold = generate_batch(lm, PROMPTS, max_new_tokens=12, params=SamplingParams(temperature=1e-6), seed=1)
    assert cold.tokens == generate_batch(lm, PROMPTS, max_new_tokens=12, params=GREEDY).tokens


def _first(seq, sub):
    return next((i for i in range(len(seq) - len(sub) + 1) if seq[i: i + len(sub)] == sub), None)


def test_stop_token_sequences_and_eod_finish_rows_independently(lm, refs):
    stop = refs[0][0][3:5]
    res = generate_batch(lm, PROMPTS, max_new_tokens=16, params=GREEDY, stop_sequences=[stop])
    for r, (tokens, _) in enumerate(refs):
        i = _first(tokens, stop)
        assert res.tokens[r] == (tokens if i is None else tokens[:i])
        assert res.finish_reasons[r] == ("length" if i is None else "stop")
    assert res.finish_reasons[0] == "stop"
    # eod: row 1's 3rd token ends row 1 there; every other row ends at its own first occurrence or runs on
    eod = refs[1][0][2]
    res = generate_batch(lm, PROMPTS, max_new_tokens=16, params=GREEDY, eod_id=eod)
    lengths = set()
    for r, (tokens, _) in enumerate(refs):
        i = tokens.index(eod) if eod in tokens else None
        assert res.tokens[r] == (tokens if i is None else tokens[:i])
        assert res.finish_reasons[r] == ("length" if i is None else "eod")
        lengths.add(len(res.tokens[r]))
    assert len(lengths) > 1  # rows really finished at different steps


def test_stop_strings_on_the_decoded_tail(lm, refs):
    def detok(ids):
        return "".join(chr(ord("a") + i % 26) for i in ids)

    target = detok(refs[2][0][4:6])
    res = generate_batch(lm, PROMPTS, max_new_tokens=16, params=GREEDY, stop_strings=["@@", target],
                         detokenize=detok)
    for r, (tokens, _) in enumerate(refs):
        text = detok(tokens)
        cut = text.find(target)
        if cut < 0:
            assert res.tokens[r] == tokens and res.texts[r] == text and res.finish_reasons[r] == "length"
        else:  # one character per token: the row ends at the token completing the string
            assert res.tokens[r] == tokens[: cut + len(target)]
            assert res.texts[r] == text[:cut] and res.finish_reasons[r] == "stop"
    assert res.finish_reasons[2] == "stop"
    with pytest.raises(ValueError, match="detokenize"):
        generate_batch(lm, PROMPTS, stop_strings=["x"])


def test_single_prompt_wrapper_and_user_errors(lm, refs):
    assert generate(lm, PROMPTS[0], max_new_tokens=16, params=GREEDY) == refs[0][0]
    stop_tok = refs[0][0][5]
    out = generate(lm, PROMPTS[0], max_new_tokens=16, params=GREEDY, stop_token_ids=[stop_tok])
    assert out == refs[0][0][: refs[0][0].index(stop_tok)]
    with pytest.raises(ValueError, match="exceeds the model's 64 positions"):
        generate_batch(lm, PROMPTS, max_new_tokens=60)
    with pytest.raises(ValueError, match="at least one token"):
        generate_batch(lm, [[1], []])

"""Greedy batched generation equals transformers' `generate` token for token (and its scores).

A random HF GPTNeoX is converted to neox; the same left-padded batch of prompts of different lengths
runs through `GPTNeoXForCausalLM.generate(do_sample=False)` (eager attention, attention_mask) and
through neox's cached generator. An end-of-document id taken from HF's own output checks that rows
finish independently the same way.
"""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from neox.inference import SamplingParams, generate_batch  # noqa: E402
from tests.parity.test_hf_gpt_neox import SHAPES, convert, make_hf_model  # noqa: E402

CASES = ["L1-D64-rot0.25-par-untied-V1000", "L2-D64-rot1.0-seq-tied-V517", "L3-D96-rot0.25-seq-untied-V517-F200",
         "L2-D64-rot0.5-par-untied-V128"]
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [3, 4], [100, 20, 30, 40], [17]]
N = 14
PAD = 0


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def hf_generate(hf, eos=None):
    """transformers' greedy generate on the left-padded batch -> (new tokens per row, scores per step)."""
    p = max(map(len, PROMPTS))
    ids = torch.full((len(PROMPTS), p), PAD, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, prompt in enumerate(PROMPTS):
        ids[r, p - len(prompt):] = torch.tensor(prompt)
        mask[r, p - len(prompt):] = 1
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=mask, max_new_tokens=N, do_sample=False, pad_token_id=PAD,
                          eos_token_id=eos, output_scores=True, return_dict_in_generate=True)
    return out.sequences[:, p:].tolist(), list(out.scores)


@pytest.mark.parametrize("name", CASES)
def test_greedy_batch_matches_transformers(name):
    hf = make_hf_model(SHAPES[name], seed=4)
    _, model = convert(hf)
    ref, scores = hf_generate(hf)
    res = generate_batch(model, PROMPTS, max_new_tokens=N, params=SamplingParams(temperature=0),
                         return_logits=True)
    assert res.tokens == ref
    assert len(res.step_logits) == len(scores) == N
    diff = max((a - b).abs().max().item() for a, b in zip(res.step_logits, scores))
    print(f"\n[generate parity] {name}: max |logits - hf scores| over {N} steps {diff:.2e}")
    assert diff <= 1e-4


def test_eod_ends_rows_like_transformers():
    hf = make_hf_model(SHAPES["L2-D64-rot0.5-par-untied-V128"], seed=4)
    _, model = convert(hf)
    free, _ = hf_generate(hf)
    eod = free[0][3]  # a token HF emits in row 0 at step 3: row 0 must end there
    ref, _ = hf_generate(hf, eos=eod)
    res = generate_batch(model, PROMPTS, max_new_tokens=N, params=SamplingParams(temperature=0), eod_id=eod)
    for r, row in enumerate(ref):
        if eod in row:  # HF keeps the eos and pads after it; neox drops the eod
            i = row.index(eod)
            assert res.tokens[r] == row[:i] and res.finish_reasons[r] == "eod"
            assert all(t == PAD for t in row[i + 1:])
        else:
            assert res.tokens[r] == row and res.finish_reasons[r] == "length"
    assert res.finish_reasons[0] == "eod" and len(res.tokens[0]) <= 3

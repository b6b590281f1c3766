"""neox.inference.evaluate against independent references.

A bigram "model" (logits depend on the current token only) makes perplexity independent of context,
so any windowing, stride, method or batching must equal the closed-form sum of -log p(next | prev).
A tiny real transformer checks that each window sees the right context, and that several gloo ranks
give bit-identical numbers to one process.
"""

import math

import pytest
import torch

from megatron_ext.testing import run_distributed
from neox.config import ModelConfig
from neox.data.tokenizers import CharLevelTokenizer
from neox.inference.evaluate import (
    evaluate_lambada,
    evaluate_perplexity,
    lambada_split,
    perplexity_summary,
    read_bin_documents,
    rolling_windows,
    split_range,
)
from neox.models.causal_lm import CausalLM

V = 258
EOD = 256


class Bigram(torch.nn.Module):
    """logits[b, t] = table[ids[b, t]]."""

    def __init__(self, table):
        super().__init__()
        self.table = torch.nn.Parameter(table)

    def forward(self, ids):
        return self.table[ids]


def bigram_nll(table, docs):
    """-sum log p(d[i] | d[i-1]) over every token, the first conditioned on eod."""
    logp = torch.log_softmax(table.double(), -1)
    total = 0.0
    for d in docs:
        prev = [EOD, *d[:-1]]
        total -= sum(logp[a, b].item() for a, b in zip(prev, d))
    return total


def tiny_lm(seed=0):
    cfg = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=16,
                      max_position_embeddings=64, vocab_size=V)
    return CausalLM.from_config(cfg, init_seed=seed).eval()


def random_docs(n=7, seed=0, lo=1, hi=40):
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(lo, hi, (n,), generator=g).tolist()
    return [torch.randint(0, 256, (k,), generator=g).tolist() for k in lens]


@pytest.mark.parametrize("n,L,stride", [(2, 4, 4), (10, 4, 4), (37, 8, 3), (9, 8, 8), (50, 5, 1), (6, 16, 4)])
def test_rolling_windows_score_each_target_once_with_context(n, L, stride):
    seen = []
    for begin, end, score_from in rolling_windows(n, L, stride):
        assert end - 1 - begin <= L  # inputs fit the model
        targets = list(range(max(begin + 1, score_from), end))
        for p in targets:
            assert p - begin >= min(p, L + 1 - stride)  # at least L + 1 - stride tokens of context
        seen += targets
    assert seen == list(range(1, n))


@pytest.mark.parametrize("method", ["document", "concat"])
@pytest.mark.parametrize("L,stride,bs", [(8, None, 1), (8, 3, 5), (5, 1, 64), (64, 16, 2)])
def test_perplexity_with_bigram_equals_closed_form(method, L, stride, bs):
    table = torch.randn(V, V, generator=torch.Generator().manual_seed(1)) * 2
    docs = random_docs()
    res = evaluate_perplexity(Bigram(table), docs, eod=EOD, seq_length=L, stride=stride, method=method,
                              batch_size=bs, num_bytes=123)
    ref = bigram_nll(table, docs)
    n = sum(map(len, docs))
    assert res["tokens"] == n
    assert res["nll_sum"] == pytest.approx(ref, rel=1e-6)
    assert res["perplexity"] == pytest.approx(math.exp(ref / n), rel=1e-6)
    assert res["bits_per_byte"] == pytest.approx(ref / 123 / math.log(2), rel=1e-6)


def test_perplexity_context_matches_full_forward():
    """Windows long enough to hold everything: the same as one forward over [eod, doc] / the stream."""
    lm = tiny_lm()
    docs = random_docs(5, seed=2, hi=14)
    with torch.no_grad():
        per_doc, stream = 0.0, [EOD]
        for d in docs:
            ids = torch.tensor([[EOD, *d]])
            logp = torch.log_softmax(lm(ids)[0, :-1].double(), -1)
            per_doc -= logp[torch.arange(len(d)), torch.tensor(d)].sum().item()
            stream += [*d, EOD]
        ids = torch.tensor([stream[:-1]])
        logp = torch.log_softmax(lm(ids)[0, :-1].double(), -1)
        tgt = torch.tensor(stream[1:-1])
        keep = tgt != EOD
        concat = -logp[torch.arange(len(tgt))[keep], tgt[keep]].sum().item()
    a = evaluate_perplexity(lm, docs, eod=EOD, seq_length=64, method="document", batch_size=3)
    b = evaluate_perplexity(lm, docs, eod=EOD, seq_length=64, method="concat")
    assert a["nll_sum"] == pytest.approx(per_doc, rel=1e-5)
    assert b["nll_sum"] == pytest.approx(concat, rel=1e-5)
    assert a["nll_sum"] != pytest.approx(b["nll_sum"], rel=1e-5)  # context really differs


def test_bits_per_byte_hand_calculation():
    res = perplexity_summary(10.0, 5, 8)
    assert res["loss"] == 2.0
    assert res["perplexity"] == pytest.approx(math.e ** 2)
    assert res["nats_per_byte"] == 1.25
    assert res["bits_per_byte"] == pytest.approx(1.25 / 0.6931471805599453)
    assert res["byte_perplexity"] == pytest.approx(math.exp(1.25))
    assert "bits_per_byte" not in perplexity_summary(10.0, 5, None)


def test_lambada_split():
    assert lambada_split("He said hello to Anna") == ("He said hello to", " Anna")
    assert lambada_split("one two \n") == ("one", " two")
    with pytest.raises(ValueError, match="last word"):
        lambada_split("   ")


def lambada_reference(model, tok, texts, L):
    """Plain loop: tokenize context and " word" separately, greedy-check every target token."""
    correct, nlls = [], []
    with torch.no_grad():
        for text in texts:
            ctx, word = text.rstrip().rsplit(" ", 1)
            c, t = tok.tokenize(ctx), tok.tokenize(" " + word)
            seq = (c + t)[-(L + 1):]
            logits = model(torch.tensor([seq[:-1]]))[0, -len(t):].double()  # [k, V]
            tgt = torch.tensor(t)
            correct.append(bool((logits.argmax(-1) == tgt).all()))
            nlls.append(-torch.log_softmax(logits, -1)[torch.arange(len(t)), tgt].sum().item())
    return correct, nlls


def lambada_texts():
    words = ["apple", "stone", "river", "music", "garden", "window", "candle", "bridge", "forest", "silver"]
    g = torch.Generator().manual_seed(4)
    texts = []
    for i in range(24):
        ctx = " ".join(words[j] for j in torch.randint(0, 10, (int(torch.randint(3, 12, (1,), generator=g)),),
                                                       generator=g).tolist())
        texts.append(f"{ctx}. And then the {words[i % 10]}")
    return texts


def test_lambada_matches_reference_with_mixed_accuracy():
    tok = CharLevelTokenizer()
    texts = lambada_texts()
    # a bigram table that strongly predicts " candle" after "the" (so only those passages pass)
    table = torch.randn(V, V, generator=torch.Generator().manual_seed(5))
    t = tok.tokenize(" candle")
    for a, b in zip([ord("e"), *t[:-1]], t):
        table[a, b] += 10.0
    model = Bigram(table)
    correct, nlls = lambada_reference(model, tok, texts, 32)
    res = evaluate_lambada(model, tok, texts, seq_length=32, batch_size=5, per_example=True)
    assert 0 < sum(correct) < len(texts)
    assert [e["correct"] for e in res["per_example"]] == correct
    assert res["accuracy"] == sum(correct) / len(texts)
    assert [e["nll"] for e in res["per_example"]] == pytest.approx(nlls, rel=1e-6, abs=1e-6)
    n_tok = sum(len(tok.tokenize(" " + t.rsplit(" ", 1)[1])) for t in texts)
    assert res["target_tokens"] == n_tok
    assert res["perplexity"] == pytest.approx(math.exp(sum(nlls) / len(texts)), rel=1e-6)
    assert res["token_perplexity"] == pytest.approx(math.exp(sum(nlls) / n_tok), rel=1e-6)


def test_lambada_real_model_and_truncated_context():
    tok, lm, texts = CharLevelTokenizer(), tiny_lm(3), lambada_texts()
    correct, nlls = lambada_reference(lm, tok, texts, 16)  # contexts longer than 16 are cut on the left
    res = evaluate_lambada(lm, tok, texts, seq_length=16, batch_size=4, per_example=True)
    assert [e["correct"] for e in res["per_example"]] == correct
    assert [e["nll"] for e in res["per_example"]] == pytest.approx(nlls, rel=1e-5)


def _dist_eval(docs, texts):
    torch.manual_seed(0)
    lm, tok = tiny_lm(), CharLevelTokenizer()
    a = evaluate_perplexity(lm, docs, eod=EOD, seq_length=16, stride=5, method="concat", batch_size=2)
    b = evaluate_perplexity(lm, docs, eod=EOD, seq_length=8, method="document", batch_size=3, num_bytes=99)
    c = evaluate_lambada(lm, tok, texts, seq_length=16, batch_size=3)
    return [a, b, c]


@pytest.mark.parametrize("world", [2, 3])
def test_data_parallel_equals_one_process_exactly(world):
    docs, texts = random_docs(9, seed=7), lambada_texts()
    torch.set_num_threads(1)
    ref = _dist_eval(docs, texts)
    for got in run_distributed(_dist_eval, world, docs, texts, timeout=60):
        assert got == ref


def test_split_range_and_bin_documents(tmp_path):
    import numpy as np
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    assert split_range(1000, "969,30,1", "valid") == (969, 999)
    assert split_range(1000, "969,30,1", "test") == (999, 1000)
    assert split_range(10, "8,2", "train") == (0, 8)
    docs = random_docs(10, seed=9)
    builder = IndexedDatasetBuilder(str(tmp_path / "d.bin"), dtype=np.uint16)
    for d in docs:
        builder.add_document(np.array(d + [EOD], dtype=np.uint16), [len(d) + 1])
    builder.finalize(str(tmp_path / "d.idx"))
    assert read_bin_documents(tmp_path / "d", EOD) == docs
    assert read_bin_documents(tmp_path / "d", EOD, split="8,2", which="valid") == docs[8:]
    assert read_bin_documents(tmp_path / "d", EOD, split="8,2", which="train", limit=3) == docs[:3]
    with pytest.raises(ValueError, match="no .bin"):
        read_bin_documents(tmp_path / "nope", EOD)

"""Evaluation of a checkpoint converted from a random transformers GPTNeoX equals transformers itself.

The references use transformers directly: perplexity by its documented strided sliding-window loop
with `labels` (its own shifted loss), LAMBADA by a per-passage loop with the real 20B tokenizer.
"""

import math

import pytest
import torch

transformers = pytest.importorskip("transformers")

import neox  # noqa: E402
from neox.data.tokenizers import build_tokenizer  # noqa: E402
from neox.inference.evaluate import evaluate_lambada, evaluate_perplexity, read_jsonl  # noqa: E402


def hf_model_dir(path, vocab: int, seed: int = 0):
    config = transformers.GPTNeoXConfig(
        vocab_size=vocab, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        max_position_embeddings=64, rotary_pct=0.25, use_parallel_residual=True, tie_word_embeddings=False,
        attn_implementation="eager",
    )
    torch.manual_seed(seed)
    model = transformers.GPTNeoXForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(path)
    return model


def hf_strided_nll(model, stream, scored, max_length, stride):
    """transformers' documented strided perplexity loop (sum of NLL, number of scored tokens)."""
    ids = torch.tensor([stream])
    total, count, prev_end = 0.0, 0, 0
    for begin in range(0, len(stream), stride):
        end = min(begin + max_length, len(stream))
        trg_len = end - prev_end
        inp = ids[:, begin:end]
        labels = inp.clone()
        labels[:, :-trg_len] = -100
        labels[0, ~torch.tensor(scored[begin:end])] = -100
        n = int((labels[:, 1:] != -100).sum())
        if n:
            with torch.no_grad():
                total += model(inp, labels=labels).loss.item() * n
            count += n
        prev_end = end
        if end == len(stream):
            break
    return total, count


@pytest.mark.parametrize("method,L,stride", [("concat", 16, 16), ("concat", 20, 6), ("document", 12, 5)])
def test_perplexity_matches_transformers(tmp_path, method, L, stride):
    hf = hf_model_dir(tmp_path / "hf", vocab=500)
    lm = neox.load(tmp_path / "hf")
    eod = 0
    g = torch.Generator().manual_seed(1)
    docs = [torch.randint(1, 500, (int(k),), generator=g).tolist() for k in torch.randint(3, 30, (6,), generator=g)]
    res = evaluate_perplexity(lm, docs, eod=eod, seq_length=L, stride=stride, method=method, batch_size=3)

    streams = [[eod, *d] for d in docs] if method == "document" else [[t for d in docs for t in (eod, *d)]]
    total, count = 0.0, 0
    for s in streams:  # HF windows hold max_length = L + 1 tokens: L inputs and their L targets
        a, b = hf_strided_nll(hf, s, [t != eod for t in s], L + 1, stride)
        total, count = total + a, count + b
    assert res["tokens"] == count == sum(map(len, docs))
    print(f"\n[eval parity] {method} L={L} stride={stride}: ppl neox {res['perplexity']:.6f} "
          f"hf {math.exp(total / count):.6f}")
    assert res["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-4)


def test_lambada_matches_transformers(tmp_path, shared_data):
    tok = build_tokenizer("HFTokenizer", shared_data / "20B_tokenizer.json")
    texts = read_jsonl(shared_data / "lambada_test.jsonl", limit=50)
    hf = hf_model_dir(tmp_path / "hf", vocab=tok.vocab_size)
    lm = neox.load(tmp_path / "hf")
    res = evaluate_lambada(lm, tok, texts, seq_length=64, batch_size=8, per_example=True)

    from tokenizers import Tokenizer

    ref_tok = Tokenizer.from_file(str(shared_data / "20B_tokenizer.json"))
    correct, nlls = [], []
    for text in texts:
        words = text.split(" ")
        ctx, tgt = ref_tok.encode(" ".join(words[:-1])).ids, ref_tok.encode(" " + words[-1]).ids
        seq = (ctx + tgt)[-65:]
        with torch.no_grad():
            logits = hf(torch.tensor([seq[:-1]])).logits[0, -len(tgt):]  # [k, V]
        t = torch.tensor(tgt)
        correct.append(bool((logits.argmax(-1) == t).all()))
        nlls.append(-torch.log_softmax(logits.double(), -1)[torch.arange(len(t)), t].sum().item())
    assert [e["correct"] for e in res["per_example"]] == correct
    assert res["accuracy"] == sum(correct) / len(texts)
    assert [e["nll"] for e in res["per_example"]] == pytest.approx(nlls, rel=1e-4)
    assert res["perplexity"] == pytest.approx(math.exp(sum(nlls) / len(texts)), rel=1e-4)

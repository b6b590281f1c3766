"""Evaluation of a causal LM: perplexity / bits per byte on text or token data, and LAMBADA accuracy.

Every evaluation becomes a list of *items*: an input window `ids` [T] and `labels` [T] (the token each
position must predict, -100 where nothing is scored). Items are cut into fixed batches in order and
batch b runs on data-parallel rank b % world, so each batch is computed exactly as in one process;
per-item results are then all-reduced (every other rank contributes zeros, which adds exactly) and
summed in item order. Hence the numbers under `torchrun` are bit-identical to one process.

Perplexity methods (both score every text token exactly once, never an end-of-document token):

* ``document``: each document alone, preceded by eod as its only context (lm-eval-harness's rolling
  log-likelihood), cut into windows of `seq_length` inputs.
* ``concat``: documents joined as ``eod d1 eod d2 ...`` into one stream (the training-data view), so
  a document's first tokens see the end of the previous one.

With a `stride` < `seq_length` consecutive windows overlap: each window scores only its last `stride`
targets, so every scored token (after the first window) has at least `seq_length - stride` tokens of
context (Hugging Face's "strided sliding window" perplexity). stride = seq_length: disjoint windows.

Bits per byte = (total nats) / (UTF-8 bytes of the evaluated text) / ln 2, which compares models
with different tokenizers; the bytes are those of the documents' text (for token data, the text that
the tokenizer decodes each document to, without eod).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

IGNORE = -100
METHODS = ("document", "concat")


@dataclass
class Item:
    """One forward window: `ids` [T] inputs, `labels` [T] targets (IGNORE: not scored)."""

    ids: list[int]
    labels: list[int]


# ------------------------------------------------------------------------------------------- windows
def rolling_windows(n: int, seq_length: int, stride: int | None = None) -> list[tuple[int, int, int]]:
    """Windows over a stream of n tokens: (begin, end, score_from).

    The window reads tokens [begin, end): inputs [begin, end - 1), targets [begin + 1, end); it scores
    the targets at absolute positions >= score_from. Together the windows score 1..n-1 once each.
    """
    stride = seq_length if stride is None else stride
    if not 1 <= stride <= seq_length:
        raise ValueError(f"stride {stride} must be between 1 and seq_length ({seq_length})")
    out: list[tuple[int, int, int]] = []
    begin, score_from = 0, 1
    while score_from < n:
        end = min(begin + seq_length + 1, n)
        out.append((begin, end, score_from))
        score_from = end
        begin += stride
    return out


def stream_items(stream: Sequence[int], scored: Sequence[bool], seq_length: int,
                 stride: int | None = None) -> list[Item]:
    """Items for one token stream; position p is a target only when scored[p]."""
    items = []
    for begin, end, score_from in rolling_windows(len(stream), seq_length, stride):
        ids = list(stream[begin:end - 1])
        labels = [stream[p] if p >= score_from and scored[p] else IGNORE for p in range(begin + 1, end)]
        items.append(Item(ids, labels))
    return items


def perplexity_items(docs: Sequence[Sequence[int]], eod: int, seq_length: int, stride: int | None = None,
                     method: str = "document") -> list[Item]:
    """Items that score every token of every document once (see the module docstring for methods)."""
    if method not in METHODS:
        raise ValueError(f"perplexity method {method!r} is not known; use one of {', '.join(METHODS)}")
    if method == "document":
        return [it for d in docs if len(d) for it in stream_items([eod, *d], [False] + [True] * len(d),
                                                                     seq_length, stride)]
    stream, scored = [], []
    for d in docs:
        stream += [eod, *d]
        scored += [False] + [True] * len(d)
    return stream_items(stream, scored, seq_length, stride)


# ------------------------------------------------------------------------------------------- scoring
def _world(group) -> tuple[int, int]:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(group), dist.get_world_size(group)
    return 0, 1


@torch.no_grad()
def score_items(model: Callable, items: Sequence[Item], *, batch_size: int = 8, device=None,
                group=None, pad_id: int = 0) -> torch.Tensor:
    """Per-item float64 [N, 3]: (sum of target NLL in nats, number of targets, 1 if all greedy-correct).

    Batches are consecutive items, right-padded (harmless under causal attention). Under
    torch.distributed, rank r runs batches r, r + W, ...; every rank returns the full result.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    rank, world = _world(group)
    device = torch.device(device) if device is not None else next(_params(model), torch.empty(0)).device
    out = torch.zeros(len(items), 3, dtype=torch.float64)
    for b, start in enumerate(range(0, len(items), batch_size)):
        if b % world != rank:
            continue
        chunk = items[start:start + batch_size]
        t = max(len(it.ids) for it in chunk)
        ids = torch.full((len(chunk), t), pad_id, dtype=torch.long)
        labels = torch.full((len(chunk), t), IGNORE, dtype=torch.long)
        for i, it in enumerate(chunk):
            assert len(it.ids) == len(it.labels) > 0
            ids[i, :len(it.ids)] = torch.tensor(it.ids)
            labels[i, :len(it.labels)] = torch.tensor(it.labels)
        ids, labels = ids.to(device), labels.to(device)
        mask = labels != IGNORE  # [B, T]
        logits = model(ids)[mask].float()  # [N, V]: only the scored positions
        target = labels[mask]  # [N]
        nll = -F.log_softmax(logits, dim=-1).gather(-1, target.unsqueeze(-1)).squeeze(-1).double()  # [N]
        miss = (logits.argmax(-1) != target).double()  # [N]
        row = mask.nonzero()[:, 0].cpu()  # [N]: the item of each scored position
        n = len(chunk)  # sums on the CPU: a sequential, deterministic order (CUDA's index_add_ is not)
        out[start:start + n, 0] = torch.zeros(n, dtype=torch.float64).index_add_(0, row, nll.cpu())
        out[start:start + n, 1] = mask.sum(-1).double().cpu()
        misses = torch.zeros(n, dtype=torch.float64).index_add_(0, row, miss.cpu())
        out[start:start + n, 2] = (misses == 0).double()
    if world > 1:
        reduce_dev = device if torch.distributed.get_backend(group) == "nccl" else torch.device("cpu")
        buf = out.to(reduce_dev)
        torch.distributed.all_reduce(buf, group=group)  # each row is non-zero on one rank only: exact
        out = buf.cpu()
    return out


def _params(model):
    return model.parameters() if isinstance(model, torch.nn.Module) else iter(())


# ------------------------------------------------------------------------------------- perplexity
def perplexity_summary(nll_nats: float, tokens: int, num_bytes: int | None) -> dict:
    """Loss, token perplexity, and (with a byte count) bits and nats per byte."""
    res = {"tokens": int(tokens), "nll_sum": float(nll_nats)}
    loss = nll_nats / tokens if tokens else float("nan")
    res.update(loss=loss, perplexity=math.exp(loss) if tokens else float("nan"))
    if num_bytes:
        res.update(bytes=int(num_bytes), nats_per_byte=nll_nats / num_bytes,
                   bits_per_byte=nll_nats / num_bytes / math.log(2), byte_perplexity=math.exp(nll_nats / num_bytes))
    return res


def evaluate_perplexity(model, docs: Sequence[Sequence[int]], *, eod: int, seq_length: int,
                        stride: int | None = None, method: str = "document", num_bytes: int | None = None,
                        batch_size: int = 8, device=None, group=None) -> dict:
    """Perplexity of token documents (eod not included in them); bits per byte when num_bytes is given."""
    items = perplexity_items(docs, eod, seq_length, stride, method)
    per = score_items(model, items, batch_size=batch_size, device=device, group=group)
    nll, tokens = _ordered_sum(per[:, 0]), int(per[:, 1].sum().item())
    assert tokens == sum(len(d) for d in docs)
    res = perplexity_summary(nll, tokens, num_bytes)
    res.update(task="perplexity", method=method, documents=len(docs), seq_length=seq_length,
               stride=stride or seq_length, windows=len(items))
    return res


def _ordered_sum(x: torch.Tensor) -> float:
    """Sum in index order (float64), so the value does not depend on how ranks split the work."""
    total = 0.0
    for v in x.tolist():
        total += v
    return total


# ----------------------------------------------------------------------------------------- LAMBADA
def lambada_split(text: str) -> tuple[str, str]:
    """(context, target): the text without its last word (and the space before it), and " " + last word."""
    context, _, word = text.rstrip().rpartition(" ")
    if not word:
        raise ValueError(f"LAMBADA passage has no last word to predict: {text[:60]!r}")
    return context, " " + word


def lambada_items(tokenizer, texts: Sequence[str], seq_length: int) -> list[Item]:
    """Context and target tokenized separately; the context is cut on the left to fit seq_length."""
    items = []
    for text in texts:
        context, target = lambada_split(text)
        ctx = tokenizer.tokenize(context) or [tokenizer.eod]
        tgt = tokenizer.tokenize(target)
        seq = (ctx + tgt)[-(seq_length + 1):]
        if len(tgt) > seq_length:
            raise ValueError(f"LAMBADA target {target!r} has {len(tgt)} tokens, more than seq_length {seq_length}")
        k = len(tgt)
        items.append(Item(seq[:-1], [IGNORE] * (len(seq) - 1 - k) + seq[-k:]))
    return items


def evaluate_lambada(model, tokenizer, texts: Sequence[str], *, seq_length: int, batch_size: int = 8,
                     device=None, group=None, per_example: bool = False) -> dict:
    """Last-word accuracy (greedy decoding of every target token from the true prefix) and perplexity.

    `perplexity` is lm-eval-harness's: exp of the mean over passages of the target word's NLL;
    `token_perplexity` is per target token.
    """
    items = lambada_items(tokenizer, texts, seq_length)
    per = score_items(model, items, batch_size=batch_size, device=device, group=group)
    n = len(items)
    nll = _ordered_sum(per[:, 0])
    tokens = int(per[:, 1].sum().item())
    correct = int(per[:, 2].sum().item())
    res = {"task": "lambada", "examples": n, "correct": correct, "accuracy": correct / n if n else float("nan"),
           "perplexity": math.exp(nll / n) if n else float("nan"), "target_tokens": tokens,
           "token_perplexity": math.exp(nll / tokens) if tokens else float("nan"), "nll_sum": nll}
    if per_example:
        res["per_example"] = [{"nll": r[0], "tokens": int(r[1]), "correct": bool(r[2])} for r in per.tolist()]
    return res


# ------------------------------------------------------------------------------------------- inputs
def read_jsonl(path, key: str = "text", limit: int | None = None) -> list[str]:
    """The `key` field of each line of a jsonl file (the first `limit` non-empty lines)."""
    texts = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            if limit is not None and len(texts) >= limit:
                break
            row = json.loads(line)
            if key not in row:
                raise ValueError(f"{path}:{n}: no {key!r} field (fields: {sorted(row)}); pass --jsonl-key")
            texts.append(row[key])
    return texts


def split_range(num: int, split: str, which: str) -> tuple[int, int]:
    """[begin, end) of the `which` part ("train", "valid", "test") of num sequences, as megatron-core cuts."""
    from megatron.core.datasets.blended_megatron_dataset_config import (
        convert_split_vector_to_split_matrix,
        parse_and_normalize_split,
    )

    parts = ("train", "valid", "test")
    if which not in parts:
        raise ValueError(f"split part {which!r} is not known; use one of {', '.join(parts)}")
    lo, hi = convert_split_vector_to_split_matrix(parse_and_normalize_split(split))[parts.index(which)]
    return int(round(lo * num)), int(round(hi * num))


def read_bin_documents(prefix, eod: int, *, split: str | None = None, which: str = "valid",
                       limit: int | None = None) -> list[list[int]]:
    """Documents (sequences, a trailing eod removed) of a .bin/.idx prefix, or of one part of its split."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    missing = [ext for ext in (".bin", ".idx") if not Path(f"{prefix}{ext}").is_file()]
    if missing:
        raise ValueError(f"data prefix {str(prefix)!r} has no {' or '.join(missing)} file; give the path "
                         f"without the extension")
    ds = IndexedDataset(str(prefix))
    begin, end = split_range(len(ds), split, which) if split else (0, len(ds))
    if limit is not None:
        end = min(end, begin + limit)
    docs = []
    for i in range(begin, end):
        d = ds[i].tolist()
        if d and d[-1] == eod:
            d = d[:-1]
        docs.append(d)
    return docs


def text_bytes(texts: Iterable[str]) -> int:
    return sum(len(t.encode("utf-8")) for t in texts)


# ------------------------------------------------------------------------------------------- output
def format_table(res: dict) -> str:
    """A two-column table of a result dict (floats with 6 significant digits)."""
    rows = [(k, f"{v:.6g}" if isinstance(v, float) else str(v)) for k, v in res.items() if k != "per_example"]
    w = max(len(k) for k, _ in rows)
    line = "-" * (w + 3 + max(len(v) for _, v in rows))
    return "\n".join([line, *(f"{k:<{w}}   {v}" for k, v in rows), line])

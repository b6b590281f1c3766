"""Batched autoregressive generation for GPT-NeoX, with a preallocated KV cache.

Prompts of different lengths are left-padded to one block: each row's real tokens get positions
0..L-1 and padding is masked out of attention, so a row generates exactly what it would alone. The
prompt block runs once (prefill), then one token per step against the cache. Rows finish on their
own (end-of-document id, a stop token sequence, a stop string on the decoded tail); a finished row
keeps riding along with padding until every row is done or max_new_tokens is reached.

Under tensor parallelism every TP rank runs this same loop on its shard of the model: the
vocab-parallel logits of the last position are all-gathered, every rank samples with the same
seed, and the tokens are broadcast from the first TP rank so all ranks agree bit for bit.

`use_cache=False` recomputes the whole sequence each step; it is the reference the cache must match.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from megatron_ext.tensor_parallel import gather_from_tensor_parallel_region
from neox.inference.kv_cache import KVCache
from neox.inference.sampling import SamplingParams, sample_next

FINISH_EOD, FINISH_STOP, FINISH_LENGTH = "eod", "stop", "length"


@dataclass
class GenerationResult:
    """Per row: new tokens (without the eod id or a matched stop token sequence; a stop string's
    tokens are kept, its text is cut), why the row ended, the decoded text when a detokenizer was
    given, and (return_logits) the real-vocab logits [B, V] that picked each step's tokens."""

    tokens: list[list[int]]
    finish_reasons: list[str]
    texts: list[str] | None = None
    step_logits: list[torch.Tensor] = field(default_factory=list)


class _Decoder:
    """A GPTNeoX (any TP rank) or CausalLM seen as: ids/positions/mask(/cache) -> last logits [B, V]."""

    def __init__(self, model: nn.Module):
        net = model.model if hasattr(model, "model") and hasattr(model.model, "layers") else model
        if not hasattr(net, "layers") or not hasattr(net, "cfg"):
            raise ValueError(f"generate needs a GPTNeoX or CausalLM, got {type(model).__name__}")
        if not (net.pre_process and net.post_process):
            raise ValueError("generate needs the whole model on this rank (pipeline size 1)")
        self.net, self.ps, self.vocab_size = net, net.ps, net.cfg.vocab_size
        self.max_positions = net.cfg.max_position_embeddings or net.cfg.seq_length
        p = next(net.parameters())
        self.device, self.dtype = p.device, p.dtype

    def __call__(self, ids, pos, mask, cache: KVCache | None) -> torch.Tensor:
        kw = {} if cache is None else {"kv_cache": cache}
        out = self.net(ids, position_ids=pos, attention_mask=mask, **kw)  # [B, T, Vpad/tp]
        last = gather_from_tensor_parallel_region(out[:, -1].contiguous(), self.ps)  # [B, Vpad]
        return last[:, : self.vocab_size].float()

    def agree(self, tokens: torch.Tensor) -> torch.Tensor:
        """Every TP rank takes the first TP rank's tokens (they already match; this makes it exact)."""
        if self.ps.tp_size > 1:
            dist.broadcast(tokens, src=self.ps.tp_ranks[0], group=self.ps.tp_group)
        return tokens


class _StopChecker:
    """Decides, after each appended token, whether a row is finished (and trims what it must)."""

    def __init__(self, eod_id, stop_sequences, stop_strings, detokenize):
        if stop_strings and detokenize is None:
            raise ValueError("stop_strings need a detokenize function (e.g. tokenizer.detokenize)")
        if any(len(s) == 0 for s in stop_sequences) or any(s == "" for s in stop_strings):
            raise ValueError("stop sequences and stop strings must not be empty")
        self.eod = eod_id
        self.seqs = [list(map(int, s)) for s in stop_sequences]
        self.strings = list(stop_strings)
        self.detok = detokenize
        # tokens decode to >= 1 character each (bar rare empty ones), so this tail covers any match
        self.window = 2 * max((len(s) for s in self.strings), default=0) + 8

    def push(self, row: list[int], tok: int) -> str | None:
        """Append tok to row unless it ends the row; returns a finish reason or None."""
        if self.eod is not None and tok == self.eod:
            return FINISH_EOD
        row.append(tok)
        for seq in self.seqs:
            if row[-len(seq):] == seq:
                del row[-len(seq):]
                return FINISH_STOP
        if self.strings:
            tail = self.detok(row[-self.window:])
            if any(s in tail for s in self.strings):
                return FINISH_STOP
        return None

    def text(self, row: list[int], reason: str) -> str:
        text = self.detok(row)
        if reason == FINISH_STOP and self.strings:
            cuts = [i for i in (text.find(s) for s in self.strings) if i >= 0]
            text = text[: min(cuts)] if cuts else text
        return text


@torch.no_grad()
def generate_batch(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int = 32,
    params: SamplingParams | None = None,
    eod_id: int | None = None,
    stop_sequences: Sequence[Sequence[int]] = (),
    stop_strings: Sequence[str] = (),
    detokenize: Callable[[Sequence[int]], str] | None = None,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
    pad_id: int = 0,
    return_logits: bool = False,
) -> GenerationResult:
    """Continue every prompt (lists of token ids, any lengths) by up to max_new_tokens tokens.

    model: a GPTNeoX (this TP rank's shard; all TP ranks must call together) or a CausalLM.
    eod_id ends a row (not kept). stop_sequences: token-id sequences that end a row (removed);
    stop_strings: texts that end a row when the decoded tail contains them (needs detokenize).
    seed / generator: the sampling stream (the same on every TP rank). Greedy when
    params.temperature == 0.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate_batch: every prompt needs at least one token")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    params = params or SamplingParams()
    dec = _Decoder(model)
    stop = _StopChecker(eod_id, stop_sequences, stop_strings, detokenize)
    b, plen = len(prompts), max(len(p) for p in prompts)
    total = plen + max_new_tokens
    if total > dec.max_positions:
        raise ValueError(f"the longest prompt ({plen} tokens) + max_new_tokens ({max_new_tokens}) = {total} "
                         f"exceeds the model's {dec.max_positions} positions; shorten the prompt or "
                         f"lower max_new_tokens")
    if generator is None and seed is not None:
        generator = torch.Generator(device=dec.device).manual_seed(seed)

    dev = dec.device
    tokens = torch.full((b, total), pad_id, dtype=torch.long, device=dev)  # [B, P + N]
    mask = torch.ones((b, total), dtype=torch.long, device=dev)  # 1 = real token (future ones too)
    for r, p in enumerate(prompts):
        tokens[r, plen - len(p): plen] = torch.as_tensor(list(p), dtype=torch.long)
        mask[r, : plen - len(p)] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)  # [B, P + N]: 0.. from each row's first real token
    padded = bool((mask == 0).any())
    cache = KVCache.for_model(dec.net, b, total) if use_cache else None

    def attn_mask(end: int):
        return mask[:, :end] if padded else None

    out = [[] for _ in range(b)]
    reasons: list[str | None] = [None] * b
    result = GenerationResult(tokens=out, finish_reasons=reasons)
    if max_new_tokens == 0:
        reasons[:] = [FINISH_LENGTH] * b
        return result
    logits = dec(tokens[:, :plen], pos[:, :plen], attn_mask(plen), cache)  # prefill: [B, V]
    cur = plen
    for step in range(max_new_tokens):
        if return_logits:
            result.step_logits.append(logits)
        nxt = dec.agree(sample_next(logits, params, generator).to(torch.long))  # [B]
        done = torch.tensor([x is not None for x in reasons], device=dev)
        nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
        tokens[:, cur] = nxt
        cur += 1
        for r, tok in enumerate(nxt.tolist()):
            if reasons[r] is None:
                reasons[r] = stop.push(out[r], tok)
        if all(x is not None for x in reasons) or step == max_new_tokens - 1:
            break
        if cache is not None:
            logits = dec(tokens[:, cur - 1: cur], pos[:, cur - 1: cur], attn_mask(cur), cache)
        else:
            logits = dec(tokens[:, :cur], pos[:, :cur], attn_mask(cur), None)
    reasons[:] = [x or FINISH_LENGTH for x in reasons]
    if detokenize is not None:
        result.texts = [stop.text(row, why) for row, why in zip(out, reasons)]
    return result


def generate(
    model: nn.Module,
    prompt_ids: Sequence[int],
    *,
    max_new_tokens: int = 32,
    params: SamplingParams | None = None,
    stop_token_ids: Sequence[int] = (),
    seed: int | None = None,
    use_cache: bool = True,
) -> list[int]:
    """Continue one prompt; returns only the new tokens (a stop token ends it and is not kept)."""
    if not prompt_ids:
        raise ValueError("the prompt is empty: give at least one token")
    res = generate_batch(model, [list(prompt_ids)], max_new_tokens=max_new_tokens, params=params,
                         stop_sequences=[[int(t)] for t in stop_token_ids], seed=seed, use_cache=use_cache)
    return res.tokens[0]

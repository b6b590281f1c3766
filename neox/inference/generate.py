"""Autoregressive generation over any causal LM that maps ``input_ids [B, T]`` to logits ``[B, T, V]``.

This first version recomputes the whole window each step (no KV cache); it is the reference that the
cached path (a later addition) must match token for token.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from neox.inference.sampling import SamplingParams, sample_next


@torch.no_grad()
def generate(
    model: Callable[[torch.Tensor], torch.Tensor],
    prompt_ids: Sequence[int],
    *,
    max_new_tokens: int = 32,
    params: SamplingParams | None = None,
    stop_token_ids: Sequence[int] = (),
    max_context: int | None = None,
    seed: int | None = None,
) -> list[int]:
    """Continue ``prompt_ids``; returns only the new tokens (a stop token ends it and is not kept).

    ``max_context`` bounds the window fed to the model (e.g. the model's ``seq_length``): older
    tokens fall off the left, as they would for any fixed-context transformer.
    """
    if not prompt_ids:
        raise ValueError("the prompt is empty: give at least one token")
    params = params or SamplingParams()
    generator = None
    if seed is not None:
        generator = torch.Generator().manual_seed(seed)
    stops = set(int(t) for t in stop_token_ids)
    tokens = list(int(t) for t in prompt_ids)
    new: list[int] = []
    for _ in range(max_new_tokens):
        window = tokens[-max_context:] if max_context else tokens
        logits = model(torch.tensor([window], dtype=torch.long))  # [1, T, V]
        nxt = int(sample_next(logits[:, -1, :], params, generator)[0])
        if nxt in stops:
            break
        tokens.append(nxt)
        new.append(nxt)
    return new

"""RWKV-4 initialisation, as BlinkDL's RWKV-v4 (`RWKV_Init` and the "fancy init" of the mixers).

Per-channel schedules depend on the block's place in the stack (ratio_0_to_1 = i / (L - 1),
ratio_1_to_almost0 = 1 - i / L) and on the channel h of D:
    time_decay[h] = -5 + 8 * (h / (D - 1)) ** (0.7 + 1.3 * ratio_0_to_1)
    time_first[h] = log(0.3) + zigzag[h],  zigzag = ((h + 1) % 3 - 1) * 0.5
    x[h] = h / D;  att time_mix_k = x ** r,  time_mix_v = x ** r + 0.3 * ratio_0_to_1,
    time_mix_r = x ** (0.5 r);  ffn time_mix_k = time_mix_r = x ** r     (r = ratio_1_to_almost0)
Matrices: orthogonal with gain sqrt(out / in) when out > in (att.value, ffn.key); zero for att.key,
att.receptance, att.output, ffn.receptance, ffn.value (BlinkDL's scale_init = 0); the head orthogonal
with gain 0.5 * sqrt(V / D); the embedding orthogonal with gain 1e-4 * sqrt(max(V, D)).

Each init method fills a FULL master tensor (the megatron_ext contract). Vocabulary tensors are
initialised over the real vocabulary rows only (padding rows are zero), so the values do not depend on
the TP-dependent padding.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

InitMethod = Callable[[torch.Tensor], None]


def _ratios(layer_id: int, num_layers: int) -> tuple[float, float]:
    ratio_0_to_1 = layer_id / (num_layers - 1) if num_layers > 1 else 0.0
    ratio_1_to_almost0 = 1.0 - layer_id / num_layers
    return ratio_0_to_1, ratio_1_to_almost0


def time_mix_schedule(d: int, layer_id: int, num_layers: int) -> dict[str, torch.Tensor]:
    """Full [D] float32 vectors: time_decay, time_first, time_mix_k/v/r of block `layer_id`."""
    r01, r10 = _ratios(layer_id, num_layers)
    h = torch.arange(d, dtype=torch.float64)
    x = h / d
    return {
        "time_decay": (-5 + 8 * (h / (d - 1)) ** (0.7 + 1.3 * r01)).float(),
        "time_first": (math.log(0.3) + ((h + 1) % 3 - 1) * 0.5).float(),
        "time_mix_k": (x ** r10).float(),
        "time_mix_v": (x ** r10 + 0.3 * r01).float(),
        "time_mix_r": (x ** (0.5 * r10)).float(),
    }


def channel_mix_schedule(d: int, layer_id: int, num_layers: int) -> dict[str, torch.Tensor]:
    """Full [D] float32 vectors: time_mix_k/r of block `layer_id`'s channel mixing."""
    _, r10 = _ratios(layer_id, num_layers)
    x = torch.arange(d, dtype=torch.float64) / d
    return {"time_mix_k": (x ** r10).float(), "time_mix_r": (x ** r10).float()}


def zeros_init(t: torch.Tensor) -> None:
    with torch.no_grad():
        t.zero_()


def orthogonal_init(scale: float) -> InitMethod:
    """Orthogonal [out, in] with gain scale * sqrt(out / in) when out > in, else scale (RWKV_Init)."""

    def init(t: torch.Tensor) -> None:
        out, inp = t.shape
        gain = scale * (math.sqrt(out / inp) if out > inp else 1.0)
        torch.nn.init.orthogonal_(t, gain=gain)

    return init


def _vocab_rows(vocab_size: int, gain_of: Callable[[int, int], float]) -> InitMethod:
    def init(t: torch.Tensor) -> None:
        with torch.no_grad():
            t.zero_()
            rows = t[:vocab_size]
            torch.nn.init.orthogonal_(rows, gain=gain_of(*rows.shape))

    return init


def embedding_init(vocab_size: int) -> InitMethod:
    """[Vpad, D]: the real rows orthogonal with gain 1e-4 * sqrt(max(V, D)), padding rows zero."""
    return _vocab_rows(vocab_size, lambda v, d: 1e-4 * math.sqrt(max(v, d)))


def head_init(vocab_size: int) -> InitMethod:
    """[Vpad, D]: the real rows orthogonal with gain 0.5 * sqrt(V / D) (when V > D), padding rows zero."""
    return _vocab_rows(vocab_size, lambda v, d: 0.5 * (math.sqrt(v / d) if v > d else 1.0))

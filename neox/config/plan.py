"""Analytic sizes of a model: exact parameter counts (total and per GPU) and training FLOPs per token.

Pure arithmetic on ModelConfig (no torch), so `tools/plan.py` can size a 20B run on a laptop.
GPT-NeoX parameter layout (names as the checkpoint format):
    embed [Vpad, D]; per layer: 2 norms (2D each), query_key_value [3D, D] + [3D], dense [D, D] + [D],
    dense_h_to_4h [F, D] + [F], dense_4h_to_h [D, F] + [D]; final_norm 2D; lm_head [Vpad, D] if untied.
RWKV-4 (no biases): emb [Vpad, D], ln0 2D (block 0), per block ln1/ln2 (2D each), time mixing
    time_decay/time_first/time_mix_{k,v,r} (5D) + key/value/receptance/output [D, D],
    channel mixing time_mix_{k,r} (2D) + key [F, D], receptance [D, D], value [D, F]; ln_out 2D; head.
"""

from __future__ import annotations

from .errors import ConfigError
from .model import ModelConfig


def _layer_params(m: ModelConfig, tp: int = 1) -> int:
    """Parameters of one block on one TP rank (split weights / tp, replicated ones whole)."""
    d, f = m.hidden_size, m.ffn_size
    if m.model_type == "rwkv":
        # RWKV is not tensor-parallel in the planner's model: count the whole block.
        return 2 * 2 * d + 5 * d + 4 * d * d + 2 * d + f * d + d * d + d * f
    split = (3 * d * d + 3 * d) + d * d + (f * d + f) + d * f  # column/row-parallel weights and biases
    replicated = 2 * 2 * d + d + d  # two norms, dense bias, dense_4h_to_h bias
    return split // tp + replicated


def _embedding_params(m: ModelConfig, tp: int) -> int:
    return m.padded_vocab_size(tp) * m.hidden_size // tp


def count_parameters(m: ModelConfig, tp: int = 1) -> int:
    """Exact number of parameters of the whole model (vocab padded for `tp`, as the model builds it)."""
    total = m.num_layers * _layer_params(m, 1)
    vpad_d = m.padded_vocab_size(tp) * m.hidden_size
    heads = 1 if m.no_weight_tying else 0
    total += vpad_d * (1 + heads) + 2 * m.hidden_size  # embedding, lm_head, final norm
    if m.model_type == "rwkv":
        total += 2 * m.hidden_size  # ln0
    return total


def stage_layer_counts(m: ModelConfig, pp: int, method: str = "uniform", tp: int = 1) -> list[int]:
    """Layers per pipeline stage. 'uniform': equal counts (earlier stages take any remainder);
    'parameters': contiguous split minimising the largest stage, embeddings and head included."""
    n = m.num_layers
    if pp > n:
        raise ConfigError(f"pipe_parallel_size {pp} exceeds num_layers {n}")
    if method == "uniform":
        return [n // pp + (1 if s < n % pp else 0) for s in range(pp)]
    layer = _layer_params(m, tp)
    first_extra = _embedding_params(m, tp)
    last_extra = 2 * m.hidden_size + (_embedding_params(m, tp) if (m.no_weight_tying or pp > 1) else 0)

    def cost(stage: int, k: int) -> int:
        return k * layer + (first_extra if stage == 0 else 0) + (last_extra if stage == pp - 1 else 0)

    # best[s][i]: smallest max-stage cost placing the first i layers on stages 0..s (each >= 1 layer).
    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(pp)]
    cut = [[0] * (n + 1) for _ in range(pp)]
    for i in range(1, n + 1):
        best[0][i] = cost(0, i)
    for s in range(1, pp):
        for i in range(s + 1, n + 1):
            for j in range(s, i):
                c = max(best[s - 1][j], cost(s, i - j))
                if c < best[s][i]:
                    best[s][i], cut[s][i] = c, j
    counts, i = [], n
    for s in range(pp - 1, 0, -1):
        counts.append(i - cut[s][i])
        i = cut[s][i]
    counts.append(i)
    return counts[::-1]


def stage_parameters(m: ModelConfig, tp: int = 1, pp: int = 1, method: str = "uniform") -> list[int]:
    """Parameters held by one GPU of each pipeline stage (TP rank 0; all TP ranks hold the same count).
    The first stage holds the embedding; the last holds the final norm and the output head (with tied
    embeddings and pp > 1 the last stage keeps its own copy of the embedding, as Megatron does)."""
    counts = stage_layer_counts(m, pp, method, tp)
    emb = _embedding_params(m, tp)
    out = []
    for s, k in enumerate(counts):
        total = k * _layer_params(m, tp)
        if s == 0:
            total += emb + (2 * m.hidden_size if m.model_type == "rwkv" else 0)
        if s == pp - 1:
            total += 2 * m.hidden_size + (emb if (m.no_weight_tying or pp > 1) else 0)
        out.append(total)
    return out


def flops_per_token(m: ModelConfig, tp: int = 1, checkpoint_activations: bool = False) -> dict[str, float]:
    """Matmul FLOPs per trained token (a multiply-add = 2 FLOPs; norms, softmax, rotary ignored).

    forward = 2 * (matmul weights per layer * L + Vpad * D)          # every weight once per token
            + L * 4 * s * D                                           # QK^T and scores @ V, full s
    With F = 4D this is 24 L D^2 (1 + s / (6 D) + Vpad / (12 L D)), and training (forward + backward,
    backward = 2x forward) is model_flops = 3 * forward = 72 L D^2 (1 + s/(6D) + Vpad/(12 L D)),
    Megatron's formula. Activation checkpointing reruns the layers' forward in the backward pass, so
    hardware_flops = model_flops + the layers' forward (the output head is not recomputed).
    RWKV has no attention term (its WKV recurrence is O(D) per token and left out).
    """
    d, f, L, s = m.hidden_size, m.ffn_size, m.num_layers, m.seq_length
    vpad = m.padded_vocab_size(tp)
    if m.model_type == "rwkv":
        layer_fwd = 2 * (4 * d * d + f * d + d * d + d * f)
    else:
        layer_fwd = 2 * (4 * d * d + 2 * d * f) + 4 * s * d
    forward = L * layer_fwd + 2 * vpad * d
    model = 3 * forward
    hardware = model + (L * layer_fwd if checkpoint_activations else 0)
    return {"forward": float(forward), "model": float(model), "hardware": float(hardware)}

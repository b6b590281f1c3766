"""Analytic sizes of a model: exact parameter counts (total and per GPU), training FLOPs per token and
memory per GPU (model states and activations, per pipeline stage; formulas in docs/planning.md).

Pure arithmetic on ModelConfig (no torch), so `tools/plan.py` can size a 20B run on a laptop.
GPT-NeoX parameter layout (names as the checkpoint format):
    embed [Vpad, D]; per layer: 2 norms (2D each), query_key_value [3D, D] + [3D], dense [D, D] + [D],
    dense_h_to_4h [F, D] + [F], dense_4h_to_h [D, F] + [D]; final_norm 2D; lm_head [Vpad, D] if untied.
RWKV-4 (no biases): emb [Vpad, D], ln0 2D (block 0), per block ln1/ln2 (2D each), time mixing
    time_decay/time_first/time_mix_{k,v,r} (5D) + key/value/receptance/output [D, D],
    channel mixing time_mix_{k,r} (2D) + key [F, D], receptance [D, D], value [D, F]; ln_out 2D; head
    (always untied). Under TP the matrices and time_decay/time_first split, the rest is replicated.
Activations: per tensor that neox's models keep for backward (`gpt_neox_layer_activation_bytes`,
`rwkv_layer_activation_bytes`; tests/unit/test_plan_gpt_neox.py and test_plan_rwkv.py measure them with
saved-tensor hooks). Korthikanti et al. 2022 (`layer_activation_bytes`) is kept for comparison only.
"""

from __future__ import annotations

from .errors import ConfigError
from .model import ModelConfig


def _layer_params(m: ModelConfig, tp: int = 1) -> int:
    """Parameters of one block on one TP rank (split weights / tp, replicated ones whole)."""
    d, f = m.hidden_size, m.ffn_size
    if m.model_type == "rwkv":
        # TP splits channels: att key/value/receptance/output and time_decay/time_first, ffn key/receptance/
        # value; the norms and the token-shift mixes (time_mix_*) are replicated.
        split = 4 * d * d + 2 * d + f * d + d * d + d * f
        replicated = 2 * 2 * d + 3 * d + 2 * d
        return split // tp + replicated
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


# ------------------------------------------------------------------------------------------------ memory
# Bytes per parameter of the model states, by training precision: (params, grads, optimizer).
# Mixed precision (fp16/bf16) is DeepSpeed/Megatron-style: 16-bit params and grads, and an fp32 master
# copy next to the optimizer's fp32 moments. megatron_ext's optimizers keep the fp32 master even when the
# model itself is fp32 (one code path), so fp32 training pays it too.
PRECISION_BYTES = {"fp16": (2, 2), "bf16": (2, 2), "fp32": (4, 4)}
MASTER_BYTES = 4


def optimizer_states(optimizer: str = "Adam", momentum: float = 0.0) -> int:
    """fp32 tensors the torch optimizer keeps per parameter: Adam/AdamW m and v; Lion m; SGD its
    momentum buffer only when momentum > 0."""
    if optimizer in ("Adam", "AdamW"):
        return 2
    if optimizer == "Lion":
        return 1
    if optimizer == "SGD":
        return 1 if momentum > 0 else 0
    raise ConfigError(f"optimizer type {optimizer!r} has no memory model; use Adam, AdamW, SGD or Lion")


def model_state_bytes(params: int, precision: str, dp: int = 1, zero_stage: int = 0, optimizer: str = "Adam",
                      momentum: float = 0.0) -> dict:
    """Parameter, gradient and optimizer bytes of one GPU holding `params` parameters.

    ZeRO-1 shards the optimizer part (fp32 master + moments) evenly over the `dp` data-parallel ranks;
    params and grads stay whole (that would be ZeRO-2/3). Mixed precision with Adam: 2 + 2 + 12 bytes.
    """
    if precision not in PRECISION_BYTES:
        raise ConfigError(f"precision {precision!r} has no memory model; use fp32, fp16 or bf16")
    p_bytes, g_bytes = PRECISION_BYTES[precision]
    o_bytes = MASTER_BYTES + 4 * optimizer_states(optimizer, momentum)
    full = params * o_bytes
    return {
        "bytes_per_param": {"params": p_bytes, "grads": g_bytes, "optimizer": o_bytes},
        "params": params * p_bytes,
        "grads": params * g_bytes,
        "optimizer_no_zero": full,
        "optimizer_zero1": full / dp,
        "optimizer": full / dp if zero_stage >= 1 else full,
    }


def layer_activation_bytes(s: int, b: int, h: int, a: int, f: int | None = None, tp: int = 1,
                           sequence_parallel: bool = False, selective: bool = False, act_bytes: int = 2) -> float:
    """Activations one Megatron transformer layer keeps for backward, per micro-batch, on one TP rank: the
    paper's number, kept for comparison (neox's own layer is `gpt_neox_layer_activation_bytes`).

    Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models" (Sec. 4),
    with 16-bit activations (act_bytes e = 2), 1-byte dropout masks and F = 4h:
        no parallelism      sbh (34 + 5as/h)
        TP t                sbh (10 + 24/t + 5as/(ht))
        TP t + SP           sbh/t (34 + 5as/h)
        selective recompute drops the 5as/h term (softmax, its dropout mask and output are recomputed).
    Written out per tensor so fp32 (e = 4) and F != 4h also work:
        replicated over TP (split by SP)  sbh (4e + 2)      two norm inputs, QKV and h->F inputs, 2 masks
        split over TP                     sbh (4 + 2F/h) e  Q, K, V, dense input, h->F output, GeLU output
        attention scores, split over TP   a s^2 b (2e + 1)  softmax, dropout output, dropout mask
    At e = 2, F = 4h these are the paper's 10, 24 and 5.
    """
    f = 4 * h if f is None else f
    sbh = s * b * h
    replicated = sbh * (4 * act_bytes + 2) / (tp if sequence_parallel else 1)
    split = sbh * (4 + 2 * f / h) * act_bytes / tp
    scores = 0 if selective else a * s * s * b * (2 * act_bytes + 1) / tp
    return replicated + split + scores


# Per-token statistics of a LayerNorm (mean and rstd) and dropout masks, as CUDA keeps them: fp32
# statistics for 16-bit inputs, bool masks. (On CPU torch keeps both in the activation dtype; the
# measurement tests pass those sizes explicitly.)
NORM_STAT_BYTES = 4
MASK_BYTES = 1

# ------------------------------------------------------------------------------------- GPT-NeoX activations
# torch SDPA kernels as the planner names them. neox calls F.scaled_dot_product_attention(q, k, v,
# is_causal=True) with no mask in training. On CUDA, 16-bit inputs with head_dim <= 256 (a multiple of 8) go to
# a fused kernel: cuDNN on sm90/sm100 with recent torch and cuDNN, else FlashAttention-2; fp32 (or a head
# dim flash refuses) goes to the memory-efficient kernel. All three keep their inputs q, k, v, the output and
# an fp32 logsumexp per head and query ("flash"; "efficient" pads the queries to a multiple of 32), plus a
# philox seed and offset with dropout. The math fallback ("math", what CPU runs with dropout) forms the
# s x s probabilities, in fp32 for 16-bit inputs (torch upcasts unless allow_fp16_bf16_reduction_math_sdp).
SDPA_KERNELS = ("flash", "efficient", "math")
SDPA_RNG_BYTES = 16  # philox seed and offset (int64 each) a fused kernel keeps when it drops


def default_attention_kernel(act_bytes: int) -> str:
    """The SDPA kernel CUDA runs for neox's causal attention: a 16-bit fused one, else memory-efficient."""
    return "flash" if act_bytes == 2 else "efficient"


def gpt_neox_attention_bytes(s: int, b: int, d: int, heads: int, tp: int = 1, act_bytes: int = 2, *,
                             kernel: str = "flash", dropout: bool = False, attn_mask_bytes: int = MASK_BYTES) -> float:
    """Bytes neox's attention core keeps for backward on one TP rank (heads/t heads), per micro-batch: from the
    fused qkv output to the SDPA output (neox.models.gpt_neox.model.SelfAttention, neox.ops.causal_attention).

    Fused kernels ("flash", "efficient"; e = act_bytes, a = heads):
        q and k after rotary       2 e sbD/t   apply_rotary's cat makes new tensors, whatever rotary_pct
        v                            e sbD/t   its own copy: a view would keep the whole qkv output alive
        SDPA output                  e sbD/t
        logsumexp                  4 b a s'/t  fp32; s' = s ("flash", cuDNN), s rounded up to 32 ("efficient")
        philox seed + offset       16 B        with attention dropout
    "math" (c = max(e, 4): 16-bit inputs are upcast): scaled q, k and a copy of v, 3 c sbD/t (the rotated q, k
    and the qkv output are then freed); the probabilities c a s^2 b/t; with dropout its mask (attn_mask_bytes)
    and the dropped probabilities, (attn_mask_bytes + c) a s^2 b/t.
    """
    if kernel not in SDPA_KERNELS:
        raise ConfigError(f"attention kernel {kernel!r} has no memory model; use one of {', '.join(SDPA_KERNELS)}")
    sbd, ah = s * b * d / tp, heads / tp
    if kernel == "math":
        c, scores = max(act_bytes, 4), ah * s * s * b
        return 3 * c * sbd + c * scores + ((attn_mask_bytes + c) * scores if dropout else 0)
    rows = s if kernel == "flash" else -(-s // 32) * 32
    return 4 * act_bytes * sbd + 4 * b * ah * rows + (SDPA_RNG_BYTES if dropout else 0)


def gpt_neox_layer_activation_bytes(s: int, b: int, d: int, heads: int, f: int, tp: int = 1,
                                    sequence_parallel: bool = False, act_bytes: int = 2, *,
                                    parallel_residual: bool = False, hidden_dropout: bool = False,
                                    attention_dropout: bool = False, attention: str = "flash",
                                    stat_bytes: int = NORM_STAT_BYTES, mask_bytes: int = MASK_BYTES,
                                    attn_mask_bytes: int = MASK_BYTES) -> float:
    """Bytes one GPT-NeoX layer (neox.models.gpt_neox) keeps for backward, per micro-batch, on one TP rank.

    Counted per tensor autograd saves (e = act_bytes; q = t with sequence parallelism, else 1):
        input_norm input x, its output (the qkv layer's input), post_attention_norm output (the h->F layer's
        input); sequential residual also x + attn (post_attention_norm's input; the parallel form normalises
        x again)                                      (3 or 4) e sbD/q   under SP the column layers keep only
                                                                         their sequence shard
        LayerNorm mean and rstd, two norms            4 stat sb/q
        hidden dropout masks (hidden_dropout only)    2 mask sbD/q
        dense input (this rank's heads)               e sbD/t
        h->F output (GeLU input), GeLU output         2 e sbF/t
        attention core                                `gpt_neox_attention_bytes` (kernel `attention`)
    rotary_pct does not enter: the rotated q and k are whole new tensors either way, and the cos/sin tables
    are shared by a stage's layers (`gpt_neox_rotary_bytes`). neox has no selective recompute.
    """
    q = tp if sequence_parallel else 1
    sb = s * b
    replicated = (act_bytes * sb * d * (3 if parallel_residual else 4) + 4 * stat_bytes * sb
                  + (2 * mask_bytes * sb * d if hidden_dropout else 0)) / q
    split = act_bytes * sb * (d + 2 * f) / tp
    attn = gpt_neox_attention_bytes(s, b, d, heads, tp, act_bytes, kernel=attention, dropout=attention_dropout,
                                    attn_mask_bytes=attn_mask_bytes)
    return replicated + split + attn


def gpt_neox_rotary_bytes(s: int, rotary_dim: int, act_bytes: int = 2) -> float:
    """The cos and sin tables [1, s, rotary_dim] (activation dtype) that every layer's rotary multiplies by:
    made once per forward of a pipeline stage (model chunk) and kept until its backward, checkpointed or not."""
    return 2 * act_bytes * s * rotary_dim


def embedding_activation_bytes(s: int, b: int, d: int, tp: int = 1, sequence_parallel: bool = False, *,
                               dropout: bool = False, mask_bytes: int = MASK_BYTES) -> float:
    """What the input embedding keeps (first stage, outside activation checkpointing), both families: the
    int64 token ids of the lookup (under TP its shard-local ids and the bool out-of-shard mask), and the
    embedding dropout mask when hidden_dropout > 0."""
    q = tp if sequence_parallel else 1
    ids = 8 * s * b + (s * b if tp > 1 else 0)
    return ids + (mask_bytes * s * b * d / q if dropout else 0)


def _norm_input_bytes(s: int, b: int, d: int, tp: int, sequence_parallel: bool, act_bytes: int,
                      stat_bytes: int) -> float:
    q = tp if sequence_parallel else 1
    return (act_bytes * d + 2 * stat_bytes) * s * b / q


def _fused_head_bytes(s: int, b: int, d: int, vpad: int, tp: int, sequence_parallel: bool, act_bytes: int,
                      stat_bytes: int) -> float:
    """Final norm input and stats, then megatron_ext's vocab_parallel_linear_cross_entropy_sum: no logits, but
    the gradients it forms in forward: d/dh over the whole sequence (also under SP) and fp32 d/dW of the shard."""
    return (_norm_input_bytes(s, b, d, tp, sequence_parallel, act_bytes, stat_bytes)
            + act_bytes * s * b * d + 4 * vpad * d / tp)


def gpt_neox_head_activation_bytes(s: int, b: int, d: int, vpad: int, tp: int = 1, sequence_parallel: bool = False,
                                   act_bytes: int = 2, stat_bytes: int = NORM_STAT_BYTES) -> float:
    """GPT-NeoX's output head for one micro-batch on the last stage, as training runs it (GPTNeoX.forward_loss,
    the fused chunked head): final_norm's input e*sbD/q and stats, the head's d/dh e*sbD (the whole sequence,
    also under SP) and fp32 d/dW of the vocab shard 4*Vpad*D/t (tied or not). No fp32 softmax over the vocab."""
    return _fused_head_bytes(s, b, d, vpad, tp, sequence_parallel, act_bytes, stat_bytes)



def rwkv_layer_activation_bytes(s: int, b: int, d: int, f: int, tp: int = 1, sequence_parallel: bool = False,
                                act_bytes: int = 2, *, dropout: bool = False, stat_bytes: int = NORM_STAT_BYTES,
                                mask_bytes: int = MASK_BYTES) -> float:
    """Bytes one RWKV-4 block keeps for backward, per micro-batch, on one TP rank (neox.models.rwkv).

    Counted per tensor autograd saves (e = act_bytes, q = t with sequence parallelism, else 1):
        inputs of column layers        4 e sbD/q   att key/value/receptance and ffn key: under SP neox's
                                                    ColumnParallelLinear keeps only its sequence shard and
                                                    all-gathers it again in backward, as Megatron does
        replicated, split by SP         8 e sbD/q   ln1/ln2 inputs, both mixes' x and shifted x, ffn value
                                                    output and sigmoid(receptance) (the final product's)
        split over TP                   6 e sbD/t   att k, v, sigmoid(r), WKV output, output-layer input,
                                                    ffn receptance input (this rank's channel slice)
                                        2 e sbF/t   relu(key) and its square (the value layer's input)
        LayerNorm mean and rstd         4 stat sb/q two norms
        dropout masks (p > 0 only)      2 mask sbD/q
        per-layer constants             5 e D (1 - time_mix_*), 8 D/t (fp32 exp(time_decay) and w),
                                        4 D/t (fp32 copy of time_first, 16-bit models only),
                                        12 b D/t (the WKV op's fp32 initial state aa, bb, pp)
    The WKV op (neox.ops.wkv, CUDA and CPU kernels) saves k and v in the activation dtype and recomputes
    its recurrence in backward, so nothing of size s x D is kept in fp32. RWKV has no attention scores,
    hence no selective-recompute saving (neox has no selective recompute for it either).
    """
    q = tp if sequence_parallel else 1
    sb = s * b
    big = act_bytes * sb * (12 * d / q + 6 * d / tp + 2 * f / tp)
    small = 4 * stat_bytes * sb / q + (2 * mask_bytes * sb * d / q if dropout else 0)
    const = 5 * act_bytes * d + 8 * d / tp + (4 * d / tp if act_bytes != 4 else 0) + 12 * b * d / tp
    return big + small + const


rwkv_embedding_activation_bytes = embedding_activation_bytes  # RWKV's embedding keeps the same tensors


def rwkv_norm_input_bytes(s: int, b: int, d: int, tp: int = 1, sequence_parallel: bool = False,
                          act_bytes: int = 2, stat_bytes: int = NORM_STAT_BYTES) -> float:
    """A LayerNorm outside the blocks' count (block 0's ln0, the last stage's ln_out): input and stats."""
    return _norm_input_bytes(s, b, d, tp, sequence_parallel, act_bytes, stat_bytes)


def rwkv_head_activation_bytes(s: int, b: int, d: int, vpad: int, tp: int = 1, sequence_parallel: bool = False,
                               act_bytes: int = 2, stat_bytes: int = NORM_STAT_BYTES) -> float:
    """RWKV's output head for one micro-batch on the last stage, as training runs it (RWKV.forward_loss ->
    megatron_ext's vocab_parallel_linear_cross_entropy_sum): ln_out's input and stats, then the fused head
    keeps no logits but the gradients it forms in forward until backward: d/dh for all s*b tokens in the
    activation dtype, e*sbD (whole sequence, also under SP), and d/dW of the vocab shard in fp32, 4*Vpad*D/t.
    """
    return _fused_head_bytes(s, b, d, vpad, tp, sequence_parallel, act_bytes, stat_bytes)


def microbatches_in_flight(pp: int, stage: int, grad_accum: int, virtual: int = 1) -> int:
    """Model chunks whose activations one pipeline rank holds at the peak of a training step.

    1F1B: stage r runs pp - r - 1 warm-up forwards before its first backward, so pp - r micro-batches
    are in flight (fewer if there are fewer micro-batches). Interleaved (v chunks of L/(pv) layers per
    rank, Megatron's warm-up of 2(p - r - 1) + (v - 1)p forwards): on the first stage pv + p - 1 chunks,
    i.e. p micro-batches of L/p layers times (1 + (p - 1)/(pv)) -- the paper's interleaving factor.
    """
    if pp == 1:
        return 1
    if virtual == 1:
        return min(pp - stage, grad_accum)
    total = grad_accum * virtual
    if grad_accum == pp:
        return total
    return min(2 * (pp - stage - 1) + (virtual - 1) * pp, total - 1) + 1


def memory_per_gpu(m: ModelConfig, *, tp: int = 1, pp: int = 1, dp: int = 1, micro_batch: int = 1,
                   grad_accum: int = 1, precision: str = "fp16", zero_stage: int = 0,
                   sequence_parallel: bool = False, checkpoint_activations: bool = False,
                   checkpoint_num_layers: int = 1, virtual: int = 1, partition_method: str = "uniform",
                   optimizer: str = "Adam", momentum: float = 0.0, attention: str | None = None) -> dict:
    """Bytes per GPU on each pipeline stage: model states (with and without ZeRO-1) and activations for
    no recompute, selective recompute and full activation checkpointing.

    Activations of a stage = (model chunks in flight) x (its layers x the layer's bytes + per-chunk extras),
    except with full checkpointing: each chunk of `checkpoint_num_layers` layers keeps only its input, e*sbD
    (/t with SP), plus one chunk's full working set while it is recomputed in backward. The embedding output
    is layer 0's input, already counted. `total` uses the config's choices (ZeRO stage, checkpointing).
    Neither family has selective recompute in neox, so the "selective" column equals "none".

    GPT-NeoX: per layer `gpt_neox_layer_activation_bytes` with the SDPA kernel `attention` (None: what CUDA
    runs, `default_attention_kernel`); every stage adds per chunk in flight the rotary cos/sin tables
    (`gpt_neox_rotary_bytes`, outside the checkpointed chunks), the first stage the embedding's ids (and
    dropout mask), the last stage `gpt_neox_head_activation_bytes` (the fused head, no logits).
    RWKV-4: per block `rwkv_layer_activation_bytes`; the first stage adds per micro-batch in flight the
    embedding's ids (and dropout mask) and block 0's ln0 input (inside chunk 0, so with full checkpointing
    counted once, in the recompute working set); the last stage adds `rwkv_head_activation_bytes`.
    Korthikanti et al.'s per-layer number is reported beside neox's (`layer_activations["korthikanti"]`).
    """
    layers = stage_layer_counts(m, pp, partition_method, tp)
    params = stage_parameters(m, tp, pp, partition_method)
    e = PRECISION_BYTES[precision][0] if precision in PRECISION_BYTES else 2
    s, b, h = m.seq_length, micro_batch, m.hidden_size
    q = tp if sequence_parallel else 1
    vpad = m.padded_vocab_size(tp)
    dropout = m.hidden_dropout > 0
    # first stage: outside / inside the checkpointed chunks; every stage: outside, per chunk in flight
    first_outside = embedding_activation_bytes(s, b, h, tp, sequence_parallel, dropout=dropout)
    first_inside = every_chunk = 0.0
    kernel = None
    if m.model_type == "rwkv":
        layer = rwkv_layer_activation_bytes(s, b, h, m.ffn_size, tp, sequence_parallel, e, dropout=dropout)
        first_inside = rwkv_norm_input_bytes(s, b, h, tp, sequence_parallel, e)
        per_layer = {"none": layer, "selective": layer, "checkpoint_input": e * s * b * h / q,
                     "embedding": first_outside, "ln0": first_inside}
        head = rwkv_head_activation_bytes(s, b, h, vpad, tp, sequence_parallel, e)
    else:
        kernel = attention or default_attention_kernel(e)
        a = m.num_attention_heads
        layer = gpt_neox_layer_activation_bytes(
            s, b, h, a, m.ffn_size, tp, sequence_parallel, e, parallel_residual=m.gpt_j_residual,
            hidden_dropout=dropout, attention_dropout=m.attention_dropout > 0, attention=kernel)
        every_chunk = gpt_neox_rotary_bytes(s, m.rotary_dim, e)
        per_layer = {"none": layer, "selective": layer, "checkpoint_input": e * s * b * h / q,
                     "embedding": first_outside, "rotary": every_chunk,
                     "korthikanti": layer_activation_bytes(s, b, h, a, m.ffn_size, tp, sequence_parallel, False, e)}
        head = gpt_neox_head_activation_bytes(s, b, h, vpad, tp, sequence_parallel, e)
    k = checkpoint_num_layers
    stages = []
    for r in range(pp):
        n = layers[r] if virtual == 1 else m.num_layers // (pp * virtual)  # layers per model chunk
        inflight = microbatches_in_flight(pp, r, grad_accum, virtual)
        states = model_state_bytes(params[r], precision, dp, zero_stage, optimizer, momentum)
        stage = {"stage": r, "layers": layers[r], "parameters": params[r], "in_flight": inflight, **states}
        # with interleaving only chunk 0 of stage 0 holds the embedding: counting it for every chunk in
        # flight overestimates by a few sbD-sized tensors
        out_, in_ = (first_outside, first_inside) if r == 0 else (0.0, 0.0)
        out_ += every_chunk
        acts = {
            "none": inflight * (n * per_layer["none"] + out_ + in_),
            "selective": inflight * (n * per_layer["selective"] + out_ + in_),
            "full": inflight * (-(-n // k) * per_layer["checkpoint_input"] + out_)
            + min(k, n) * per_layer["none"] + in_,
        }
        stage.update(activations=acts, head_activations=head if r == pp - 1 else 0)
        fixed = stage["params"] + stage["grads"] + stage["head_activations"]
        stage["totals"] = {zero: {kind: fixed + stage[f"optimizer_{zero}"] + acts[kind] for kind in acts}
                           for zero in ("no_zero", "zero1")}
        stage["total"] = stage["totals"]["zero1" if zero_stage >= 1 else "no_zero"][
            "full" if checkpoint_activations else "none"]
        stages.append(stage)
    worst = max(range(pp), key=lambda r: stages[r]["total"])
    return {
        "model_type": m.model_type, "precision": precision, "activation_bytes": e, "dp": dp, "zero_stage": zero_stage,
        "micro_batch": micro_batch, "sequence_parallel": sequence_parallel, "virtual": virtual,
        "checkpoint_activations": checkpoint_activations, "checkpoint_num_layers": k, "optimizer": optimizer,
        "attention_kernel": kernel, "layer_activations": per_layer, "stages": stages, "max_stage": worst,
        "max_total": stages[worst]["total"],
    }

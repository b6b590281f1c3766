"""The GPT-NeoX model (GPT-NeoX-20B / Pythia architecture), readable top to bottom.

Tensor parallelism appears only as the choice of linear layer (megatron_ext Column/Row/VocabParallel);
pipeline parallelism only as `pre_process` / `post_process` / `layer_range`. Activations are
[B, T, D] throughout; a TP rank holds num_attention_heads / tp heads and F / tp MLP columns.

Sequence parallelism (ParallelOptions.sequence_parallel, tp > 1) only changes where the sequence is
split: between the TP regions activations are [B, T/tp, D] (this rank's contiguous block of positions),
so norms, dropout and residual adds run on a shard. The embedding reduce-scatters into the shard,
column-parallel linears all-gather it back to [B, T, D] before their matmul, row-parallel linears
reduce-scatter after theirs, and the head gathers before the logits. Attention always sees the whole
sequence, so rotary positions are the usual 0..T-1. Replicated parameters that see only a shard carry
`p.sequence_parallel = True`: call `sync_sequence_parallel_grads(model, ps)` after backward.

Dropout streams and activation checkpointing: see neox/models/parallel.py.

Initialisation does not depend on the layout: the embedding, the head and every layer are built under
their own RNG seed derived from (init_seed, global index), and each parallel layer initialises its
full master weight before slicing. So TP slices, and pipeline stages, hold exactly the tensors of the
single-process model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megatron_ext.tensor_parallel import (
    ColumnParallelLinear,
    RNGStatesTracker,
    RowParallelLinear,
    VocabParallelEmbedding,
    copy_to_tensor_parallel_region,
    gather_from_sequence_parallel_region,
)
from megatron_ext.topology import ParallelState
from neox.config import ModelConfig
from neox.models.gpt_neox.rotary import apply_rotary, rotary_cos_sin
from neox.models.init_methods import InitMethod, derive_seed, get_init_method, seeded
from neox.models.lm_loss import fused_head_loss, logits_loss
from neox.models.parallel import Dropout, ParallelOptions, checkpoint_with_rng, model_parallel_rng, resolve_stage
from neox.ops import build_attention_mask, causal_attention

EMBED_SLOT, HEAD_SLOT, FIRST_LAYER_SLOT = 0, 1, 2
SEQ_DIM = 1  # activations are [B, T, D]


def _layer_norm(cfg: ModelConfig, sequence_parallel: bool) -> nn.LayerNorm:
    norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layernorm_epsilon)
    for p in norm.parameters():
        p.tp_partition_dim = None  # replicated over TP
        if sequence_parallel:  # sees only this rank's tokens: grads are summed over TP
            p.sequence_parallel = True
    return norm


class SelfAttention(nn.Module):
    """Causal multi-head attention with a fused qkv projection and partial rotary embeddings.

    Input/output [B, T, D], or [B, T/tp, D] shards under sequence parallelism (the qkv projection
    gathers the sequence, the output projection reduce-scatters it). Attention dropout acts on this
    rank's heads, so it draws from the tracker's model-parallel stream.
    """

    def __init__(self, cfg: ModelConfig, ps: ParallelState, init_method: InitMethod,
                 output_init_method: InitMethod, *, sequence_parallel: bool = False,
                 rng_tracker: RNGStatesTracker | None = None):
        super().__init__()
        d = cfg.hidden_size
        self.num_heads = cfg.num_attention_heads // ps.tp_size  # heads on this TP rank
        self.head_dim = cfg.head_dim
        self.dropout_p = cfg.attention_dropout
        self.sequence_parallel = sequence_parallel
        self.rng_tracker = rng_tracker
        sp = dict(sequence_parallel=sequence_parallel, sequence_dim=SEQ_DIM)
        # rows of the fused weight are laid out [heads, 3 (q, k, v), head_dim], so a TP slice of
        # rows is a contiguous block of whole heads
        self.query_key_value = ColumnParallelLinear(d, 3 * d, ps, bias=True, init_method=init_method, **sp)
        self.dense = RowParallelLinear(d, d, ps, bias=True, input_is_parallel=True,
                                       init_method=output_init_method, **sp)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                attn_mask: torch.Tensor | None = None, kv_cache=None) -> torch.Tensor:
        """x [B, T(/tp), D] -> same shape. `kv_cache(k, v) -> (k_all, v_all)` is the hook for decoding."""
        if kv_cache is not None and self.sequence_parallel:
            raise ValueError("KV-cache decoding is not supported with sequence_parallel; build the model "
                             "with ParallelOptions(sequence_parallel=False) for generation")
        qkv = self.query_key_value(x)  # [B, T, 3D/tp]: full sequence (gathered under SP)
        b, t, _ = qkv.shape
        qkv = qkv.view(b, t, self.num_heads, 3, self.head_dim)  # [B, T, Hl, 3, Dh]
        q, k, v = qkv.permute(3, 0, 2, 1, 4).unbind(0)  # each [B, Hl, T, Dh]
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)  # new tensors
        # v is a view of the fused qkv output: the attention would save it and so keep all three alive for
        # backward. Its own copy frees qkv (2/3 of it, e*s*b*D/t per layer) for the price of one small copy.
        v = v.contiguous()
        if kv_cache is not None:
            k, v = kv_cache(k, v)  # [B, Hl, Tk, Dh]
        dropping = self.training and self.dropout_p > 0
        with model_parallel_rng(self.rng_tracker if dropping else None):  # this rank's heads
            out = causal_attention(q, k, v, dropout_p=self.dropout_p, attn_mask=attn_mask,
                                   training=self.training)  # [B, Hl, T, Dh]
        out = out.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim)  # [B, T, D/tp]
        return self.dense(out)  # [B, T(/tp), D]


class MLP(nn.Module):
    """dense_h_to_4h -> exact (erf) gelu -> dense_4h_to_h."""

    def __init__(self, cfg: ModelConfig, ps: ParallelState, init_method: InitMethod,
                 output_init_method: InitMethod, *, sequence_parallel: bool = False):
        super().__init__()
        sp = dict(sequence_parallel=sequence_parallel, sequence_dim=SEQ_DIM)
        self.dense_h_to_4h = ColumnParallelLinear(cfg.hidden_size, cfg.ffn_size, ps, bias=True,
                                                  init_method=init_method, **sp)
        self.dense_4h_to_h = RowParallelLinear(cfg.ffn_size, cfg.hidden_size, ps, bias=True,
                                               input_is_parallel=True, init_method=output_init_method, **sp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(F.gelu(self.dense_h_to_4h(x)))  # [B, T(/tp), D]


class TransformerLayer(nn.Module):
    """Pre-norm block; parallel residual (gpt_j_residual) or the sequential GPT-2 form.

    Hidden dropout acts on activations replicated over TP (default stream), or under sequence
    parallelism on this rank's sequence shard (model-parallel stream).
    """

    def __init__(self, cfg: ModelConfig, ps: ParallelState, init_method: InitMethod,
                 output_init_method: InitMethod, *, sequence_parallel: bool = False,
                 rng_tracker: RNGStatesTracker | None = None):
        super().__init__()
        self.parallel_residual = cfg.gpt_j_residual
        self.input_norm = _layer_norm(cfg, sequence_parallel)
        self.post_attention_norm = _layer_norm(cfg, sequence_parallel)
        self.attention = SelfAttention(cfg, ps, init_method, output_init_method,
                                       sequence_parallel=sequence_parallel, rng_tracker=rng_tracker)
        self.mlp = MLP(cfg, ps, init_method, output_init_method, sequence_parallel=sequence_parallel)
        self.dropout = Dropout(cfg.hidden_dropout, rng_tracker if sequence_parallel else None)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                attn_mask: torch.Tensor | None = None, kv_cache=None) -> torch.Tensor:
        """x [B, T, D] ([B, T/tp, D] under SP) -> same; cos/sin [B, T, rd] for the full sequence."""
        attn = self.dropout(self.attention(self.input_norm(x), cos, sin, attn_mask, kv_cache))
        if self.parallel_residual:  # x + attn(ln1(x)) + mlp(ln2(x))
            return self.dropout(self.mlp(self.post_attention_norm(x))) + attn + x
        x = x + attn
        return self.dropout(self.mlp(self.post_attention_norm(x))) + x


def check_model_config(cfg: ModelConfig, ps: ParallelState) -> None:
    """Raise ValueError for a config this model cannot build on this TP size."""
    for key in ("num_layers", "hidden_size", "num_attention_heads", "vocab_size"):
        if getattr(cfg, key) is None:
            raise ValueError(f"model config `{key}` is not set; GPTNeoX needs it")
    unsupported = {"pos_emb": ("rotary",), "norm": ("layernorm",), "activation": ("gelu",)}
    for key, ok in unsupported.items():
        if getattr(cfg, key) not in ok:
            raise ValueError(f"GPTNeoX supports {key} in {ok}, got {getattr(cfg, key)!r}")
    if cfg.hidden_size % cfg.num_attention_heads:
        raise ValueError(f"hidden_size {cfg.hidden_size} is not divisible by num_attention_heads "
                         f"{cfg.num_attention_heads}")
    if cfg.num_attention_heads % ps.tp_size or cfg.ffn_size % ps.tp_size:
        raise ValueError(
            f"num_attention_heads ({cfg.num_attention_heads}) and the MLP width ({cfg.ffn_size}) must be "
            f"divisible by the tensor-parallel size {ps.tp_size}; choose another tp"
        )
    if cfg.rotary_dim % 2:
        raise ValueError(f"rotary dims per head int(head_dim * rotary_pct) = {cfg.rotary_dim} must be even")


class GPTNeoX(nn.Module):
    """GPT-NeoX decoder, or the slice of it that one pipeline stage holds.

    Args:
        cfg: architecture (neox.config.ModelConfig); cfg.vocab_size is the real vocab, the embedding
            holds cfg.padded_vocab_size(tp) rows.
        ps: parallel layout; only tp_size/tp_rank/tp_group are used here.
        pre_process: build the embedding (first stage); otherwise forward takes hidden states.
        post_process: build final norm + head (last stage); otherwise forward returns hidden states.
        layer_range: (start, stop) global layer indices to build; default all.
        init_seed: seed of the layout-independent initialisation.
        options: sequence parallelism and activation checkpointing (ParallelOptions); default off.
            Sequence parallelism is a no-op at tp 1 (the model is then exactly the plain one).
        rng_tracker: per-TP-rank dropout stream (megatron_ext seed_all / RNGStatesTracker); None:
            every dropout draws from the default generator.

    Tied embeddings across pipeline stages: the last stage holds its own copy of the embedding,
    named `embed.weight` like the first stage's (the checkpoint has one `embed.weight` and no
    `lm_head.weight`; the copies are equal). When the copy exists on two stages (tied and not both
    pre_process and post_process) each carries `p.shared_embedding = True`: the trainer all-reduces
    their grads over ps.embedding_group and counts them in the grad norm only where pre_process.
    """

    def __init__(self, cfg: ModelConfig, ps: ParallelState, *, pre_process: bool = True,
                 post_process: bool = True, layer_range: tuple[int, int] | None = None,
                 init_seed: int = 1234, options: ParallelOptions | None = None,
                 rng_tracker: RNGStatesTracker | None = None):
        super().__init__()
        check_model_config(cfg, ps)
        options, start, stop, sp = resolve_stage(cfg, ps, layer_range, options)
        self.cfg, self.ps, self.options, self.rng_tracker = cfg, ps, options, rng_tracker
        self.sequence_parallel = sp
        self.pre_process, self.post_process = pre_process, post_process
        self.layer_range = (start, stop)
        self.tied = not cfg.no_weight_tying
        self.padded_vocab_size = cfg.padded_vocab_size(ps.tp_size)
        init_method = get_init_method(cfg.init_method, cfg)
        output_init_method = get_init_method(cfg.output_layer_init_method, cfg)
        sharded_rng = rng_tracker if sp else None  # dropout on sequence shards differs per rank

        # With tied embeddings the last stage needs the embedding matrix too (kept in sync by the
        # trainer across the embedding group); it is seeded identically, so both copies start equal.
        if pre_process or (post_process and self.tied):
            with seeded(derive_seed(init_seed, EMBED_SLOT)):
                self.embed = VocabParallelEmbedding(self.padded_vocab_size, cfg.hidden_size, ps,
                                                    init_method=init_method, sequence_parallel=sp,
                                                    sequence_dim=SEQ_DIM)
            if self.tied and not (pre_process and post_process):
                self.embed.weight.shared_embedding = True
        self.embed_dropout = Dropout(cfg.hidden_dropout, sharded_rng)
        self.layers = nn.ModuleDict()
        for i in range(start, stop):
            with seeded(derive_seed(init_seed, FIRST_LAYER_SLOT + i)):
                self.layers[str(i)] = TransformerLayer(cfg, ps, init_method, output_init_method,
                                                       sequence_parallel=sp, rng_tracker=rng_tracker)
        if post_process:
            self.final_norm = _layer_norm(cfg, sp)
            if not self.tied:
                with seeded(derive_seed(init_seed, HEAD_SLOT)):
                    self.lm_head = ColumnParallelLinear(cfg.hidden_size, self.padded_vocab_size, ps,
                                                        bias=False, init_method=init_method,
                                                        sequence_parallel=sp, sequence_dim=SEQ_DIM)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, kv_cache=None, *,
                labels: torch.Tensor | None = None, loss_mask: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids [B, T], or when not pre_process the previous stage's hidden states [B, T, D]
        ([B, T/tp, D], this rank's sequence shard, under sequence parallelism).

        position_ids [B, T] default 0..T-1; attention_mask [B, T] with 1 for real tokens (for
        left-padded batches; pass matching position_ids); both cover the full sequence. Returns this
        TP rank's logits shard [B, T, Vpad/tp] (full sequence), or hidden states as taken above when
        not post_process.

        kv_cache (decoding; neox.inference.KVCache or anything with `seq_len` and `layer(i) -> hook`):
        input_ids are the T new positions after the kv_cache.seq_len cached ones; attention_mask then
        covers cached + new keys [B, seq_len + T]; position_ids default seq_len..seq_len+T-1.

        labels [B, T] (last stage only): return the scalar loss instead of logits, see `forward_loss`.
        """
        if labels is not None and not self.post_process:
            raise ValueError("GPTNeoX.forward got labels on a stage without the output layer "
                             "(post_process=False); pass labels only to the last pipeline stage")
        tp = self.ps.tp_size if self.sequence_parallel else 1
        if self.pre_process:
            if input_ids.shape[1] % tp:
                raise ValueError(f"sequence_parallel needs the sequence length ({input_ids.shape[1]}) "
                                 f"divisible by the tensor-parallel size {tp}; pad the batch")
            x = self.embed_dropout(self.embed(input_ids))  # [B, T/tp (SP) or T, D]
        else:
            x = input_ids
        t = x.shape[1] * tp  # attention sees the whole sequence, so positions are the usual ones
        past = 0 if kv_cache is None else kv_cache.seq_len  # positions already in the cache
        if position_ids is None:
            position_ids = torch.arange(past, past + t, device=x.device)[None]  # [1, T]
        cos, sin = rotary_cos_sin(position_ids, self.cfg.rotary_dim, self.cfg.rotary_emb_base, x.dtype)
        mask = None if attention_mask is None else build_attention_mask(t, past + t, attention_mask, x.device)
        if kv_cache is not None:
            for idx, layer in self.layers.items():
                x = layer(x, cos, sin, mask, kv_cache.layer(int(idx)))
        else:
            x = self.run_layers(x, cos, sin, mask)
        if not self.post_process:
            return x
        if labels is not None:
            return self.fused_loss(self.final_norm(x), labels, loss_mask)
        return self.output_logits(self.final_norm(x))

    def forward_loss(self, input_ids: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor | None = None,
                     **kwargs) -> torch.Tensor:
        """``loss(forward(input_ids), labels, loss_mask)`` without materialising the logits: the output
        layer and cross entropy run in token chunks (megatron_ext vocab_parallel_linear_cross_entropy_sum).
        Last stage only; input as for `forward` (token ids or the previous stage's hidden states); kwargs
        (position_ids, attention_mask) go to `forward`. Goes through ``self(...)`` so module hooks
        (FSDP's parameter gathering) run as for a plain forward. Returns the masked-mean loss, fp32
        for fp16/bf16 models.
        """
        return self(input_ids, labels=labels, loss_mask=loss_mask, **kwargs)

    def fused_loss(self, h: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor | None) -> torch.Tensor:
        """Normed hidden states [B, T(/tp), D] -> masked-mean loss (same semantics as `loss`)."""
        weight = self.embed.weight if self.tied else self.lm_head.weight  # [Vpad/tp, D]
        return fused_head_loss(h, weight, labels, loss_mask, self.ps, self.cfg.vocab_size,
                               sequence_parallel=self.sequence_parallel, seq_dim=SEQ_DIM)

    def run_layers(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   mask: torch.Tensor | None) -> torch.Tensor:
        """The transformer layers, in chunks of checkpoint_num_layers recomputed in backward when
        activation checkpointing is on (and grads are being taken)."""
        layers = list(self.layers.values())
        if not (self.options.checkpoint_activations and torch.is_grad_enabled()):
            for layer in layers:
                x = layer(x, cos, sin, mask)
            return x
        n = self.options.checkpoint_num_layers
        for i in range(0, len(layers), n):
            x = checkpoint_with_rng(_run_chunk, layers[i: i + n], x, cos, sin, mask,
                                    rng_tracker=self.rng_tracker)
        return x

    def output_logits(self, h: torch.Tensor) -> torch.Tensor:
        """Normed hidden states [B, T(/tp), D] -> logits shard [B, T, Vpad/tp]."""
        if self.tied:  # column-parallel use of the vocab-parallel embedding matrix
            if self.sequence_parallel:
                h = gather_from_sequence_parallel_region(h, self.ps, SEQ_DIM)  # [B, T, D]
            else:
                h = copy_to_tensor_parallel_region(h, self.ps)
            return F.linear(h, self.embed.weight)
        return self.lm_head(h)

    def shared_embedding_params(self) -> list[nn.Parameter]:
        """Parameters duplicated on the first and last pipeline stage (tied embeddings with PP > 1):
        all-reduce their grads over ps.embedding_group after backward. Empty otherwise."""
        return [p for p in self.parameters() if getattr(p, "shared_embedding", False)]

    def loss(self, logits_local: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor | None = None,
             reduction: str = "mean") -> torch.Tensor:
        """Cross entropy of logits [B, T, Vpad/tp] against labels [B, T] (already shifted: label t is
        the token after position t). Labels < 0 (HF's -100) are ignored; loss_mask [B, T] weights
        tokens. Padded vocab columns take no probability mass, so the loss equals that over the real
        vocab (a converted model gives transformers' loss). reduction: "mean" (over weighted tokens)
        or "none" (per token, [B, T], unweighted).
        """
        return logits_loss(logits_local, labels, loss_mask, self.ps, self.cfg.vocab_size, reduction)


_PARTITION_DIMS = {
    "embed.weight": 0,
    "lm_head.weight": 0,
    "attention.query_key_value.weight": 0,
    "attention.query_key_value.bias": 0,
    "attention.dense.weight": 1,
    "mlp.dense_h_to_4h.weight": 0,
    "mlp.dense_h_to_4h.bias": 0,
    "mlp.dense_4h_to_h.weight": 1,
}


def _run_chunk(layers: list[TransformerLayer], x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               mask: torch.Tensor | None) -> torch.Tensor:
    for layer in layers:
        x = layer(x, cos, sin, mask)
    return x


def partition_dim(name: str) -> int | None:
    """TP partition dim of a parameter given its checkpoint name (None: replicated)."""
    if name.startswith("layers."):
        name = name.split(".", 2)[2]
    return _PARTITION_DIMS.get(name)

"""RWKV-4 (Peng et al., "RWKV: Reinventing RNNs for the Transformer Era"), readable top to bottom.

Each block: x = x + TimeMix(ln1(x)); x = x + ChannelMix(ln2(x)); block 0 first normalises the embedding
with ln0; then ln_out and an untied head. Math and names follow BlinkDL's RWKV-4 (and transformers'
RwkvForCausalLM): time_mix_{k,v,r}, time_decay (w = -exp(time_decay)), time_first (u), key / value /
receptance / output, squared-ReLU channel mixing gated by sigmoid(receptance).

Two modes, same weights:
* parallel ("transformer") mode: the whole sequence at once; token shift is a shift by one along T and
  the WKV recurrence runs in neox.ops.wkv over all positions. It can start from and return a state.
* RNN mode (`forward_rnn`): one token per call with O(1) state per layer, five vectors as in HF and
  BlinkDL: (ffn x_prev, att x_prev, aa, bb, pp).

Tensor parallelism splits channels. Time mixing: key/value/receptance are column-parallel, so WKV runs
on this rank's D/tp channels (time_decay / time_first are sliced along dim 0 with them), and output is
row-parallel. Channel mixing: key column-parallel (F/tp), value row-parallel; receptance (D -> D gate)
is row-parallel too, fed this rank's channel slice of its input, so the gate arrives as full D after the
same all-reduce (or reduce-scatter) as value's output and its weight is sharded, not replicated.

The token-shift mixes (time_mix_*) act before the column-parallel entry, like a norm, so their
gradients are whole. Under sequence parallelism they act on this rank's sequence shard: the first
position's previous token is the last position of the previous TP rank's shard, fetched with a small
all-gather of every rank's last token (its backward reduce-scatter returns the gradient to the owner).
Norms and time_mix_* then carry `sequence_parallel = True` (grads summed over TP by the engine).
"""

from __future__ import annotations

import torch
from torch import nn

from megatron_ext.tensor_parallel import (
    ColumnParallelLinear,
    RNGStatesTracker,
    RowParallelLinear,
    VocabParallelEmbedding,
    gather_from_sequence_parallel_region,
    scatter_to_tensor_parallel_region,
)
from megatron_ext.topology import ParallelState
from neox.config import ModelConfig
from neox.models.init_methods import derive_seed, seeded
from neox.models.lm_loss import fused_head_loss, logits_loss
from neox.models.parallel import Dropout, ParallelOptions, checkpoint_with_rng, resolve_stage
from neox.models.rwkv.init import (
    channel_mix_schedule,
    embedding_init,
    head_init,
    orthogonal_init,
    time_mix_schedule,
    zeros_init,
)
from neox.ops import wkv

EMBED_SLOT, HEAD_SLOT, FIRST_LAYER_SLOT = 0, 1, 2  # as GPT-NeoX (neox.models.init_methods.derive_seed)
SEQ_DIM = 1  # activations are [B, T, D]
EMPTY_PP = -1e38  # pp of an empty WKV state: exp(pp) == 0 (neox.ops' convention)
STATE_FIELDS = ("ffn_x", "att_x", "aa", "bb", "pp")  # HF / BlinkDL order of the five state vectors

LayerState = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def _layer_norm(cfg: ModelConfig, sequence_parallel: bool) -> nn.LayerNorm:
    norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layernorm_epsilon)
    for p in norm.parameters():
        p.tp_partition_dim = None
        if sequence_parallel:  # sees only this rank's tokens: grads are summed over TP
            p.sequence_parallel = True
    return norm


def _replicated_vector(values: torch.Tensor, sequence_parallel: bool) -> nn.Parameter:
    """A per-channel [D] parameter replicated over TP (a token-shift mix)."""
    p = nn.Parameter(values.to(torch.float32).contiguous())
    p.tp_partition_dim = None
    if sequence_parallel:
        p.sequence_parallel = True
    return p


def _channel_vector(values: torch.Tensor, ps: ParallelState) -> nn.Parameter:
    """A per-channel [D] parameter split like the column-parallel outputs: this rank keeps D/tp."""
    local = values.chunk(ps.tp_size)[ps.tp_rank] if ps.tp_size > 1 else values
    p = nn.Parameter(local.to(torch.float32).contiguous())
    p.tp_partition_dim = 0
    return p


def token_shift(x: torch.Tensor, x_prev: torch.Tensor | None, ps: ParallelState, sequence_parallel: bool
                ) -> torch.Tensor:
    """The previous position's vector for every position of x [B, T(/tp), D] -> same shape.

    Position 0 takes x_prev [B, D] (a carried state) or zeros; under sequence parallelism a rank's first
    position takes the previous rank's last position (rank 0: x_prev / zeros)."""
    b, _, d = x.shape
    first = x.new_zeros(b, 1, d) if x_prev is None else x_prev.to(x.dtype).unsqueeze(1)
    if sequence_parallel and ps.tp_size > 1:
        lasts = gather_from_sequence_parallel_region(x[:, -1:], ps, SEQ_DIM, reduce_grad=True)  # [B, tp, D]
        # every rank's first position: the sequence start, then each earlier rank's last. Selecting from
        # the whole exchange (not only when tp_rank > 0) keeps the gather in every rank's autograd graph,
        # so all ranks take part in its backward collective.
        firsts = torch.cat([first, lasts[:, :-1]], dim=1)  # [B, tp, D]
        first = firsts[:, ps.tp_rank: ps.tp_rank + 1]
    return torch.cat([first, x[:, :-1]], dim=1)


def _mix(x: torch.Tensor, xx: torch.Tensor, mix: torch.Tensor) -> torch.Tensor:
    return x * mix + xx * (1 - mix)


class TimeMix(nn.Module):
    """RWKV-4 time mixing ("att"): sigmoid(r) * WKV(k, v) -> output. Input/output [B, T(/tp), D]."""

    def __init__(self, cfg: ModelConfig, ps: ParallelState, layer_id: int, *, sequence_parallel: bool):
        super().__init__()
        d = cfg.hidden_size
        self.ps, self.sequence_parallel = ps, sequence_parallel
        s = time_mix_schedule(d, layer_id, cfg.num_layers)
        self.time_decay = _channel_vector(s["time_decay"], ps)  # [D/tp]; w = -exp(time_decay)
        self.time_first = _channel_vector(s["time_first"], ps)  # [D/tp]; u
        self.time_mix_k = _replicated_vector(s["time_mix_k"], sequence_parallel)  # [D]
        self.time_mix_v = _replicated_vector(s["time_mix_v"], sequence_parallel)
        self.time_mix_r = _replicated_vector(s["time_mix_r"], sequence_parallel)
        sp = dict(bias=False, sequence_parallel=sequence_parallel, sequence_dim=SEQ_DIM)
        self.key = ColumnParallelLinear(d, d, ps, init_method=zeros_init, **sp)
        self.value = ColumnParallelLinear(d, d, ps, init_method=orthogonal_init(1.0), **sp)
        self.receptance = ColumnParallelLinear(d, d, ps, init_method=zeros_init, **sp)
        self.output = RowParallelLinear(d, d, ps, input_is_parallel=True, init_method=zeros_init, **sp)

    def forward(self, x: torch.Tensor, x_prev: torch.Tensor | None = None, state=None):
        """x [B, T(/tp), D] (ln1 output); x_prev [B, D] and state (aa, bb, pp) [B, D/tp] carry a sequence
        on. Returns (out [B, T(/tp), D], x[:, -1], (aa, bb, pp) after the last position)."""
        xx = token_shift(x, x_prev, self.ps, self.sequence_parallel)
        k = self.key(_mix(x, xx, self.time_mix_k))  # [B, T, D/tp] (full sequence)
        v = self.value(_mix(x, xx, self.time_mix_v))
        r = torch.sigmoid(self.receptance(_mix(x, xx, self.time_mix_r)))
        w = -torch.exp(self.time_decay.float())
        y, state = wkv(w, self.time_first.float(), k, v, state=state)  # [B, T, D/tp]
        return self.output(r * y.to(r.dtype)), x[:, -1], state


class ChannelMix(nn.Module):
    """RWKV-4 channel mixing ("ffn"): sigmoid(receptance(xr)) * value(relu(key(xk))^2)."""

    def __init__(self, cfg: ModelConfig, ps: ParallelState, layer_id: int, *, sequence_parallel: bool):
        super().__init__()
        d, f = cfg.hidden_size, cfg.ffn_size
        self.ps, self.sequence_parallel = ps, sequence_parallel
        s = channel_mix_schedule(d, layer_id, cfg.num_layers)
        self.time_mix_k = _replicated_vector(s["time_mix_k"], sequence_parallel)
        self.time_mix_r = _replicated_vector(s["time_mix_r"], sequence_parallel)
        sp = dict(bias=False, sequence_parallel=sequence_parallel, sequence_dim=SEQ_DIM)
        self.key = ColumnParallelLinear(d, f, ps, init_method=orthogonal_init(1.0), **sp)
        self.receptance = RowParallelLinear(d, d, ps, input_is_parallel=True, init_method=zeros_init, **sp)
        self.value = RowParallelLinear(f, d, ps, input_is_parallel=True, init_method=zeros_init, **sp)

    def _channel_slice(self, x: torch.Tensor) -> torch.Tensor:
        """[B, T(/tp), D] -> this rank's channels of the full sequence [B, T, D/tp] (row-parallel input)."""
        if not self.sequence_parallel:
            return scatter_to_tensor_parallel_region(x, self.ps)
        full = gather_from_sequence_parallel_region(x, self.ps, SEQ_DIM, reduce_grad=True)  # [B, T, D]
        return full.chunk(self.ps.tp_size, dim=-1)[self.ps.tp_rank]

    def forward(self, x: torch.Tensor, x_prev: torch.Tensor | None = None):
        """x [B, T(/tp), D] (ln2 output) -> (out [B, T(/tp), D], x[:, -1])."""
        xx = token_shift(x, x_prev, self.ps, self.sequence_parallel)
        k = torch.square(torch.relu(self.key(_mix(x, xx, self.time_mix_k))))  # [B, T, F/tp]
        kv = self.value(k)  # [B, T(/tp), D]
        r = torch.sigmoid(self.receptance(self._channel_slice(_mix(x, xx, self.time_mix_r))))  # [B, T(/tp), D]
        return r * kv, x[:, -1]


class Block(nn.Module):
    """ln0 (block 0 only) -> x + att(ln1(x)) -> x + ffn(ln2(x)). Hidden dropout on both branches."""

    def __init__(self, cfg: ModelConfig, ps: ParallelState, layer_id: int, *, sequence_parallel: bool,
                 rng_tracker: RNGStatesTracker | None):
        super().__init__()
        self.layer_id = layer_id
        self.ln0 = _layer_norm(cfg, sequence_parallel) if layer_id == 0 else None
        self.ln1 = _layer_norm(cfg, sequence_parallel)
        self.ln2 = _layer_norm(cfg, sequence_parallel)
        self.att = TimeMix(cfg, ps, layer_id, sequence_parallel=sequence_parallel)
        self.ffn = ChannelMix(cfg, ps, layer_id, sequence_parallel=sequence_parallel)
        self.dropout = Dropout(cfg.hidden_dropout, rng_tracker if sequence_parallel else None)

    def forward(self, x: torch.Tensor, state: LayerState | None = None) -> tuple[torch.Tensor, LayerState]:
        """x [B, T(/tp), D] -> (x, this layer's state after the last position, STATE_FIELDS order)."""
        ffn_x, att_x, wkv_state = (None, None, None) if state is None else (state[0], state[1], state[2:])
        if self.ln0 is not None:
            x = self.ln0(x)
        att, att_last, (aa, bb, pp) = self.att(self.ln1(x), att_x, wkv_state)
        x = x + self.dropout(att)
        ffn, ffn_last = self.ffn(self.ln2(x), ffn_x)
        x = x + self.dropout(ffn)
        return x, (ffn_last, att_last, aa, bb, pp)


def check_model_config(cfg: ModelConfig, ps: ParallelState) -> None:
    """Raise ValueError for a config RWKV-4 cannot build on this TP size."""
    for key in ("num_layers", "hidden_size", "vocab_size"):
        if getattr(cfg, key) is None:
            raise ValueError(f"model config `{key}` is not set; RWKV needs it")
    if not cfg.no_weight_tying:
        raise ValueError("RWKV-4 has an untied output head: set `no_weight_tying: true` in the model config")
    if cfg.hidden_size < 2:
        raise ValueError(f"RWKV needs hidden_size >= 2, got {cfg.hidden_size}")
    if cfg.hidden_size % ps.tp_size or cfg.ffn_size % ps.tp_size:
        raise ValueError(f"hidden_size ({cfg.hidden_size}) and the channel-mix width ({cfg.ffn_size}) must be "
                         f"divisible by the tensor-parallel size {ps.tp_size}; choose another tp")


class RWKV(nn.Module):
    """RWKV-4 language model, or the slice of it one pipeline stage holds.

    Args as GPTNeoX: cfg (num_layers, hidden_size, vocab_size, intermediate_size -> channel-mix width,
    default 4 * hidden_size; layernorm_epsilon; hidden_dropout; no_weight_tying must be true), ps,
    pre_process (embedding), post_process (ln_out + head), layer_range (global block indices),
    init_seed (layout-independent init: every block, the embedding and the head under their own seed;
    every parallel layer fills its full master weight before slicing), options (sequence parallelism,
    activation checkpointing), rng_tracker (dropout streams). init_method / output_layer_init_method are
    not used: RWKV has its own initialisation (neox.models.rwkv.init).
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
        self.padded_vocab_size = cfg.padded_vocab_size(ps.tp_size)
        if pre_process:
            with seeded(derive_seed(init_seed, EMBED_SLOT)):
                self.embed = VocabParallelEmbedding(self.padded_vocab_size, cfg.hidden_size, ps,
                                                    init_method=embedding_init(cfg.vocab_size),
                                                    sequence_parallel=sp, sequence_dim=SEQ_DIM)
        self.embed_dropout = Dropout(cfg.hidden_dropout, rng_tracker if sp else None)
        self.layers = nn.ModuleDict()
        for i in range(start, stop):
            with seeded(derive_seed(init_seed, FIRST_LAYER_SLOT + i)):
                self.layers[str(i)] = Block(cfg, ps, i, sequence_parallel=sp, rng_tracker=rng_tracker)
        if post_process:
            self.ln_out = _layer_norm(cfg, sp)
            with seeded(derive_seed(init_seed, HEAD_SLOT)):
                self.lm_head = ColumnParallelLinear(cfg.hidden_size, self.padded_vocab_size, ps, bias=False,
                                                    init_method=head_init(cfg.vocab_size),
                                                    sequence_parallel=sp, sequence_dim=SEQ_DIM)

    # ---- parallel mode ---------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, *, state: list[torch.Tensor] | None = None,
                return_state: bool = False, labels: torch.Tensor | None = None,
                loss_mask: torch.Tensor | None = None):
        """input_ids [B, T], or when not pre_process the previous stage's hidden states [B, T, D]
        ([B, T/tp, D] under sequence parallelism). Returns this TP rank's logits shard [B, T, Vpad/tp],
        or hidden states as taken when not post_process; with return_state=True, (that, new state).

        state: continue from a state (see init_state) instead of an empty one. position_ids are unused
        (RWKV has no positions); attention_mask may only mark every token real (no padding masks).
        labels [B, T] (last stage only): return the scalar loss instead of logits, see `forward_loss`.
        """
        if labels is not None and (not self.post_process or return_state):
            raise ValueError("RWKV.forward got labels on a stage without the output layer (post_process=False) "
                             "or with return_state; pass labels only to the last pipeline stage, without state")
        if attention_mask is not None and not bool(attention_mask.bool().all()):
            raise ValueError("RWKV has no attention mask: it cannot skip padded positions. Right-pad (and "
                             "mask the loss) or run each sequence on its own (forward_rnn)")
        stateful = state is not None or return_state
        if stateful and self.sequence_parallel:
            raise ValueError("RWKV states are not supported with sequence_parallel; build the model with "
                             "ParallelOptions(sequence_parallel=False) for stateful / RNN inference")
        if self.pre_process:
            tp = self.ps.tp_size if self.sequence_parallel else 1
            if input_ids.shape[1] % tp:
                raise ValueError(f"sequence_parallel needs the sequence length ({input_ids.shape[1]}) "
                                 f"divisible by the tensor-parallel size {tp}; pad the batch")
            x = self.embed_dropout(self.embed(input_ids))  # [B, T(/tp), D]
        else:
            x = input_ids
        new_state = None
        if stateful:
            x, new_state = self._run_layers_with_state(x, state)
        else:
            x = self.run_layers(x)
        if self.post_process and labels is not None:
            return self.fused_loss(self.ln_out(x), labels, loss_mask)
        out = self.lm_head(self.ln_out(x)) if self.post_process else x
        return (out, new_state) if return_state else out

    def run_layers(self, x: torch.Tensor) -> torch.Tensor:
        """The blocks, in chunks of checkpoint_num_layers recomputed in backward when activation
        checkpointing is on (and grads are being taken)."""
        layers = list(self.layers.values())
        if not (self.options.checkpoint_activations and torch.is_grad_enabled()):
            return _run_chunk(layers, x)
        n = self.options.checkpoint_num_layers
        for i in range(0, len(layers), n):
            x = checkpoint_with_rng(_run_chunk, layers[i: i + n], x, rng_tracker=self.rng_tracker)
        return x

    def _run_layers_with_state(self, x: torch.Tensor, state: list[torch.Tensor] | None):
        if state is None:
            state = self.init_state(x.shape[0], device=x.device, dtype=x.dtype)
        self._check_state(state, x.shape[0])
        per_field: list[list[torch.Tensor]] = [[] for _ in STATE_FIELDS]
        for j, layer in enumerate(self.layers.values()):
            x, layer_state = layer(x, tuple(s[:, :, j] for s in state))
            for field, s in zip(per_field, layer_state):
                field.append(s)
        if not self.layers:
            return x, list(state)
        return x, [torch.stack(field, dim=-1) for field in per_field]

    # ---- RNN mode --------------------------------------------------------------------------------
    def init_state(self, batch_size: int, *, device=None, dtype: torch.dtype | None = None) -> list[torch.Tensor]:
        """The empty state of this chunk's layers: five tensors [B, C, L] (L = layers held, in
        layer_range order), STATE_FIELDS order as transformers' RwkvModel: ffn x_prev and att x_prev
        [B, D, L] in `dtype` (default the parameters'), then aa, bb [B, D/tp, L] zeros and pp
        [B, D/tp, L] = -1e38, float32 (the WKV state of this TP rank's channels)."""
        p = next(self.parameters())
        device, dtype = device or p.device, dtype or p.dtype
        d, n = self.cfg.hidden_size, len(self.layers)
        dl = d // self.ps.tp_size
        x_prev = [torch.zeros(batch_size, d, n, device=device, dtype=dtype) for _ in range(2)]
        aa = torch.zeros(batch_size, dl, n, device=device, dtype=torch.float32)
        bb = torch.zeros_like(aa)
        pp = torch.full_like(aa, EMPTY_PP)
        return [*x_prev, aa, bb, pp]

    def _check_state(self, state, batch_size: int) -> None:
        d, n, dl = self.cfg.hidden_size, len(self.layers), self.cfg.hidden_size // self.ps.tp_size
        want = [(batch_size, d, n)] * 2 + [(batch_size, dl, n)] * 3
        got = [tuple(s.shape) for s in state] if len(state) == len(STATE_FIELDS) else None
        if got != want:
            raise ValueError(f"RWKV state must be five tensors {STATE_FIELDS} shaped {want} (see init_state); "
                             f"got {got or len(state)}")

    def forward_rnn(self, x: torch.Tensor, state: list[torch.Tensor] | None = None
                    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """One step: token ids [B] or [B, 1] (or, when not pre_process, hidden [B, D] / [B, 1, D]) and
        the state before it -> (logits shard [B, Vpad/tp], or hidden [B, D]; the state after it)."""
        if self.pre_process:
            x = x.reshape(x.shape[0], 1)
        elif x.dim() == 2:
            x = x.unsqueeze(1)
        out, state = self.forward(x, state=state, return_state=True)
        return out[:, 0], state

    # ---- loss --------------------------------------------------------------------------------------
    def shared_embedding_params(self) -> list[nn.Parameter]:
        """RWKV's head is untied: nothing is shared between pipeline stages."""
        return []

    def forward_loss(self, input_ids: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor | None = None,
                     **kwargs) -> torch.Tensor:
        """``loss(forward(input_ids), labels, loss_mask)`` without materialising the logits (the head and
        cross entropy run in token chunks, as GPTNeoX.forward_loss). Last stage only; goes through
        ``self(...)`` so module hooks run. Returns the masked-mean loss (fp32 for 16-bit models)."""
        return self(input_ids, labels=labels, loss_mask=loss_mask, **kwargs)

    def fused_loss(self, h: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor | None) -> torch.Tensor:
        """Normed hidden states [B, T(/tp), D] -> masked-mean loss (same semantics as `loss`)."""
        weight = self.lm_head.weight  # [Vpad/tp, D]
        return fused_head_loss(h, weight, labels, loss_mask, self.ps, self.cfg.vocab_size,
                               sequence_parallel=self.sequence_parallel, seq_dim=SEQ_DIM)

    def loss(self, logits_local: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor | None = None,
             reduction: str = "mean") -> torch.Tensor:
        """Cross entropy of logits [B, T, Vpad/tp] against shifted labels [B, T] (< 0 ignored), weighted
        by loss_mask; padded vocab columns take no mass. reduction "mean" (weighted) or "none" ([B, T])."""
        return logits_loss(logits_local, labels, loss_mask, self.ps, self.cfg.vocab_size, reduction)


def _run_chunk(layers: list[Block], x: torch.Tensor) -> torch.Tensor:
    for layer in layers:
        x, _ = layer(x)
    return x


_PARTITION_DIMS = {
    "embed.weight": 0,
    "lm_head.weight": 0,
    "att.time_decay": 0,
    "att.time_first": 0,
    "att.key.weight": 0,
    "att.value.weight": 0,
    "att.receptance.weight": 0,
    "att.output.weight": 1,
    "ffn.key.weight": 0,
    "ffn.receptance.weight": 1,
    "ffn.value.weight": 1,
}


def partition_dim(name: str) -> int | None:
    """TP partition dim of a parameter given its checkpoint name (None: replicated)."""
    if name.startswith("layers."):
        name = name.split(".", 2)[2]
    return _PARTITION_DIMS.get(name)


"""RWKV generation in RNN mode: a prompt in parallel mode returning the state, then one token per step.

`RWKVStepper` is the fast single-token step. A token touches every weight once, so on a CPU the step
is bound by weight bandwidth plus per-op dispatch; the stepper cuts the dispatch: it keeps its own
contiguous copies of the weights in the layout each op wants (k/v/r weights stacked into one [3, D, D]
batched matmul, the three token-shift mixes as one addcmul, -exp(time_decay) precomputed, ln0 folded into
the embedding rows as BlinkDL does), updates the state in place, and runs under inference_mode. It does
the same math as RWKV.forward_rnn (tests compare both with transformers). For float32 CPU models and
batches up to CPP_MAX_BATCH the whole step is one C++ call (neox.ops.rwkv_step: no per-op dispatch, one
thread pool that survives CPU contention, weights packed for streaming); where that extension cannot
build it warns once and the torch step runs.

States: the model's format is five tensors [B, C, L] (neox.models.rwkv STATE_FIELDS, HF order); the
stepper's is the same five as [L, B, C] (each layer's slice contiguous). `save_state` / `load_state`
store the model format with the next-token logits and the sampling RNG, so generation resumes exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from megatron_ext.tensor_parallel import gather_from_tensor_parallel_region
from neox.inference.generate import FINISH_LENGTH, GenerationResult, _StopChecker
from neox.inference.sampling import SamplingParams, sample_next
from neox.models.rwkv.model import STATE_FIELDS
from neox.ops.rwkv_step import make_stepper

STATE_FORMAT = "neox-rwkv-state"
# The C++ step reads the weights once per 4 rows, so it serves small batches; larger ones use batched
# matmuls (72M model, 2 cores: C++ 8.4 / 16.1 ms at batch 4 / 8 against 14.1 / 20.6 for the torch step;
# at batch 16 the torch step wins, 21.3 against 32.3).
CPP_MAX_BATCH = 8


def _rwkv(model: nn.Module) -> nn.Module:
    net = model.model if hasattr(model, "model") and hasattr(model.model, "init_state") else model
    if not hasattr(net, "forward_rnn"):
        raise ValueError(f"RNN generation needs an RWKV model (or a CausalLM around one), got {type(net).__name__}")
    if not (net.pre_process and net.post_process):
        raise ValueError("RNN generation needs the whole model on this rank (pipeline size 1)")
    return net


class RWKVStepper:
    """The fused one-token step of a TP = 1 RWKV model: `step(ids [B], state) -> (logits [B, V], state)`.

    Weights are copied at construction (re-create the stepper after changing the model's weights)."""

    @torch.no_grad()
    def __init__(self, model: nn.Module):
        net = _rwkv(model)
        if net.ps.tp_size != 1:
            raise ValueError("RWKVStepper needs a TP = 1 model; use RNNRunner for tensor-parallel models")
        self.net, self.cfg = net, net.cfg
        self.vocab_size, self.eps = net.cfg.vocab_size, net.cfg.layernorm_epsilon
        p = next(net.parameters())
        self.dtype, self.device = p.dtype, p.device
        layers = list(net.layers.values())
        self.n, self.d = len(layers), net.cfg.hidden_size
        b0 = layers[0]
        self._blocks = layers
        self.emb = F.layer_norm(net.embed.weight, (self.d,), b0.ln0.weight, b0.ln0.bias, self.eps)  # [Vpad, D]
        self.ln_out = (net.ln_out.weight.clone(), net.ln_out.bias.clone())
        self.head = net.lm_head.weight[: self.vocab_size]  # [V, D] (a view: no copy of the largest matrix)
        self._layers = None  # the torch step's weights, made on first use (the C++ step keeps its own copy)
        self._cpp = None  # the one-call C++ step (float32 CPU); None: the torch step below
        if self.dtype == torch.float32 and self.device.type == "cpu":
            self._cpp = make_stepper(self.emb, [[
                blk.ln1.weight, blk.ln1.bias, blk.ln2.weight, blk.ln2.bias,
                torch.stack([blk.att.time_mix_k, blk.att.time_mix_v, blk.att.time_mix_r]).reshape(3, -1),
                blk.att.key.weight, blk.att.value.weight, blk.att.receptance.weight,
                -torch.exp(blk.att.time_decay.float()), blk.att.time_first, blk.att.output.weight,
                torch.stack([blk.ffn.time_mix_k, blk.ffn.time_mix_r]).reshape(2, -1),
                blk.ffn.key.weight, blk.ffn.receptance.weight, blk.ffn.value.weight] for blk in layers],
                self.ln_out, self.head, self.eps)

    @property
    def layers(self) -> list[dict]:
        """The torch step's per-layer weights, in the layout each of its ops wants (copies, made once)."""
        if self._layers is None:
            with torch.no_grad():
                self._layers = [self._torch_layer(blk) for blk in self._blocks]
        return self._layers

    @staticmethod
    def _torch_layer(blk: nn.Module) -> dict:
        a, f = blk.att, blk.ffn
        return dict(
            ln1=(blk.ln1.weight.clone(), blk.ln1.bias.clone()), ln2=(blk.ln2.weight.clone(), blk.ln2.bias.clone()),
            att_mix=torch.stack([a.time_mix_k, a.time_mix_v, a.time_mix_r]).reshape(3, 1, -1).clone(),  # [3, 1, D]
            kvr_t=torch.stack([a.key.weight.t(), a.value.weight.t(), a.receptance.weight.t()]).contiguous(),
            w=-torch.exp(a.time_decay.float()), u=a.time_first.float().clone(),  # [D]
            out_t=a.output.weight.t(),  # [D, D] view: addmm reads it transposed without a copy
            ffn_mix=torch.stack([f.time_mix_k, f.time_mix_r]).reshape(2, 1, -1).clone(),  # [2, 1, D]
            fk_t=f.key.weight.t(), fr_t=f.receptance.weight.t(), fv_t=f.value.weight.t(),
        )

    def describe(self) -> str:
        """One line on how a token is computed (for progress output)."""
        if self._cpp is None:
            return f"fused torch step ({self.dtype}, {self.device})"
        c = self._cpp
        return (f"C++ step ({c.isa}, {c.threads} threads; {c.packed_bytes / 1e6:.1f} MB of weights per token, "
                f"{c.bf16_bytes / 1e6:.1f} MB of them stored as exact bf16) for batches up to {CPP_MAX_BATCH}")

    def init_state(self, batch_size: int) -> list[torch.Tensor]:
        """The empty state in the stepper's format: five [L, B, D] tensors (pp = -1e38)."""
        return self.from_model_state(self.net.init_state(batch_size, device=self.device, dtype=self.dtype))

    @staticmethod
    def from_model_state(state: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Model format [B, C, L] -> stepper format [L, B, C] (copies)."""
        return [s.permute(2, 0, 1).contiguous() for s in state]

    @staticmethod
    def to_model_state(state: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Stepper format [L, B, C] -> model format [B, C, L] (copies)."""
        return [s.permute(1, 2, 0).contiguous() for s in state]

    @torch.inference_mode()
    def step(self, ids: torch.Tensor, state: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """ids [B] (or [B, 1]) and the state before them -> (logits [B, V] real vocab, the state after them).

        The state is updated in place (and returned)."""
        ffn_x, att_x, aa, bb, pp = state
        if (self._cpp is not None and ids.numel() <= CPP_MAX_BATCH
                and all(s.dtype == torch.float32 and s.is_contiguous() for s in state)):
            return self._cpp.step(ids, ffn_x, att_x, aa, bb, pp), state
        d, eps = self.d, self.eps
        x = self.emb[ids.reshape(-1)]  # [B, D]
        for i, ly in enumerate(self.layers):
            # time mixing
            xx = F.layer_norm(x, (d,), *ly["ln1"], eps)
            sx = att_x[i]
            mixed = torch.addcmul(sx, xx - sx, ly["att_mix"])  # [3, B, D]: k, v, r inputs
            kvr = torch.bmm(mixed, ly["kvr_t"])  # [3, B, D]
            k, v, r = kvr[0], kvr[1], kvr[2]
            sx.copy_(xx)
            a_, b_, p_ = aa[i], bb[i], pp[i]
            ww = ly["u"] + k
            p = torch.maximum(p_, ww)
            e1 = torch.exp(p_ - p)
            e2 = torch.exp(ww - p)
            y = torch.addcmul(e1 * a_, e2, v).div_(torch.addcmul(e2, e1, b_))  # wkv
            ww = ly["w"] + p_
            torch.maximum(ww, k, out=p_)
            e1 = torch.exp(ww - p_)
            e2 = torch.exp(k - p_)
            a_.mul_(e1).addcmul_(e2, v)
            b_.mul_(e1).add_(e2)
            x = torch.addmm(x, torch.sigmoid(r).mul_(y), ly["out_t"])
            # channel mixing
            xx = F.layer_norm(x, (d,), *ly["ln2"], eps)
            sx = ffn_x[i]
            mixed = torch.addcmul(sx, xx - sx, ly["ffn_mix"])  # [2, B, D]: k, r inputs
            sx.copy_(xx)
            kk = torch.relu(torch.mm(mixed[0], ly["fk_t"])).square_()  # [B, F]
            rr = torch.sigmoid(torch.mm(mixed[1], ly["fr_t"]))
            x = torch.addcmul(x, rr, torch.mm(kk, ly["fv_t"]))
        x = F.layer_norm(x, (d,), *self.ln_out, eps)
        return torch.mm(x, self.head.t()), state


class RNNRunner:
    """Generation's view of an RWKV model (any TP rank): prefill a prompt, step a batch, in model-format states.

    TP = 1 in float32/64 uses RWKVStepper for the steps (16-bit models and `fused=False` run forward_rnn);
    under tensor parallelism every rank runs forward_rnn on its shard and the vocab-parallel logits are
    all-gathered."""

    def __init__(self, model: nn.Module, *, fused: bool = True):
        self.net = _rwkv(model)
        self.ps, self.vocab_size = self.net.ps, self.net.cfg.vocab_size
        p = next(self.net.parameters())
        fast = fused and self.net.ps.tp_size == 1 and p.dtype in (torch.float32, torch.float64)
        self.stepper = RWKVStepper(self.net) if fast else None
        self.device = p.device

    def describe(self) -> str:
        """One line on how a token is computed (for progress output)."""
        if self.stepper is not None:
            return self.stepper.describe()
        return f"the model's forward_rnn (TP {self.ps.tp_size}, {next(self.net.parameters()).dtype})"

    def _logits(self, local: torch.Tensor) -> torch.Tensor:
        return gather_from_tensor_parallel_region(local.contiguous(), self.ps)[..., : self.vocab_size].float()

    @torch.inference_mode()
    def prefill(self, ids: Sequence[int], state: list[torch.Tensor] | None):
        """One row's tokens (parallel mode) from a model-format state of batch 1 (None: empty) ->
        (last logits [1, V], state)."""
        x = torch.as_tensor(list(ids), dtype=torch.long, device=self.device)[None]
        out, state = self.net(x, state=state, return_state=True)
        return self._logits(out[:, -1]), state

    def start(self, state: list[torch.Tensor]):
        return self.stepper.from_model_state(state) if self.stepper else state

    def finish(self, state) -> list[torch.Tensor]:
        return self.stepper.to_model_state(state) if self.stepper else [s.clone() for s in state]

    @torch.inference_mode()
    def step(self, ids: torch.Tensor, state):
        if self.stepper is not None:
            logits, state = self.stepper.step(ids, state)
            return logits.float(), state
        out, state = self.net.forward_rnn(ids, state)
        return self._logits(out), state


@dataclass
class RNNGenerationResult(GenerationResult):
    """GenerationResult plus, with return_state, the state after every row's consumed tokens (model
    format [B, C, L]) and the next-token logits [B, V]: what `save_state` stores to resume from."""

    state: list[torch.Tensor] | None = None
    next_logits: torch.Tensor | None = None


def _rows(state: Sequence[torch.Tensor], rows) -> list[torch.Tensor]:
    return [s[rows] for s in state]


@torch.no_grad()
def rnn_generate_batch(
    model: nn.Module | RNNRunner,
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
    state: list[torch.Tensor] | None = None,
    logits: torch.Tensor | None = None,
    return_state: bool = False,
    pad_id: int = 0,
    return_logits: bool = False,
) -> RNNGenerationResult:
    """Continue every prompt in RNN mode; arguments and stopping as neox.inference.generate_batch.

    Each prompt runs alone in parallel mode (RWKV has no padding mask), its state is stacked into the
    batch, then all rows step together one token at a time. `state` (model format, batch = len(prompts))
    and `logits` [B, V] resume a previous generation (see `load_state`): prompts are read on from that
    state, and an empty prompt continues from `logits`. A row's returned state covers every token it
    consumed (its prompt and all sampled tokens up to the one that ended it)."""
    runner = model if isinstance(model, RNNRunner) else RNNRunner(model)
    b = len(prompts)
    if b == 0:
        raise ValueError("rnn_generate_batch: no prompts")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if any(len(p) == 0 for p in prompts) and (state is None or logits is None):
        raise ValueError("an empty prompt needs a state and its logits to continue from (load_state)")
    if state is not None and state[0].shape[0] != b:
        raise ValueError(f"the state holds {state[0].shape[0]} rows but {b} prompts were given; one state "
                         "row per prompt")
    params = params or SamplingParams()
    stop = _StopChecker(eod_id, stop_sequences, stop_strings, detokenize)
    if generator is None and seed is not None:
        generator = torch.Generator(device=runner.device).manual_seed(seed)

    row_states, row_logits = [], []
    for r, p in enumerate(prompts):
        s = None if state is None else _rows(state, slice(r, r + 1))
        if len(p):
            lg, s = runner.prefill(p, s)
        else:
            lg = logits[r: r + 1].float()
        row_states.append(s)
        row_logits.append(lg)
    cur = [torch.cat(f) for f in zip(*row_states)]  # model format [B, C, L]
    logits = torch.cat(row_logits)  # [B, V]

    out = [[] for _ in range(b)]
    reasons: list[str | None] = [None] * b
    result = RNNGenerationResult(tokens=out, finish_reasons=reasons)
    final_state = [s.clone() for s in cur] if return_state else None
    final_logits = logits.clone() if return_state else None
    st = runner.start(cur)
    for step in range(max_new_tokens):
        if return_logits:
            result.step_logits.append(logits)
        nxt = sample_next(logits, params, generator).to(torch.long)  # [B]
        active = [x is None for x in reasons]
        nxt = torch.where(torch.tensor(active, device=nxt.device), nxt, torch.full_like(nxt, pad_id))
        for r, tok in enumerate(nxt.tolist()):
            if active[r]:
                reasons[r] = stop.push(out[r], tok)
        finished = all(x is not None for x in reasons) or step == max_new_tokens - 1
        if finished and not return_state:
            break
        logits, st = runner.step(nxt, st)
        if return_state:  # keep the state of every row that consumed a real token this step
            rows = [r for r in range(b) if active[r]]
            model_state = runner.finish(st)
            for f, s in zip(final_state, model_state):
                f[rows] = s[rows]
            final_logits[rows] = logits[rows].to(final_logits.dtype)
        if finished:
            break
    reasons[:] = [x or FINISH_LENGTH for x in reasons]
    if detokenize is not None:
        result.texts = [stop.text(row, why) for row, why in zip(out, reasons)]
    result.state, result.next_logits = final_state, final_logits
    return result


# -------------------------------------------------------------------------------------- state files
def save_state(path, state: Sequence[torch.Tensor], logits: torch.Tensor | None = None,
               generator: torch.Generator | None = None) -> None:
    """Write a model-format RWKV state (and the next-token logits and RNG) as safetensors."""
    tensors = {name: s.detach().cpu().contiguous() for name, s in zip(STATE_FIELDS, state)}
    if logits is not None:
        tensors["logits"] = logits.detach().float().cpu().contiguous()
    if generator is not None:
        tensors["rng"] = generator.get_state()
    b, d, n = tensors["att_x"].shape
    save_file(tensors, str(path), metadata={"format": STATE_FORMAT, "version": "1", "batch": str(b),
                                            "hidden_size": str(d), "num_layers": str(n)})


@dataclass
class SavedState:
    state: list[torch.Tensor]
    logits: torch.Tensor | None
    rng: torch.Tensor | None


def load_state(path, model: nn.Module | None = None) -> SavedState:
    """Read `save_state`'s file; with `model`, check the state fits it (ValueError naming the mismatch)."""
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != STATE_FORMAT:
            raise ValueError(f"{path} is not an RWKV state file (format={meta.get('format')!r}); write one with "
                             "tools/generate.py --save-state")
        t = {k: f.get_tensor(k) for k in f.keys()}
    state = [t[name] for name in STATE_FIELDS]
    if model is not None:
        net = _rwkv(model)
        want = (net.cfg.hidden_size, len(net.layers))
        if tuple(state[1].shape[1:]) != want:
            raise ValueError(f"{path}: state is for hidden_size x layers {tuple(state[1].shape[1:])}, the model "
                             f"has {want}")
        p = next(net.parameters())
        state = [s.to(p.device, p.dtype if i < 2 else torch.float32) for i, s in enumerate(state)]
    return SavedState(state, t.get("logits"), t.get("rng"))

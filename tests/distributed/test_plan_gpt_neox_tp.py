"""The planner's GPT-NeoX activation model at TP 2, with and without sequence parallelism, against the bytes
autograd saves on each of 2 gloo ranks (saved_tensors_hooks; unique storages, parameters excluded; see
tests/unit/test_plan_gpt_neox.py for the single-process checks and the CPU probes).

One fork per layout measures everything: a layer (sequential residual, rotary 1.0), a layer with hidden and
attention dropout (parallel residual, rotary 0.25; CPU SDPA drops with its math kernel), the output head
(fused loss), the whole tiny model (embedding ids and out-of-shard mask, layers, rotary tables, head; tied
embeddings) and checkpointed chunks.
"""

from __future__ import annotations

import math

import pytest
import torch

from megatron_ext.testing import run_distributed
from megatron_ext.topology import ParallelState
from neox.config import ModelConfig
from neox.config.plan import (
    embedding_activation_bytes,
    gpt_neox_head_activation_bytes,
    gpt_neox_layer_activation_bytes,
    gpt_neox_rotary_bytes,
    memory_per_gpu,
)
from neox.models.gpt_neox import GPTNeoX
from neox.models.parallel import ParallelOptions
from tests.saved_bytes import (
    cpu_attention_kernel,
    cpu_attention_mask_bytes,
    cpu_dropout_mask_bytes,
    saved_bytes,
)

TP, S, B, D, HEADS, F, LAYERS, VOCAB = 2, 16, 2, 32, 4, 96, 3, 200
DROP = 0.1


def _cfg(*, parallel: bool = False, rotary: float = 1.0, dropout: float = 0.0, tied: bool = False) -> ModelConfig:
    return ModelConfig(num_layers=LAYERS, hidden_size=D, num_attention_heads=HEADS, intermediate_size=F,
                       seq_length=S, vocab_size=VOCAB, gpt_j_residual=parallel, rotary_pct=rotary,
                       hidden_dropout=dropout, attention_dropout=dropout, no_weight_tying=not tied)


def _measure(sp: bool) -> dict[str, int]:
    ps = ParallelState.from_sizes(tp=TP)
    opts = ParallelOptions(sequence_parallel=sp)
    torch.manual_seed(0)  # same ids and inputs on every rank (the TP group sees one batch)
    ids, labels = torch.randint(0, VOCAB, (B, S)), torch.randint(0, VOCAB, (B, S))
    x = torch.randn(B, S // TP if sp else S, D, requires_grad=True)
    out: dict[str, int] = {}

    def run(name: str, model: GPTNeoX, fn) -> None:
        out[name], y = saved_bytes(model, fn)
        y.sum().backward()

    layer = GPTNeoX(_cfg(), ps, pre_process=False, post_process=False, layer_range=(1, 2), options=opts).train()
    run("layer", layer, lambda: layer(x))
    drop = GPTNeoX(_cfg(parallel=True, rotary=0.25, dropout=DROP), ps, pre_process=False, post_process=False,
                   layer_range=(1, 2), options=opts).train()
    run("dropout_layer", drop, lambda: drop(x))
    head = GPTNeoX(_cfg(), ps, pre_process=False, post_process=True, layer_range=(LAYERS, LAYERS),
                   options=opts).train()
    run("head", head, lambda: head.forward_loss(x, labels))
    model = GPTNeoX(_cfg(parallel=True, rotary=0.25, tied=True), ps, options=opts).train()
    run("model", model, lambda: model.forward_loss(ids, labels))
    ckpt = GPTNeoX(_cfg(), ps, pre_process=False, post_process=False,
                   options=ParallelOptions(sequence_parallel=sp, checkpoint_activations=True,
                                           checkpoint_num_layers=2)).train()
    run("checkpointed", ckpt, lambda: ckpt(x))
    return out


@pytest.mark.parametrize("sp", [False, True], ids=["tp2", "tp2-sp"])
def test_tp2_saved_bytes_match_the_formulas(sp):
    results = run_distributed(_measure, TP, sp, timeout=120)
    assert results[0] == results[1], "TP ranks keep different amounts"
    got = results[0]
    e = 4  # fp32: CPU norm statistics are fp32 like CUDA's, so the planner's defaults apply but for masks
    kernel = cpu_attention_kernel(torch.float32, 0.0)
    rot1, rot_q = gpt_neox_rotary_bytes(S, D // HEADS, e), gpt_neox_rotary_bytes(S, D // HEADS // 4, e)
    layer = gpt_neox_layer_activation_bytes(S, B, D, HEADS, F, TP, sp, e, attention=kernel)
    assert got["layer"] == layer + rot1
    dropped = gpt_neox_layer_activation_bytes(
        S, B, D, HEADS, F, TP, sp, e, parallel_residual=True, hidden_dropout=True, attention_dropout=True,
        attention=cpu_attention_kernel(torch.float32, DROP), mask_bytes=cpu_dropout_mask_bytes(torch.float32),
        attn_mask_bytes=cpu_attention_mask_bytes(torch.float32))
    assert got["dropout_layer"] == dropped + rot_q
    vpad = _cfg().padded_vocab_size(TP)
    head = gpt_neox_head_activation_bytes(S, B, D, vpad, TP, sp, e)
    assert got["head"] == head

    cfg = _cfg(parallel=True, rotary=0.25, tied=True)
    whole = (embedding_activation_bytes(S, B, D, TP, sp) + rot_q + head
             + LAYERS * gpt_neox_layer_activation_bytes(S, B, D, HEADS, F, TP, sp, e, parallel_residual=True,
                                                         attention=kernel))
    assert got["model"] == whole
    stage = memory_per_gpu(cfg, tp=TP, micro_batch=B, precision="fp32", sequence_parallel=sp,
                           attention=kernel)["stages"][0]
    assert got["model"] == stage["activations"]["none"] + stage["head_activations"]

    per_layer = memory_per_gpu(_cfg(), tp=TP, micro_batch=B, precision="fp32", sequence_parallel=sp,
                               checkpoint_activations=True, checkpoint_num_layers=2)["layer_activations"]
    assert got["checkpointed"] == math.ceil(LAYERS / 2) * per_layer["checkpoint_input"] + rot1

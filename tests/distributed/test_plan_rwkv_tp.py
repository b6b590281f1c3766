"""The planner's RWKV-4 activation model at TP 2, with and without sequence parallelism, against the bytes
autograd saves on each of 2 gloo ranks (saved_tensors_hooks; unique storages, parameters excluded; see
tests/unit/test_plan_rwkv.py for the single-process checks and the CPU norm-statistics probe).

One fork per layout measures everything: a block, the output head (fused loss), the whole tiny model
(embedding ids and out-of-shard mask, ln0, blocks, head) and checkpointed chunks.
"""

from __future__ import annotations

import math

import pytest
import torch

from megatron_ext.testing import run_distributed
from megatron_ext.topology import ParallelState
from neox.config import ModelConfig
from neox.config.plan import (
    memory_per_gpu,
    rwkv_embedding_activation_bytes,
    rwkv_head_activation_bytes,
    rwkv_layer_activation_bytes,
    rwkv_norm_input_bytes,
)
from neox.models.parallel import ParallelOptions
from neox.models.rwkv import RWKV
from tests.saved_bytes import saved_bytes

TP, S, B, D, F, LAYERS, VOCAB = 2, 16, 2, 32, 96, 3, 200


@pytest.fixture(scope="module", autouse=True)
def _built_wkv():
    from neox.ops.wkv import prebuild

    if prebuild("cpu") != "cpu":  # build once, before ranks fork
        pytest.skip("the WKV CPU extension cannot be built here; the planner models the extension's saves")


def _cfg() -> ModelConfig:
    return ModelConfig(model_type="rwkv", num_layers=LAYERS, hidden_size=D, intermediate_size=F, seq_length=S,
                       vocab_size=VOCAB, no_weight_tying=True)


def _measure(sp: bool) -> dict[str, int]:
    ps = ParallelState.from_sizes(tp=TP)
    cfg, s_local = _cfg(), S // TP if sp else S
    torch.manual_seed(0)  # same ids and inputs on every rank (the TP group sees one batch)
    ids, labels = torch.randint(0, VOCAB, (B, S)), torch.randint(0, VOCAB, (B, S))
    x = torch.randn(B, s_local, D, requires_grad=True)
    out: dict[str, int] = {}

    block = RWKV(cfg, ps, pre_process=False, post_process=False, layer_range=(1, 2),
                 options=ParallelOptions(sequence_parallel=sp)).train()
    out["layer"], y = saved_bytes(block, lambda: block(x))
    y.sum().backward()

    head = RWKV(cfg, ps, pre_process=False, post_process=True, layer_range=(LAYERS, LAYERS),
                options=ParallelOptions(sequence_parallel=sp)).train()
    out["head"], loss = saved_bytes(head, lambda: head.forward_loss(x, labels))
    loss.backward()

    model = RWKV(cfg, ps, options=ParallelOptions(sequence_parallel=sp)).train()
    out["model"], loss = saved_bytes(model, lambda: model.forward_loss(ids, labels))
    loss.backward()

    ckpt = RWKV(cfg, ps, pre_process=False, post_process=False,
                options=ParallelOptions(sequence_parallel=sp, checkpoint_activations=True,
                                        checkpoint_num_layers=2)).train()
    out["checkpointed"], y = saved_bytes(ckpt, lambda: ckpt(x))
    y.sum().backward()
    return out


@pytest.mark.parametrize("sp", [False, True], ids=["tp2", "tp2-sp"])
def test_tp2_saved_bytes_match_the_formulas(sp):
    results = run_distributed(_measure, TP, sp, timeout=120)
    assert results[0] == results[1], "TP ranks keep different amounts"
    got = results[0]
    cfg, e = _cfg(), 4  # fp32: CPU norm statistics are fp32 like CUDA's, so the planner's defaults apply
    vpad = cfg.padded_vocab_size(TP)
    layer = rwkv_layer_activation_bytes(S, B, D, F, TP, sp, e)
    head = rwkv_head_activation_bytes(S, B, D, vpad, TP, sp, e)
    assert got["layer"] == pytest.approx(layer, rel=1e-3)
    assert got["head"] == pytest.approx(head, rel=1e-3)
    whole = (rwkv_embedding_activation_bytes(S, B, D, TP, sp) + rwkv_norm_input_bytes(S, B, D, TP, sp, e)
             + LAYERS * layer + head)
    assert got["model"] == pytest.approx(whole, rel=1e-3)
    stage = memory_per_gpu(cfg, tp=TP, micro_batch=B, precision="fp32", sequence_parallel=sp)["stages"][0]
    assert got["model"] == pytest.approx(stage["activations"]["none"] + stage["head_activations"], rel=1e-3)
    per_layer = memory_per_gpu(cfg, tp=TP, micro_batch=B, precision="fp32", sequence_parallel=sp,
                               checkpoint_activations=True, checkpoint_num_layers=2)["layer_activations"]
    assert got["checkpointed"] == math.ceil(LAYERS / 2) * per_layer["checkpoint_input"]

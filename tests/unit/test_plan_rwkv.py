"""The planner's RWKV-4 activation model against what autograd actually keeps.

Independent reference: `torch.autograd.graph.saved_tensors_hooks` records every tensor a training
forward of neox's RWKV saves for backward; each underlying storage is counted once and parameters (or
views of them) are not activations. The formulas in neox.config.plan must give exactly those bytes for
one block, the output head, the embedding + ln0 and checkpointed chunks, in fp32 and bf16.

Device constants: the planner sizes CUDA runs, where LayerNorm keeps fp32 mean/rstd and dropout a bool
mask. On CPU torch keeps both in the activation dtype, so the tests probe those two sizes from plain
torch ops (not from neox) and pass them to the formulas.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_ext.topology import ParallelState
from neox.config import ModelConfig, flops_per_token, load_config
from neox.config.plan import (
    memory_per_gpu,
    rwkv_embedding_activation_bytes,
    rwkv_head_activation_bytes,
    rwkv_layer_activation_bytes,
    rwkv_norm_input_bytes,
)
from neox.models.parallel import ParallelOptions
from neox.models.rwkv import RWKV
from tests.saved_bytes import DTYPES, cpu_dropout_mask_bytes, cpu_norm_stat_bytes, saved_bytes

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module", autouse=True)
def _wkv_extension():
    from neox.ops.wkv import prebuild

    if prebuild("cpu") != "cpu":  # the pure-torch fallback saves per-step tensors; the planner models the kernel
        pytest.skip("the WKV CPU extension cannot be built here; the planner models the extension's saves")


def _cfg(d: int, f: int, s: int, layers: int = 3, vocab: int = 100, dropout: float = 0.0) -> ModelConfig:
    return ModelConfig(model_type="rwkv", num_layers=layers, hidden_size=d, intermediate_size=f, seq_length=s,
                       vocab_size=vocab, no_weight_tying=True, hidden_dropout=dropout)


SHAPES = [(16, 2, 64, 256), (24, 1, 32, 96), (8, 3, 48, 200)]  # (s, b, D, F)


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("s,b,d,f", SHAPES)
def test_one_block_matches_saved_tensors(s, b, d, f, dtype):
    # block 1 alone (block 0 also holds ln0, counted separately)
    model = RWKV(_cfg(d, f, s), ParallelState.single(), pre_process=False, post_process=False,
                 layer_range=(1, 2)).to(dtype).train()
    x = torch.randn(b, s, d, dtype=dtype, requires_grad=True)
    got, out = saved_bytes(model, lambda: model(x))
    out.float().sum().backward()
    want = rwkv_layer_activation_bytes(s, b, d, f, 1, False, DTYPES[dtype], stat_bytes=cpu_norm_stat_bytes(dtype))
    assert got == pytest.approx(want, rel=1e-3), f"measured {got} B, formula {want} B"


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_block_with_dropout_matches_saved_tensors(dtype):
    s, b, d, f = 16, 2, 32, 128
    model = RWKV(_cfg(d, f, s, dropout=0.1), ParallelState.single(), pre_process=False, post_process=False,
                 layer_range=(1, 2)).to(dtype).train()
    x = torch.randn(b, s, d, dtype=dtype, requires_grad=True)
    got, _ = saved_bytes(model, lambda: model(x))
    want = rwkv_layer_activation_bytes(s, b, d, f, 1, False, DTYPES[dtype], dropout=True,
                                       stat_bytes=cpu_norm_stat_bytes(dtype), mask_bytes=cpu_dropout_mask_bytes(dtype))
    assert got == pytest.approx(want, rel=1e-3)


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_head_matches_saved_tensors(dtype):
    s, b, d, f, layers = 16, 2, 64, 128, 2
    cfg = _cfg(d, f, s, layers=layers, vocab=300)
    model = RWKV(cfg, ParallelState.single(), pre_process=False, post_process=True,
                 layer_range=(layers, layers)).to(dtype).train()  # ln_out + head only
    x = torch.randn(b, s, d, dtype=dtype, requires_grad=True)
    labels = torch.randint(0, 300, (b, s))
    got, loss = saved_bytes(model, lambda: model.forward_loss(x, labels))  # the path training takes
    loss.backward()
    want = rwkv_head_activation_bytes(s, b, d, cfg.padded_vocab_size(1), 1, False, DTYPES[dtype],
                                      stat_bytes=cpu_norm_stat_bytes(dtype))
    assert got == pytest.approx(want, rel=1e-3)


def test_whole_tiny_model_matches_the_stage_estimate():
    # fp32 on CPU keeps fp32 norm statistics like CUDA and dropout is off: the planner's own defaults apply,
    # so its single-stage estimate (no recompute) must be what autograd keeps for one micro-batch
    s, b, d, f, layers = 16, 2, 32, 128, 3
    cfg = _cfg(d, f, s, layers=layers, vocab=200)
    model = RWKV(cfg, ParallelState.single()).train()
    ids, labels = torch.randint(0, 200, (b, s)), torch.randint(0, 200, (b, s))
    got, loss = saved_bytes(model, lambda: model.forward_loss(ids, labels))
    loss.backward()
    stage = memory_per_gpu(cfg, micro_batch=b, precision="fp32")["stages"][0]
    want = stage["activations"]["none"] + stage["head_activations"]
    assert got == pytest.approx(want, rel=1e-3)
    assert stage["activations"]["selective"] == stage["activations"]["none"]  # RWKV: no selective recompute


@pytest.mark.parametrize("k", [1, 2, 3])
def test_checkpointed_chunks_keep_only_their_input(k):
    s, b, d, f, layers = 16, 2, 32, 128, 4
    cfg = _cfg(d, f, s, layers=layers)
    opts = ParallelOptions(checkpoint_activations=True, checkpoint_num_layers=k)
    blocks = RWKV(cfg, ParallelState.single(), pre_process=False, post_process=False, layer_range=(0, layers),
                  options=opts).train()
    x = torch.randn(b, s, d, requires_grad=True)
    got, out = saved_bytes(blocks, lambda: blocks(x))
    out.sum().backward()
    per_layer = memory_per_gpu(cfg, micro_batch=b, precision="fp32", checkpoint_activations=True,
                               checkpoint_num_layers=k)["layer_activations"]
    assert got == math.ceil(layers / k) * per_layer["checkpoint_input"]

    # the whole model: the embedding's ids stay outside the chunks, ln0 is inside chunk 0
    model = RWKV(cfg, ParallelState.single(), options=opts).train()
    ids = torch.randint(0, 100, (b, s))
    got, loss = saved_bytes(model, lambda: model.forward_loss(ids, ids))
    loss.backward()
    want = (rwkv_embedding_activation_bytes(s, b, d) + math.ceil(layers / k) * per_layer["checkpoint_input"]
            + rwkv_head_activation_bytes(s, b, d, cfg.padded_vocab_size(1), act_bytes=4))
    assert got == want


def test_stage_assembly_under_pipeline_parallelism():
    cfg = _cfg(64, 256, 32, layers=6)
    mem = memory_per_gpu(cfg, pp=2, micro_batch=2, grad_accum=4, precision="bf16", checkpoint_activations=True,
                         checkpoint_num_layers=2)
    layer = rwkv_layer_activation_bytes(32, 2, 64, 256, act_bytes=2)
    ln0 = rwkv_norm_input_bytes(32, 2, 64, act_bytes=2)
    emb = rwkv_embedding_activation_bytes(32, 2, 64)
    first, last = mem["stages"]
    assert (first["in_flight"], last["in_flight"]) == (2, 1)
    assert first["activations"]["none"] == 2 * (3 * layer + emb + ln0)
    assert first["activations"]["full"] == 2 * (2 * 2 * 32 * 2 * 64 + emb) + 2 * layer + ln0
    assert last["activations"]["none"] == 3 * layer and first["head_activations"] == 0
    assert last["head_activations"] == rwkv_head_activation_bytes(32, 2, 64, cfg.padded_vocab_size(1))


def _plan_json(*args):
    r = subprocess.run([sys.executable, str(ROOT / "tools/plan.py"), *args], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    return r.stdout


def _eval_printed_forward(formula: str, m: ModelConfig, tp: int) -> float:
    """Evaluate the 'forward = ... per token' expression the CLI prints."""
    expr = re.match(r"forward = (.*?) per token", formula).group(1).replace("^", "**")
    env = dict(L=m.num_layers, D=m.hidden_size, F=m.ffn_size, Vpad=m.padded_vocab_size(tp), s=m.seq_length)
    return eval(expr, {"__builtins__": {}}, env)  # noqa: S307 - our own printed arithmetic


@pytest.mark.parametrize("config", ["configs/rwkv/1.5B.yml", "configs/pythia/70M.yml"])
def test_printed_flops_formula_matches_the_count(config):
    info = json.loads(_plan_json("-c", config, "--json"))
    m = load_config([str(ROOT / config)]).model
    printed = _eval_printed_forward(info["flops_formula"], m, info["tp"])
    assert printed == flops_per_token(m, info["tp"])["forward"]
    assert ("4*L*s*D" in info["flops_formula"]) == (m.model_type != "rwkv")


@pytest.mark.parametrize("overrides", [
    [],
    ["model_parallel_size=2", "pipe_parallel_size=2", "sequence_parallel=true", "checkpoint_activations=false"],
    ["model_parallel_size=4", "checkpoint_activations=true", "checkpoint_num_layers=2"],
])
def test_cli_reports_rwkv_activations(overrides):
    info = json.loads(_plan_json("-c", "configs/rwkv/1.5B.yml", *overrides, "--json"))
    cfg = load_config([str(ROOT / "configs/rwkv/1.5B.yml")], overrides)
    m, p, mem = cfg.model, cfg.parallel, info["memory"]
    want = rwkv_layer_activation_bytes(m.seq_length, cfg.training.train_micro_batch_size_per_gpu, m.hidden_size,
                                       m.ffn_size, p.tp_size, p.sequence_parallel and p.tp_size > 1, 2)
    assert mem["layer_activations"]["none"] == pytest.approx(want)
    for st in mem["stages"]:
        acts = st["activations"]
        assert acts["full"] < acts["selective"] == acts["none"]
        kind = "full" if p.checkpoint_activations else "none"
        assert st["total"] == pytest.approx(st["params"] + st["grads"] + st["optimizer_zero1"] + acts[kind]
                                            + st["head_activations"])
    assert mem["stages"][-1]["head_activations"] > 0
    text = _plan_json("-c", "configs/rwkv/1.5B.yml", *overrides)
    assert "n/a" not in text and "RWKV-4 tensors saved for backward" in text

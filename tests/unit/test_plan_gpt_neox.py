"""The planner's GPT-NeoX activation model against what autograd actually keeps.

Independent reference: `torch.autograd.graph.saved_tensors_hooks` records every tensor a training forward
of neox's GPTNeoX saves for backward; each underlying storage is counted once and parameters (or views of
them) are not activations. The formulas in neox.config.plan must give exactly those bytes for layers
(several shapes; fp32 and bf16; parallel and sequential residual; rotary_pct 0.25 and 1.0; dropout), the
fused output head, a whole tiny model (equal to the planner's stage estimate) and checkpointed chunks.

Device constants: the planner sizes CUDA runs (fp32 LayerNorm statistics, bool dropout masks, a fused SDPA
kernel). On CPU torch keeps statistics and masks in the tensor's dtype, and SDPA runs its CPU flash kernel,
or the math fallback when dropping: the tests probe those from plain torch ops (not from neox) and pass them.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from megatron_ext.topology import ParallelState
from neox.config import ModelConfig, load_config
from neox.config.plan import (
    embedding_activation_bytes,
    gpt_neox_attention_bytes,
    gpt_neox_head_activation_bytes,
    gpt_neox_layer_activation_bytes,
    gpt_neox_rotary_bytes,
    layer_activation_bytes,
    memory_per_gpu,
)
from neox.models.gpt_neox import GPTNeoX
from neox.models.parallel import ParallelOptions
from tests.saved_bytes import (
    DTYPES,
    cpu_attention_kernel,
    cpu_attention_mask_bytes,
    cpu_dropout_mask_bytes,
    cpu_norm_stat_bytes,
    saved_bytes,
)

ROOT = Path(__file__).resolve().parents[2]


def _cfg(d: int, heads: int, f: int, s: int, *, layers: int = 3, vocab: int = 100, parallel: bool = False,
         rotary: float = 1.0, hidden_dropout: float = 0.0, attention_dropout: float = 0.0,
         tied: bool = False) -> ModelConfig:
    return ModelConfig(num_layers=layers, hidden_size=d, num_attention_heads=heads, intermediate_size=f,
                       seq_length=s, vocab_size=vocab, rotary_pct=rotary, gpt_j_residual=parallel,
                       no_weight_tying=not tied, hidden_dropout=hidden_dropout, attention_dropout=attention_dropout)


def _layers(cfg: ModelConfig, n: int, dtype=torch.float32, **kw) -> GPTNeoX:
    """A middle pipeline stage holding n layers (no embedding, no head)."""
    return GPTNeoX(cfg, ParallelState.single(), pre_process=False, post_process=False, layer_range=(1, 1 + n),
                   **kw).to(dtype).train()


def _measure_layers(cfg: ModelConfig, n: int, b: int, dtype) -> int:
    model = _layers(cfg, n, dtype)
    x = torch.randn(b, cfg.seq_length, cfg.hidden_size, dtype=dtype, requires_grad=True)
    got, out = saved_bytes(model, lambda: model(x))
    out.float().sum().backward()  # the saved tensors were the ones backward needs
    return got


def _layer_formula(cfg: ModelConfig, b: int, dtype, **kw) -> float:
    return gpt_neox_layer_activation_bytes(
        cfg.seq_length, b, cfg.hidden_size, cfg.num_attention_heads, cfg.ffn_size, 1, False, DTYPES[dtype],
        parallel_residual=cfg.gpt_j_residual, stat_bytes=cpu_norm_stat_bytes(dtype), **kw)


SHAPES = [(16, 2, 64, 4, 256), (24, 3, 96, 3, 200), (8, 1, 48, 6, 96)]  # (s, b, D, heads, F)


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("parallel,rotary", [(True, 0.25), (False, 1.0), (True, 1.0), (False, 0.25)])
@pytest.mark.parametrize("s,b,d,a,f", SHAPES)
def test_layers_match_saved_tensors(s, b, d, a, f, parallel, rotary, dtype):
    # stages of 1 and 2 layers: n layers plus the stage's one pair of rotary tables, exactly
    assert cpu_attention_kernel(dtype, 0.0) == "flash"  # torch's CPU flash kernel: O(s), as on CUDA
    cfg = _cfg(d, a, f, s, parallel=parallel, rotary=rotary)
    layer = _layer_formula(cfg, b, dtype, attention="flash")
    rot = gpt_neox_rotary_bytes(s, cfg.rotary_dim, DTYPES[dtype])
    for n in (1, 2):
        assert _measure_layers(cfg, n, b, dtype) == n * layer + rot, f"{n} layer(s)"


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_math_kernel_matches_saved_tensors(dtype):
    # the s x s fallback, forced: scaled q, k, a copy of v and the probabilities, in fp32 for bf16 inputs
    s, b, d, a, f = 24, 2, 64, 2, 128  # s != D/heads, so a wrong s^2 or sD term cannot pass
    cfg = _cfg(d, a, f, s, rotary=0.25)
    with sdpa_kernel(SDPBackend.MATH):
        got = _measure_layers(cfg, 1, b, dtype)
    want = _layer_formula(cfg, b, dtype, attention="math") + gpt_neox_rotary_bytes(s, cfg.rotary_dim, DTYPES[dtype])
    assert got == want
    # by hand: fp32 q, k, v copies and fp32 probabilities, whatever the input dtype
    assert gpt_neox_attention_bytes(s, b, d, a, act_bytes=DTYPES[dtype], kernel="math") == \
        3 * 4 * s * b * d + 4 * a * s * s * b


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("hidden,attention", [(0.1, 0.0), (0.0, 0.1), (0.1, 0.1)])
def test_dropout_matches_saved_tensors(hidden, attention, dtype):
    s, b, d, a, f = 16, 2, 48, 3, 128
    cfg = _cfg(d, a, f, s, parallel=hidden > 0, rotary=0.25, hidden_dropout=hidden, attention_dropout=attention)
    kernel = cpu_attention_kernel(dtype, attention)  # CPU's flash kernel does not drop: math then
    got = _measure_layers(cfg, 1, b, dtype)
    want = _layer_formula(cfg, b, dtype, hidden_dropout=hidden > 0, attention_dropout=attention > 0,
                          attention=kernel, mask_bytes=cpu_dropout_mask_bytes(dtype),
                          attn_mask_bytes=cpu_attention_mask_bytes(dtype))
    assert got == want + gpt_neox_rotary_bytes(s, cfg.rotary_dim, DTYPES[dtype])


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("tied", [False, True])
def test_head_matches_saved_tensors(tied, dtype):
    s, b, d, a, f, layers = 16, 2, 64, 4, 128, 2
    cfg = _cfg(d, a, f, s, layers=layers, vocab=300, tied=tied)
    head = GPTNeoX(cfg, ParallelState.single(), pre_process=False, post_process=True,
                   layer_range=(layers, layers)).to(dtype).train()  # final norm + head only
    x = torch.randn(b, s, d, dtype=dtype, requires_grad=True)
    labels = torch.randint(0, 300, (b, s))
    got, loss = saved_bytes(head, lambda: head.forward_loss(x, labels))  # the path training takes
    loss.backward()
    want = gpt_neox_head_activation_bytes(s, b, d, cfg.padded_vocab_size(1), 1, False, DTYPES[dtype],
                                          stat_bytes=cpu_norm_stat_bytes(dtype))
    assert got == want


@pytest.mark.parametrize("parallel", [True, False])
def test_whole_tiny_model_matches_the_stage_estimate(parallel):
    # fp32 on CPU keeps fp32 norm statistics like CUDA and dropout is off: the planner's own defaults apply but
    # for the kernel (CPU flash; CUDA's fp32 default, memory-efficient, pads its logsumexp to 32 queries)
    s, b, d, a, f, layers = 20, 2, 32, 4, 128, 3
    cfg = _cfg(d, a, f, s, layers=layers, vocab=200, parallel=parallel, rotary=0.25, tied=parallel)
    model = GPTNeoX(cfg, ParallelState.single()).train()
    ids, labels = torch.randint(0, 200, (b, s)), torch.randint(0, 200, (b, s))
    got, loss = saved_bytes(model, lambda: model.forward_loss(ids, labels))
    loss.backward()
    mem = memory_per_gpu(cfg, micro_batch=b, precision="fp32", attention=cpu_attention_kernel(torch.float32, 0.0))
    stage = mem["stages"][0]
    assert got == stage["activations"]["none"] + stage["head_activations"]
    assert stage["activations"]["selective"] == stage["activations"]["none"]  # neox has no selective recompute
    cuda = memory_per_gpu(cfg, micro_batch=b, precision="fp32")
    assert cuda["attention_kernel"] == "efficient"
    assert cuda["stages"][0]["activations"]["none"] - stage["activations"]["none"] == layers * 4 * b * a * (32 - s)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_checkpointed_chunks_keep_only_their_input(k):
    s, b, d, a, f, layers = 16, 2, 32, 2, 128, 4
    cfg = _cfg(d, a, f, s, layers=layers, rotary=0.5)
    opts = ParallelOptions(checkpoint_activations=True, checkpoint_num_layers=k)
    mem = memory_per_gpu(cfg, micro_batch=b, precision="fp32", checkpoint_activations=True,
                         checkpoint_num_layers=k, attention="flash")
    per_layer = mem["layer_activations"]
    rot = gpt_neox_rotary_bytes(s, cfg.rotary_dim, 4)
    assert per_layer["rotary"] == rot

    stack = GPTNeoX(cfg, ParallelState.single(), pre_process=False, post_process=False, options=opts).train()
    x = torch.randn(b, s, d, requires_grad=True)
    got, out = saved_bytes(stack, lambda: stack(x))
    out.sum().backward()
    assert got == math.ceil(layers / k) * per_layer["checkpoint_input"] + rot  # the tables are chunk inputs too

    # the whole model: the embedding's ids and the head stay outside the chunks; the planner adds the working
    # set of one chunk recomputed in backward, which is not alive during the forward measured here
    model = GPTNeoX(cfg, ParallelState.single(), options=opts).train()
    ids = torch.randint(0, 100, (b, s))
    got, loss = saved_bytes(model, lambda: model.forward_loss(ids, ids))
    loss.backward()
    stage = mem["stages"][0]
    assert got == embedding_activation_bytes(s, b, d) + math.ceil(layers / k) * per_layer["checkpoint_input"] + rot \
        + gpt_neox_head_activation_bytes(s, b, d, cfg.padded_vocab_size(1), act_bytes=4)
    assert got == stage["activations"]["full"] - min(k, layers) * per_layer["none"] + stage["head_activations"]


def test_stage_assembly_under_pipeline_parallelism():
    cfg = _cfg(64, 4, 256, 32, layers=6, rotary=0.25, hidden_dropout=0.1)
    mem = memory_per_gpu(cfg, pp=2, micro_batch=2, grad_accum=4, precision="bf16", checkpoint_activations=True,
                         checkpoint_num_layers=2)
    assert mem["attention_kernel"] == "flash"
    layer = gpt_neox_layer_activation_bytes(32, 2, 64, 4, 256, act_bytes=2, hidden_dropout=True)
    rot = 2 * 2 * 32 * 4  # cos and sin [32, rotary_dim 4] in bf16
    emb = 8 * 32 * 2 + 32 * 2 * 64  # int64 ids and the 1-byte embedding dropout mask
    first, last = mem["stages"]
    assert (first["in_flight"], last["in_flight"]) == (2, 1)
    assert first["activations"]["none"] == first["activations"]["selective"] == 2 * (3 * layer + emb + rot)
    assert first["activations"]["full"] == 2 * (2 * 2 * 32 * 2 * 64 + emb + rot) + 2 * layer
    assert last["activations"]["none"] == 3 * layer + rot and first["head_activations"] == 0
    assert last["head_activations"] == (2 * 64 + 8) * 32 * 2 + 2 * 32 * 2 * 64 + 4 * cfg.padded_vocab_size(1) * 64


def test_sequence_parallelism_divides_a_layer_exactly():
    for kernel in ("flash", "math"):
        one = gpt_neox_layer_activation_bytes(2048, 4, 6144, 64, 24576, attention=kernel)
        for t in (2, 4, 8):
            sp = gpt_neox_layer_activation_bytes(2048, 4, 6144, 64, 24576, t, True, attention=kernel)
            assert sp == pytest.approx(one / t, rel=1e-12)


def _plan(*args: str) -> str:
    r = subprocess.run([sys.executable, str(ROOT / "tools/plan.py"), *args], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    return r.stdout


@pytest.mark.parametrize("overrides", [
    [],
    ["model_parallel_size=2", "sequence_parallel=true", "gpt_j_residual=false", "hidden_dropout=0.1"],
    ["--attention-kernel", "math", "attention_dropout=0.1", "checkpoint_activations=true"],
])
def test_cli_reports_gpt_neox_activations(overrides):
    config = "configs/pythia/70M.yml"
    info = json.loads(_plan("-c", config, *overrides, "--json"))
    kernel = overrides[1] if overrides[:1] == ["--attention-kernel"] else "flash"  # fp16 config: CUDA's fused kernel
    cfg = load_config([str(ROOT / config)], [o for o in overrides if "=" in o])
    m, p, mem = cfg.model, cfg.parallel, info["memory"]
    b, tp, sp = cfg.training.train_micro_batch_size_per_gpu, p.tp_size, p.sequence_parallel and p.tp_size > 1
    want = gpt_neox_layer_activation_bytes(
        m.seq_length, b, m.hidden_size, m.num_attention_heads, m.ffn_size, tp, sp, 2,
        parallel_residual=m.gpt_j_residual, hidden_dropout=m.hidden_dropout > 0,
        attention_dropout=m.attention_dropout > 0, attention=kernel)
    assert mem["attention_kernel"] == kernel and mem["layer_activations"]["none"] == pytest.approx(want)
    assert mem["layer_activations"]["korthikanti"] == pytest.approx(
        layer_activation_bytes(m.seq_length, b, m.hidden_size, m.num_attention_heads, m.ffn_size, tp, sp))
    for st in mem["stages"]:
        acts = st["activations"]
        assert acts["full"] < acts["selective"] == acts["none"]
        kind = "full" if p.checkpoint_activations else "none"
        assert st["total"] == pytest.approx(st["params"] + st["grads"] + st["optimizer_zero1"] + acts[kind]
                                            + st["head_activations"])
    assert mem["stages"][-1]["head_activations"] == pytest.approx(gpt_neox_head_activation_bytes(
        m.seq_length, b, m.hidden_size, m.padded_vocab_size(tp), tp, sp, 2))
    text = _plan("-c", config, *overrides)
    assert "GPT-NeoX tensors saved for backward" in text and f"SDPA kernel {kernel}" in text
    assert "Korthikanti et al. 2022 per layer" in text

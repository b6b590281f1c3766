"""The planner's analytic counts against independent references: published totals, transformers'
GPTNeoX, our own model's parameters (when neox.models is importable), a brute-force partition; memory
against per-tensor activation arithmetic worked by hand (what neox's GPT-NeoX saves for backward; the
measurement itself is tests/unit/test_plan_gpt_neox.py), the formulas of Korthikanti et al. 2022 (kept for
comparison) worked by hand, and the pipeline schedules megatron_ext runs."""

from __future__ import annotations

import dataclasses
import itertools
import json
import subprocess
import sys
from pathlib import Path

import pytest

from neox.config import (
    ModelConfig,
    count_parameters,
    flops_per_token,
    load_config,
    stage_layer_counts,
    stage_parameters,
)
from neox.config.plan import (
    gpt_neox_layer_activation_bytes,
    layer_activation_bytes,
    memory_per_gpu,
    microbatches_in_flight,
    model_state_bytes,
)

ROOT = Path(__file__).resolve().parents[2]

SMALL = [
    ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, seq_length=32, vocab_size=1000,
                rotary_pct=0.25, gpt_j_residual=True, no_weight_tying=True),
    ModelConfig(num_layers=3, hidden_size=48, num_attention_heads=6, seq_length=16, vocab_size=517,
                make_vocab_size_divisible_by=8, no_weight_tying=False),
    ModelConfig(num_layers=4, hidden_size=32, num_attention_heads=2, seq_length=8, vocab_size=300,
                intermediate_size=80, no_weight_tying=True),
]


def run_plan(*args):
    r = subprocess.run([sys.executable, str(ROOT / "tools/plan.py"), *args], capture_output=True, text=True,
                       cwd=ROOT)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_published_totals_from_the_cli():
    # GPT-NeoX-20B: 20,554,567,680 (the paper / HF model); Pythia-70M: 70,426,624 (HF model card).
    assert json.loads(run_plan("-c", "configs/20B.yml", "--json"))["parameters"] == 20_554_567_680
    info = json.loads(run_plan("-c", "configs/pythia/70M.yml", "--json", "--world-size", "32"))
    assert info["parameters"] == 70_426_624 and info["padded_vocab_size"] == 50304
    assert info["dp"] == 32 and info["global_batch"] == 1024
    text = run_plan("-c", "configs/20B.yml")
    assert "20,554,567,680" in text and "TP 2 x PP 4" in text


def test_json_per_gpu_layout_for_20b():
    info = json.loads(run_plan("-c", "configs/20B.yml", "--json"))
    assert info["tp"] == 2 and info["pp"] == 4 and info["layers_per_stage"] == [11, 11, 11, 11]
    per = info["parameters_per_gpu"]
    assert per["max"] == max(per["per_stage"]) == per["last"]
    # summed over the 8 GPUs, every TP-split tensor counts once and replicated ones tp times
    d, f, v = 6144, 24576, 50432
    replicated_per_layer = 4 * d + 2 * d  # two norms + dense and 4h_to_h biases
    total_8 = 2 * sum(per["per_stage"])
    assert total_8 - 44 * replicated_per_layer - 2 * d == info["parameters"]
    assert info["flops_per_token"]["hardware"] > info["flops_per_token"]["model"]  # checkpointing on
    assert f == 4 * d and v == info["padded_vocab_size"]


def _hf_count(m: ModelConfig, tp: int = 1) -> int:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    hf_cfg = transformers.GPTNeoXConfig(
        vocab_size=m.padded_vocab_size(tp), hidden_size=m.hidden_size, num_hidden_layers=m.num_layers,
        num_attention_heads=m.num_attention_heads, intermediate_size=m.ffn_size,
        max_position_embeddings=m.max_position_embeddings, tie_word_embeddings=not m.no_weight_tying,
        use_parallel_residual=m.gpt_j_residual)
    with torch.device("meta"):
        model = transformers.GPTNeoXForCausalLM(hf_cfg)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("m", SMALL, ids=range(len(SMALL)))
def test_count_matches_transformers(m):
    assert count_parameters(m) == _hf_count(m)


@pytest.mark.parametrize("name", ["70M", "160M", "1B"])
def test_pythia_count_matches_transformers(name):
    cfg = load_config([str(ROOT / f"configs/pythia/{name}.yml")])
    assert count_parameters(cfg.model, cfg.parallel.tp_size) == _hf_count(cfg.model, cfg.parallel.tp_size)


def _neox_model():
    pytest.importorskip("torch")
    try:
        from megatron_ext.topology import ParallelState
        from neox.models.gpt_neox import GPTNeoX
    except ImportError as e:  # written concurrently by another helper
        pytest.skip(f"neox.models.gpt_neox not importable yet ({e}); rerun when it lands")
    return GPTNeoX, ParallelState


@pytest.mark.parametrize("m", SMALL, ids=range(len(SMALL)))
def test_count_matches_neox_model(m):
    GPTNeoX, ParallelState = _neox_model()
    model = GPTNeoX(m, ParallelState.single())
    assert count_parameters(m) == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("m", SMALL[:2], ids=range(2))
@pytest.mark.parametrize("tp, pp", [(1, 2), (2, 1), (2, 3)])
def test_stage_parameters_match_neox_model(m, tp, pp):
    """Per-GPU counts equal the parameters of the stage our model builds on TP rank 0."""
    GPTNeoX, ParallelState = _neox_model()
    m = dataclasses.replace(m, num_layers=6)
    counts = stage_layer_counts(m, pp, "uniform", tp)
    starts = [sum(counts[:s]) for s in range(pp)]
    expected = []
    for s in range(pp):
        ps = ParallelState(tp_size=tp, pp_size=pp, pp_rank=s, world_size=tp * pp, rank=s * tp)
        stage = GPTNeoX(m, ps, pre_process=s == 0, post_process=s == pp - 1,
                        layer_range=(starts[s], starts[s] + counts[s]))
        expected.append(sum(p.numel() for p in stage.parameters()))
    assert stage_parameters(m, tp, pp, "uniform") == expected


def test_parameters_partition_is_optimal():
    """'parameters' partition: no contiguous split has a smaller largest stage (brute force)."""
    m = ModelConfig(num_layers=7, hidden_size=64, num_attention_heads=4, seq_length=32, vocab_size=8000,
                    no_weight_tying=True)
    for pp in (2, 3, 4):
        got = stage_parameters(m, 1, pp, "parameters")
        best = None
        for cuts in itertools.combinations(range(1, 7), pp - 1):
            bounds = (0, *cuts, 7)
            sizes = [bounds[i + 1] - bounds[i] for i in range(pp)]
            worst = max(count_stage(m, sizes, s) for s in range(pp))
            best = worst if best is None else min(best, worst)
        assert max(got) == best and sum(stage_layer_counts(m, pp, "parameters")) == 7


def count_stage(m, sizes, s):
    d, f, v = m.hidden_size, m.ffn_size, m.padded_vocab_size(1)
    layer = 4 * d * d + 2 * d * f + 9 * d + f
    return sizes[s] * layer + (v * d if s == 0 else 0) + (v * d + 2 * d if s == len(sizes) - 1 else 0)


def test_flops_match_megatron_formula():
    """With F = 4D our per-term count equals 72 L D^2 (1 + s/(6D) + V/(12 L D)) per token."""
    cfg = load_config([str(ROOT / "configs/20B.yml")])
    m, tp = cfg.model, cfg.parallel.tp_size
    L, D, s, V = m.num_layers, m.hidden_size, m.seq_length, m.padded_vocab_size(tp)
    megatron = 72 * L * D**2 * (1 + s / (6 * D) + V / (12 * L * D))
    f = flops_per_token(m, tp, checkpoint_activations=True)
    assert f["model"] == pytest.approx(megatron, rel=1e-12)
    layers_forward = 24 * L * D**2 * (1 + s / (6 * D))
    assert f["hardware"] == pytest.approx(megatron + layers_forward, rel=1e-12)
    assert flops_per_token(m, tp)["hardware"] == f["model"]
    # the familiar 6N approximation is within a few percent for a 20B model at s = 2048
    assert f["model"] == pytest.approx(6 * count_parameters(m, tp), rel=0.08)


# ------------------------------------------------------------------------------------------------ memory

# A small GPT-NeoX: s = 32, b = 2, h = 64, a = 4, L = 4, F = 4h, vocab 1000 (padded to 1024 at TP 2),
# sequential residual, rotary on all 16 dims of each head.
MEM = ModelConfig(num_layers=4, hidden_size=64, num_attention_heads=4, seq_length=32, vocab_size=1000,
                  no_weight_tying=True)
SBH = 32 * 2 * 64  # 4096
# One layer at TP 2, fp16 (e = 2), fused SDPA kernel, per tensor neox saves (sbh units of bytes):
#   replicated: input_norm input, its output, x + attn, post_attention_norm output   4 x 2      = 8
#   split over TP: dense input 2/2, h->4h output and GeLU output 2 x 2 x 4/2           1 + 8    = 9
#   attention: rotated q, k, the copy of v, SDPA output                      4 x 2/2          = 4
#   plus fp32 LayerNorm mean/rstd 4 x 4 x sb = 1024 and the fp32 logsumexp 4 x b x a/t x s = 512
LAYER_TP2 = 21 * SBH + 1024 + 512
ROTARY = 2 * 2 * 32 * 16  # cos and sin [s, 16] in fp16, per stage and micro-batch
EMBED_TP2 = 8 * 32 * 2 + 32 * 2  # int64 shard-local ids + the bool out-of-shard mask


def test_layer_activations_by_hand():
    """Korthikanti et al. 2022 eqs. (1)-(5) written out with numbers: s=32, b=2, h=64, a=4, t=2."""
    sbh = 32 * 2 * 64  # 4096
    attn = 5 * 4 * 32 / 64  # 5as/h = 10
    assert sbh == 4096 and attn == 10
    # no parallelism: sbh(34 + 5as/h) = 4096 * 44
    assert layer_activation_bytes(32, 2, 64, 4) == 180_224
    # TP 2: sbh(10 + 24/t + 5as/(ht)) = 4096 * (10 + 12 + 5) = 4096 * 27
    assert layer_activation_bytes(32, 2, 64, 4, tp=2) == 110_592
    # TP 2 + SP: sbh/t (34 + 5as/h) = 2048 * 44
    assert layer_activation_bytes(32, 2, 64, 4, tp=2, sequence_parallel=True) == 90_112
    # selective recompute drops 5as/h: TP 2 -> 4096 * 22; TP 2 + SP -> 2048 * 34; no TP -> 4096 * 34
    assert layer_activation_bytes(32, 2, 64, 4, tp=2, selective=True) == 90_112
    assert layer_activation_bytes(32, 2, 64, 4, tp=2, sequence_parallel=True, selective=True) == 69_632
    assert layer_activation_bytes(32, 2, 64, 4, selective=True) == 139_264
    # fp32 activations (e = 4) from the paper's per-tensor list: 2-byte tensors double, 1-byte masks
    # stay: 34 sbh = 32 (16 two-byte tensors' worth) + 2 (masks) -> 64 + 2 = 66; 5as^2b = 4 + 1 -> 8 + 1 = 9
    assert layer_activation_bytes(32, 2, 64, 4, act_bytes=4) == 4096 * 66 + 4 * 32 * 32 * 2 * 9


def test_stage_memory_by_hand():
    """TP 2, PP 2 (2 layers a stage), micro-batch 2, 8 micro-batches, fp16, DP 4, ZeRO-1."""
    common = dict(tp=2, pp=2, dp=4, micro_batch=2, grad_accum=8, precision="fp16", zero_stage=1)
    mem = memory_per_gpu(MEM, **common)
    assert mem["attention_kernel"] == "flash"  # what CUDA runs for fp16
    assert mem["layer_activations"]["none"] == LAYER_TP2 == gpt_neox_layer_activation_bytes(32, 2, 64, 4, 256, 2)
    assert mem["layer_activations"]["korthikanti"] == 4096 * 27  # the paper's, for comparison only
    first, last = mem["stages"]
    per_layer = LAYER_TP2
    assert first["in_flight"] == 2 and last["in_flight"] == 1  # 1F1B: stage r holds p - r micro-batches
    # 2 micro-batches x (2 layers + the embedding's ids + the stage's rotary tables)
    assert first["activations"]["none"] == 2 * (2 * per_layer + EMBED_TP2 + ROTARY)
    assert first["activations"]["selective"] == first["activations"]["none"]  # neox has no selective recompute
    # full checkpointing: 2sbh per layer and micro-batch (+ ids and tables, outside the chunks), plus one
    # layer's working set in recompute
    assert first["activations"]["full"] == 2 * (2 * (2 * 4096) + EMBED_TP2 + ROTARY) + per_layer
    assert last["activations"]["full"] == 1 * (2 * (2 * 4096) + ROTARY) + per_layer
    # output head on the last stage (fused, no logits): final-norm input 2sbh + fp32 mean/rstd 8sb, the
    # head's d/dh 2sbh, its fp32 d/dW over the vocab shard 4 * Vpad/t * h
    head = 2 * 4096 + 8 * 32 * 2 + 2 * 4096 + 4 * 1024 // 2 * 64
    assert first["head_activations"] == 0
    assert last["head_activations"] == head
    # model states: 2 B params + 2 B grads + 12 B (fp32 master, Adam m, v) / DP 4 with ZeRO-1
    n = stage_parameters(MEM, 2, 2)[0]
    assert first["parameters"] == n
    assert (first["params"], first["grads"], first["optimizer"]) == (2 * n, 2 * n, 12 * n / 4)
    assert first["total"] == 2 * n + 2 * n + 3 * n + 2 * (2 * per_layer + EMBED_TP2 + ROTARY)  # no ckpt by default
    ckpt = memory_per_gpu(MEM, **common, checkpoint_activations=True)["stages"][1]
    n_last = stage_parameters(MEM, 2, 2)[1]
    assert ckpt["total"] == 2 * n_last + 2 * n_last + 3 * n_last + (2 * (2 * 4096) + ROTARY + per_layer) + head


def test_interleaved_first_stage_factor():
    """Interleaved 1F1B: first stage = p micro-batches x L/p layers x (1 + (p-1)/(pv)) (paper eq. 6), i.e.
    pv + p - 1 model chunks in flight, each with its rotary tables (and, overestimated, the embedding's ids)."""
    m = dataclasses.replace(MEM, num_layers=8)
    for p, v in [(2, 2), (2, 4), (4, 2)]:
        got = memory_per_gpu(m, tp=2, pp=p, virtual=v, micro_batch=2, grad_accum=4 * p)
        assert got["stages"][0]["activations"]["none"] == pytest.approx(
            p * (8 / p) * LAYER_TP2 * (1 + (p - 1) / (p * v)) + (p * v + p - 1) * (EMBED_TP2 + ROTARY), rel=1e-12)


def _peak_in_flight(order) -> int:
    live = peak = 0
    for op in order:
        live += 1 if type(op).__name__ == "Forward" else -1
        peak = max(peak, live)
    return peak


@pytest.mark.parametrize("pp", [2, 3, 4])
@pytest.mark.parametrize("v", [1, 2, 3])
def test_in_flight_matches_pipeline_schedules(pp, v):
    """The planner's micro-batch (chunk) count equals the peak of un-backpropagated forwards in the
    schedules megatron_ext actually runs."""
    pytest.importorskip("torch")
    from megatron_ext.pipeline.schedules import one_f_one_b_order

    for gas in ([1, 2, pp, pp + 1, 3 * pp] if v == 1 else [pp, 2 * pp, 3 * pp]):
        for r in range(pp):
            assert microbatches_in_flight(pp, r, gas, v) == _peak_in_flight(one_f_one_b_order(pp, r, gas, v)), \
                (pp, v, gas, r)


def test_memory_relations():
    cfg = load_config([str(ROOT / "configs/20B.yml")])
    m = cfg.model
    base = dict(tp=2, pp=4, micro_batch=4, grad_accum=32, precision="fp16")
    # sequence parallelism divides each layer's activations by t (exactly, for every t), in the paper's
    # formula and in neox's
    for t in (2, 4, 8):
        assert layer_activation_bytes(2048, 4, 6144, 64, tp=t, sequence_parallel=True) == pytest.approx(
            layer_activation_bytes(2048, 4, 6144, 64) / t, rel=1e-12)
        assert gpt_neox_layer_activation_bytes(2048, 4, 6144, 64, 24576, t, True) == pytest.approx(
            gpt_neox_layer_activation_bytes(2048, 4, 6144, 64, 24576) / t, rel=1e-12)
    # full checkpointing stores far less than no recompute; neox has no selective recompute
    acts = memory_per_gpu(m, **base)["stages"][0]["activations"]
    assert acts["full"] < acts["none"] / 5 and acts["selective"] == acts["none"]
    # neox's fused attention keeps no s x s scores: well under the paper's layer, which keeps them
    per_layer = memory_per_gpu(m, **base)["layer_activations"]
    assert per_layer["none"] < per_layer["korthikanti"] / 3
    # ZeRO-1 optimizer bytes are the unsharded ones over DP; params and grads do not shrink
    for dp in (1, 3, 12):
        zero = memory_per_gpu(m, **base, dp=dp, zero_stage=1)["stages"][0]
        plain = memory_per_gpu(m, **base, dp=dp, zero_stage=0)["stages"][0]
        assert zero["optimizer"] == pytest.approx(plain["optimizer"] / dp, rel=1e-12)
        assert (zero["params"], zero["grads"]) == (plain["params"], plain["grads"])
    # bytes per parameter: mixed precision 2 + 2 + 12; fp32 4 + 4 + 12 (neox keeps an fp32 master too)
    assert model_state_bytes(10, "bf16")["bytes_per_param"] == {"params": 2, "grads": 2, "optimizer": 12}
    assert model_state_bytes(10, "fp32")["bytes_per_param"] == {"params": 4, "grads": 4, "optimizer": 12}
    assert model_state_bytes(10, "fp16", optimizer="SGD")["bytes_per_param"]["optimizer"] == 4


def test_20b_fits_on_96_a100_40gb():
    text = run_plan("-c", "configs/20B.yml", "--world-size", "96", "--gpu-mem", "40")
    assert "FITS in 40 GiB" in text and "DP 12, ZeRO-1" in text
    info = json.loads(run_plan("-c", "configs/20B.yml", "--world-size", "96", "--gpu-mem", "40", "--json"))
    mem = info["memory"]
    assert mem["fits"] is True and mem["dp"] == 12 and mem["checkpoint_activations"]
    assert mem["max_total"] <= 40 * 2**30 * 0.9 == mem["usable_bytes"]
    # --dp 12 is the same plan as --world-size 96
    assert json.loads(run_plan("-c", "configs/20B.yml", "--dp", "12", "--gpu-mem", "40", "--json"))["memory"] == mem


def test_20b_without_model_parallelism_does_not_fit():
    args = ("-c", "configs/20B.yml", "model_parallel_size=1", "pipe_parallel_size=1", "--world-size", "96",
            "--gpu-mem", "40")
    assert "does NOT fit in 40 GiB" in run_plan(*args)
    mem = json.loads(run_plan(*args, "--json"))["memory"]
    # 20.55B params x (2 + 2) bytes alone exceed 40 GiB
    assert mem["fits"] is False and mem["stages"][0]["params"] + mem["stages"][0]["grads"] > 40 * 2**30


def test_dp_defaults_to_the_configs_gpu_count(tmp_path):
    cluster = tmp_path / "cluster.yml"
    cluster.write_text("{num-gpus: 8, num_nodes: 12}\n")
    info = json.loads(run_plan("-c", "configs/20B.yml", str(cluster), "--json"))
    assert info["world_size"] == 96 and info["memory"]["dp"] == 12
    assert json.loads(run_plan("-c", "configs/20B.yml", "--json"))["memory"]["dp"] == 1  # nothing given

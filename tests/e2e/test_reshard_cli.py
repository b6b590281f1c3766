"""tools/reshard.py and the converters on checkpoints of any layout, run as a user runs them.

References: the engine's own distributed forward (TP2 x PP2, gathered logits) before anything is
written; transformers' GPTNeoXForCausalLM; the safetensors library reading our streamed files.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from megatron_ext.testing import run_distributed
from megatron_ext.topology import ParallelState
from neox.checkpoint.io import CheckpointError, load_model_checkpoint, save_model_checkpoint
from neox.checkpoint.training_state import load_checkpoint
from neox.config import NeoXConfig
from neox.models.gpt_neox import partition_dim
from neox.models.registry import build_model
from neox.training.engine import Engine, pipeline_layout
from tests.distributed.test_equivalence import VOCAB, SyntheticSamples
from tests.distributed.test_equivalence import _cfg as _base_cfg

transformers = pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parents[2]
IDS = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(5))


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))


@torch.no_grad()
def pipeline_logits(chunk, ps, ids: torch.Tensor, real_vocab: int) -> torch.Tensor | None:
    """Forward ``ids`` through this rank's stage (one chunk per rank), handing hidden states to the
    next stage; the last stage gathers its TP logit shards. Returns [B, T, V] there, else None."""
    step = ps.dp_size * ps.tp_size  # rank distance between neighbouring pipeline stages
    if ps.pp_rank == 0:
        x = ids
    else:
        x = torch.empty(*ids.shape, chunk.cfg.hidden_size)
        dist.recv(x, src=ps.rank - step)
    out = chunk.eval()(x)
    if ps.pp_rank < ps.pp_size - 1:
        dist.send(out.contiguous(), dst=ps.rank + step)
        return None
    parts = [torch.empty_like(out) for _ in range(ps.tp_size)]
    dist.all_gather(parts, out.contiguous(), group=ps.tp_group)
    return torch.cat(parts, dim=-1)[..., :real_vocab]


def _engine_cfg(**kw) -> NeoXConfig:
    base = dict(num_layers=4, model_parallel_size=2, pipe_parallel_size=2, train_iters=2,
                train_micro_batch_size_per_gpu=2, gradient_accumulation_steps=2)
    base.update(kw)
    return _base_cfg(**base)


def _train_one_step_and_save(cfg_dict: dict, run_dir: str):
    """Train one step in the config's layout, save, and return the engine's logits for IDS."""
    from neox.data.gpt_dataset import make_batch_iterator

    cfg = NeoXConfig.from_dict(cfg_dict)
    ps = ParallelState.from_sizes(tp=cfg.parallel.tp_size, pp=cfg.parallel.pp_size)
    torch.manual_seed(cfg.training.seed)
    engine = Engine(cfg, ps, init_seed=cfg.training.seed)
    it = make_batch_iterator(SyntheticSamples(32), 2, dp_rank=ps.dp_rank, dp_size=ps.dp_size)
    engine.train_batch([next(it) for _ in range(cfg.training.gradient_accumulation_steps)])
    from neox.checkpoint.training_state import save_checkpoint

    save_checkpoint(run_dir, 1, model=list(engine.chunks), optimizer=engine.optimizer, config=cfg, ps=ps,
                    trainer_state={"consumed_samples": 8})
    return pipeline_logits(engine.chunks[0], ps, IDS, VOCAB) if ps.pp_size > 1 or ps.tp_size > 1 else None


@pytest.fixture(scope="module")
def tp2_pp2_run(tmp_path_factory):
    """(run dir, engine logits [2, 12, VOCAB]) of an untied model trained one step in TP2 x PP2."""
    run = tmp_path_factory.mktemp("tp2pp2") / "run"
    res = run_distributed(_train_one_step_and_save, 4, _engine_cfg().to_dict(), str(run), timeout=120)
    logits = next(r for r in res if r is not None)
    return run, logits


# ------------------------------------------------------------------------------- wrong layout
def _single_model(cfg: NeoXConfig):
    return build_model(cfg.model, ParallelState.single(), init_seed=0)


def test_loading_another_layout_names_the_command_that_fixes_it(tp2_pp2_run, tmp_path):
    run, want = tp2_pp2_run
    cfg, _ = load_model_checkpoint(run)
    model = _single_model(cfg)
    with pytest.raises(CheckpointError, match=r"tp=2 pp=2.*tp=1 pp=1") as err:
        load_checkpoint(run, model=model, ps=ParallelState.single())
    cmd = re.search(r"python (tools/reshard\.py .*)$", str(err.value)).group(1)
    args = shlex.split(cmd)
    out = Path(args[args.index("--output") + 1])
    r = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT, env=_env(), timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    opt = torch.optim.AdamW(model.parameters())
    state = load_checkpoint(out, model=model, optimizer=opt, ps=ParallelState.single())
    assert state["iteration"] == 1 and state["consumed_samples"] == 8
    assert all(len(s) > 0 for s in opt.state.values()) and len(opt.state) == len(list(model.parameters()))
    with torch.no_grad():
        got = model.eval()(IDS)[..., :VOCAB]
    assert (got - want).abs().max().item() <= 1e-4


def _train_zero_dp2(cfg_dict: dict, run_dir: str):
    _train_one_step_and_save(cfg_dict, run_dir)


def test_zero_state_of_another_dp_size_is_refused_with_the_dp_command(tmp_path):
    run = tmp_path / "zero_dp2"
    cfg = _engine_cfg(model_parallel_size=1, pipe_parallel_size=1, zero_stage=1, gradient_accumulation_steps=1)
    run_distributed(_train_zero_dp2, 2, cfg.to_dict(), str(run), timeout=120)
    single = NeoXConfig.from_dict({**cfg.to_dict(), "gradient_accumulation_steps": 2})
    engine = Engine(single, ParallelState.single(), init_seed=0)
    with pytest.raises(CheckpointError, match=r"data-parallel size 2 \(this run: 1\)") as err:
        load_checkpoint(run, model=list(engine.chunks), optimizer=engine.optimizer, ps=ParallelState.single())
    assert "--tp 1 --pp 1 --dp 1" in str(err.value)
    out = tmp_path / "zero_dp1"
    assert _tool("reshard").main(["--input", str(run), "--output", str(out), "--tp", "1", "--pp", "1",
                                  "--dp", "1"]) == 0
    load_checkpoint(out, model=list(engine.chunks), optimizer=engine.optimizer, ps=ParallelState.single())
    # the ZeRO-1 masters and moments of both DP ranks became the single optimizer's full state
    meta = json.loads((out / "global_step1" / "extra" / "optim_universal.json").read_text())
    assert set(meta["keys"]["layers.0.mlp.dense_h_to_4h.weight"]) == {"master", "exp_avg", "exp_avg_sq"}
    name = "layers.0.mlp.dense_h_to_4h.weight"
    p = dict(engine.chunks[0].named_parameters())[name]
    assert torch.equal(engine.optimizer.optimizer.state[p]["exp_avg"], _optim_tensor(out, name, "exp_avg"))
    # universal state reshards again: through TP 2 (re-sliced, vocab re-padded 256 -> 256) and back, bit-equal
    assert _tool("reshard").main(["--input", str(out), "--output", str(tmp_path / "tp2"), "--tp", "2",
                                  "--pp", "1"]) == 0
    assert _tool("reshard").main(["--input", str(tmp_path / "tp2"), "--output", str(tmp_path / "back"),
                                  "--tp", "1", "--pp", "1"]) == 0
    for key in ("master", "exp_avg", "exp_avg_sq"):
        for n in ("embed.weight", name, "layers.1.attention.dense.weight", "final_norm.bias"):
            assert torch.equal(_optim_tensor(tmp_path / "back", n, key), _optim_tensor(out, n, key)), (n, key)


def _optim_tensor(run: Path, name: str, key: str) -> torch.Tensor:
    from safetensors.torch import load_file

    return load_file(str(run / "global_step1" / "extra" / "optim_tp00_pp00.safetensors"))[f"{name}.{key}"]


# ------------------------------------------------------------------------------- conversions
def test_neox_load_and_hf_conversion_of_a_tp2_pp2_checkpoint(tp2_pp2_run, tmp_path):
    import neox

    run, want = tp2_pp2_run
    with torch.no_grad():
        got = neox.load(run)(IDS)
    assert got.shape == want.shape and (got - want).abs().max().item() <= 1e-4
    out = tmp_path / "hf"
    r = subprocess.run([sys.executable, "tools/convert_neox_to_hf.py", "--input", str(run), "--output", str(out)],
                       capture_output=True, text=True, cwd=ROOT, env=_env(), timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    hf = transformers.GPTNeoXForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    with torch.no_grad():
        logits = hf(IDS).logits
    assert (logits - want).abs().max().item() <= 1e-4


def _load_converted_and_forward(run_dir: str):
    from neox.checkpoint.io import read_manifest, resolve_step_dir

    cfg = NeoXConfig.from_dict(read_manifest(resolve_step_dir(run_dir))["config"])
    ps = ParallelState.from_sizes(tp=cfg.parallel.tp_size, pp=cfg.parallel.pp_size)
    (layer_range,) = pipeline_layout(cfg, ps)
    chunk = build_model(cfg.model, ps, pre_process=ps.is_first_stage, post_process=ps.is_last_stage,
                        layer_range=layer_range, init_seed=99)
    load_checkpoint(run_dir, model=[chunk], ps=ps, load_rng=False)
    return pipeline_logits(chunk, ps, IDS, cfg.model.vocab_size)


def test_hf_to_neox_in_a_chosen_layout_loads_directly_in_it(tmp_path):
    config = transformers.GPTNeoXConfig(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=128,
        max_position_embeddings=64, rotary_pct=0.25, use_parallel_residual=True, tie_word_embeddings=False,
        attn_implementation="eager")
    torch.manual_seed(3)
    hf = transformers.GPTNeoXForCausalLM(config).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.02 * torch.randn_like(p))
        want = hf(IDS).logits
    hf.save_pretrained(tmp_path / "hf")
    run = tmp_path / "run"
    assert _tool("convert_hf_to_neox").main(["--input", str(tmp_path / "hf"), "--output", str(run),
                                              "--tp", "2", "--pp", "2"]) == 0
    manifest = json.loads((run / "global_step0" / "manifest.json").read_text())
    assert manifest["layout"] == {"tp": 2, "pp": 2, "dp": 1}
    assert manifest["tensors"]["embed.weight"]["shape"] == [256, 64]  # 200 padded to a multiple of 128 * 2
    res = run_distributed(_load_converted_and_forward, 4, str(run), timeout=120)
    got = next(r for r in res if r is not None)
    assert (got - want).abs().max().item() <= 1e-4


# ------------------------------------------------------------------------------- streaming
_MEASURE = """
import re, runpy, sys

def kb(field):
    return int(re.search(field + r":\\s+(\\d+)", open("/proc/self/status").read()).group(1))

mode, args = sys.argv[1], sys.argv[2:]
tool = runpy.run_path("tools/reshard.py")  # imports done before measuring
from neox.checkpoint.io import load_model_checkpoint
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak resident set size (VmHWM) to the current one
start = kb("VmRSS")
if mode == "reshard":
    assert tool["main"](args) == 0
else:  # the whole model in memory: what a non-streaming reshard would hold
    sd = load_model_checkpoint(args[1])[1]
    touched = [float(t.sum()) for t in sd.values()]  # safetensors may map lazily: read every byte
print("PEAK_MB", (kb("VmHWM") - start) / 1024)
"""


def _peak_growth_mb(mode: str, *args: str) -> float:
    """How far the resident set grows above where it was when the work started (MB), in a fresh process."""
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux /proc/self/clear_refs to measure peak memory")
    r = subprocess.run([sys.executable, "-c", _MEASURE, mode, *map(str, args)], capture_output=True, text=True,
                       cwd=ROOT, env=_env(), timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return float(re.search(r"PEAK_MB ([\d.]+)", r.stdout).group(1))


def _synthetic_checkpoint(run: Path, hidden: int, layers: int) -> dict[str, torch.Tensor]:
    cfg = NeoXConfig.from_dict(dict(num_layers=layers, hidden_size=hidden, num_attention_heads=8, seq_length=16,
                                    vocab_size=1000, no_weight_tying=True))
    from neox.checkpoint.hf_gpt_neox import neox_param_names

    g = torch.Generator().manual_seed(0)
    shapes = {"embed.weight": (1024, hidden), "lm_head.weight": (1024, hidden)}
    sd = {}
    for name in neox_param_names(cfg.model):
        sub = name.split(".", 2)[-1]
        shape = shapes.get(name) or {
            "attention.query_key_value.weight": (3 * hidden, hidden), "attention.query_key_value.bias": (3 * hidden,),
            "attention.dense.weight": (hidden, hidden), "mlp.dense_h_to_4h.weight": (4 * hidden, hidden),
            "mlp.dense_h_to_4h.bias": (4 * hidden,), "mlp.dense_4h_to_h.weight": (hidden, 4 * hidden),
        }.get(sub, (hidden,))
        sd[name] = torch.randn(shape, generator=g)
    save_model_checkpoint(run, sd, cfg, iteration=4, partition_dims={k: partition_dim(k) for k in sd})
    return sd


def test_reshard_streams_tensor_by_tensor(tmp_path):
    """Peak memory grows with the largest tensor, not with the model: resharding a ~200 MB model
    (largest tensor 16 MB, output shards ~50 MB) stays far below the model's size, while holding the
    model (the control, so the measurement can fail) costs all of it."""
    big = tmp_path / "big"
    sd = _synthetic_checkpoint(big, hidden=1024, layers=4)
    model_mb = sum(t.numel() * 4 for t in sd.values()) / 2**20
    largest_mb = max(t.numel() * 4 for t in sd.values()) / 2**20
    peak = _peak_growth_mb("reshard", "--input", big, "--output", tmp_path / "big_out", "--tp", "2", "--pp", "2")
    held = _peak_growth_mb("load", "--input", big)
    print(f"\n[reshard] model {model_mb:.0f} MB, largest tensor {largest_mb:.0f} MB: peak growth {peak:.0f} MB "
          f"while resharding, {held:.0f} MB holding the model")
    assert held > 0.9 * model_mb
    assert peak < 5 * largest_mb < model_mb / 2
    cfg, got = load_model_checkpoint(tmp_path / "big_out")  # the safetensors library reads our streamed files
    assert cfg.parallel.tp_size == 2 and cfg.parallel.pp_size == 2
    for name, t in sd.items():
        want = t[:1000] if name in ("embed.weight", "lm_head.weight") else t
        assert torch.equal(got[name][: len(want)], want), name

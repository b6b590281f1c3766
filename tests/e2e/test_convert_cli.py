"""tools/convert_hf_to_neox.py and tools/convert_neox_to_hf.py, run as a user runs them.

HF dir -> neox run dir -> HF dir must give back every tensor bit for bit and the same config.json
fields, load with `from_pretrained`, and `neox.load` of the run dir must match transformers' logits.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[2]


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def make_hf_dir(path: Path, *, tied: bool, vocab: int, shared_tokenizer: Path | None = None):
    config = transformers.GPTNeoXConfig(
        vocab_size=vocab, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        max_position_embeddings=64, rotary_pct=0.25, use_parallel_residual=not tied,
        tie_word_embeddings=tied, bos_token_id=1, eos_token_id=1, attn_implementation="eager",
    )
    torch.manual_seed(3)
    model = transformers.GPTNeoXForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    model.save_pretrained(path)
    if shared_tokenizer is not None:
        (path / "tokenizer.json").write_bytes(shared_tokenizer.read_bytes())
    return model


def _compare(hf_src, out_dir: Path):
    back = transformers.GPTNeoXForCausalLM.from_pretrained(out_dir, attn_implementation="eager").eval()
    ref, got = hf_src.state_dict(), back.state_dict()
    assert set(ref) == set(got)
    for k in ref:
        assert torch.equal(ref[k], got[k]), k
    src_cfg = hf_src.config.to_dict()
    new_cfg = back.config.to_dict()
    for k in set(src_cfg) | set(new_cfg):
        if k not in ("transformers_version", "_name_or_path", "dtype"):
            assert src_cfg.get(k) == new_cfg.get(k), k
    return back


def test_cli_round_trip_subprocess(tmp_path, shared_data):
    hf_dir, run_dir, out_dir = tmp_path / "hf", tmp_path / "run", tmp_path / "hf_back"
    src = make_hf_dir(hf_dir, tied=True, vocab=517, shared_tokenizer=shared_data / "gpt2_tokenizer.json")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    for tool, a, b in (("convert_hf_to_neox", hf_dir, run_dir), ("convert_neox_to_hf", run_dir, out_dir)):
        cmd = [sys.executable, str(ROOT / "tools" / f"{tool}.py"), "--input", str(a), "--output", str(b)]
        r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=120, env=env)
        assert r.returncode == 0, r.stderr[-3000:]
    manifest = json.loads((run_dir / "global_step0" / "manifest.json").read_text())
    assert manifest["tensors"]["embed.weight"]["shape"] == [640, 64]  # 517 padded to a multiple of 128
    assert manifest["tensors"]["embed.weight"]["partition_dim"] == 0
    assert (run_dir / "tokenizer.json").is_file() and (out_dir / "tokenizer.json").is_file()
    _compare(src, out_dir)


def test_cli_round_trip_in_process_untied_step_dir(tmp_path):
    import neox

    hf_dir, run_dir, out_dir = tmp_path / "hf", tmp_path / "run", tmp_path / "hf_back"
    src = make_hf_dir(hf_dir, tied=False, vocab=1000)
    assert _tool("convert_hf_to_neox").main(["--input", str(hf_dir), "--output", str(run_dir),
                                              "--iteration", "5"]) == 0
    assert _tool("convert_neox_to_hf").main(["--input", str(run_dir / "global_step5"),
                                              "--output", str(out_dir)]) == 0
    back = _compare(src, out_dir)
    ids = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = src(ids).logits
        assert torch.equal(back(ids).logits, ref)
        got = neox.load(run_dir)(ids)
    assert got.shape == ref.shape
    assert (got - ref).abs().max().item() <= 1e-4


def test_sharded_hf_save_loads(tmp_path):
    from neox.checkpoint.hf_gpt_neox import load_hf_state_dict, save_hf_checkpoint

    src = make_hf_dir(tmp_path / "hf", tied=False, vocab=300)
    save_hf_checkpoint(tmp_path / "sharded", src.state_dict(), src.config, max_shard_bytes=60_000)
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "sharded").glob("model-*-of-*.safetensors"))) > 1
    sd = load_hf_state_dict(tmp_path / "sharded")
    assert all(torch.equal(sd[k], v) for k, v in src.state_dict().items())
    _compare(src, tmp_path / "sharded")

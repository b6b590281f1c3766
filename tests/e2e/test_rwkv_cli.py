"""tools/convert_rwkv.py and tools/generate.py on RWKV as a user runs them.

A random HF RwkvForCausalLM with the GPT-2 tokenizer goes HF -> neox (tp 2, pp 2) -> HF and
neox -> BlinkDL .pth -> neox -> .pth, bit-identically; neox.load reads both the run dir and the HF dir
(logits == transformers'); generate.py's RNN-mode greedy text equals transformers' greedy generate (one
process and torchrun TP 2), and --save-state / --load-state continue exactly.
"""

import importlib.util
import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

import neox  # noqa: E402
from neox.checkpoint.hf_gpt_neox import load_hf_state_dict  # noqa: E402
from neox.data.tokenizers import build_tokenizer  # noqa: E402
from tests.conftest import SHARED_DATA  # noqa: E402
from tests.e2e.test_generate_cli import clean_env  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
PROMPTS = ["Hello world, this is", "The", "def main(args): return"]
N = 10
RULE = "-" * 40


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    if not (SHARED_DATA / "gpt2_tokenizer.json").is_file():
        pytest.skip(f"public test data not found at {SHARED_DATA} (set NEOX_SHARED_DATA)")
    tok_file = SHARED_DATA / "gpt2_tokenizer.json"
    tok = build_tokenizer("HFTokenizer", str(tok_file))
    tmp = tmp_path_factory.mktemp("rwkv_cli")
    torch.manual_seed(3)
    hf = transformers.RwkvForCausalLM(transformers.RwkvConfig(
        vocab_size=tok.vocab_size, hidden_size=64, num_hidden_layers=2, context_length=128,
        bos_token_id=tok.eod, eos_token_id=tok.eod)).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "time_decay" in name:
                p.uniform_(-3, 1)
            elif "time_mix" in name:
                p.uniform_(0, 1)
            elif "ln" not in name:
                p.copy_(torch.randn_like(p) * 2 / p.shape[-1] ** 0.5)
    hf_dir = tmp / "hf"
    hf.save_pretrained(hf_dir)
    (hf_dir / "tokenizer.json").write_bytes(tok_file.read_bytes())
    run_dir = tmp / "run"
    assert _tool("convert_rwkv").main(["--input", str(hf_dir), "--output", str(run_dir), "--to", "neox",
                                       "--tp", "2", "--pp", "2"]) == 0
    return dict(hf=hf, tok=tok, tmp=tmp, hf_dir=hf_dir, run_dir=run_dir)


def _greedy_tokens(hf, tok, prompt, n):
    ids = torch.tensor([tok.tokenize(prompt)])
    with torch.no_grad():
        out = hf.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=tok.eod,
                          eos_token_id=tok.eod)[0, ids.shape[1]:].tolist()
    return out[: out.index(tok.eod)] if tok.eod in out else out


def test_convert_round_trips_are_bit_identical(setup):
    tmp, hf_dir, run_dir = setup["tmp"], setup["hf_dir"], setup["run_dir"]
    manifest = json.loads((run_dir / "global_step0" / "manifest.json").read_text())
    assert manifest["layout"]["tp"] == 2 and manifest["layout"]["pp"] == 2
    conv = _tool("convert_rwkv")
    assert conv.main(["--input", str(run_dir), "--output", str(tmp / "hf2"), "--to", "hf"]) == 0
    a, b = load_hf_state_dict(hf_dir), load_hf_state_dict(tmp / "hf2")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
    cfg_a = json.loads((hf_dir / "config.json").read_text())
    cfg_b = json.loads((tmp / "hf2" / "config.json").read_text())
    assert cfg_a == cfg_b
    assert (tmp / "hf2" / "tokenizer.json").is_file()
    reloaded = transformers.RwkvForCausalLM.from_pretrained(tmp / "hf2")
    assert all(torch.equal(p, reloaded.state_dict()[k]) for k, p in setup["hf"].state_dict().items())

    pth, pth2 = tmp / "m.pth", tmp / "m2.pth"
    assert conv.main(["--input", str(run_dir), "--output", str(pth), "--to", "blinkdl"]) == 0
    assert conv.main(["--input", str(pth), "--output", str(tmp / "run_b"), "--to", "neox"]) == 0
    assert conv.main(["--input", str(tmp / "run_b"), "--output", str(pth2), "--to", "blinkdl"]) == 0
    x, y = torch.load(pth, weights_only=True), torch.load(pth2, weights_only=True)
    assert set(x) == set(y) and "emb.weight" in x and x["blocks.0.att.time_mix_k"].shape == (1, 1, 64)
    assert all(torch.equal(x[k], y[k]) for k in x)
    assert conv.main(["--input", str(run_dir), "--output", str(tmp / "bad"), "--to", "neox", "--tp", "3"]) == 2


@torch.no_grad()
def test_neox_load_reads_run_dir_and_hf_dir(setup):
    hf, tok = setup["hf"], setup["tok"]
    ids = torch.tensor([tok.tokenize("Hello world, this is a test")])
    ref = hf(ids).logits
    for path in (setup["run_dir"], setup["hf_dir"]):
        lm = neox.load(path)
        out = lm(ids)
        assert out.shape == ref.shape
        assert (out - ref).abs().max().item() <= 1e-4


def test_generate_greedy_matches_transformers(setup, capsys):
    hf, tok = setup["hf"], setup["tok"]
    want = [p + tok.detokenize(_greedy_tokens(hf, tok, p, N)) for p in PROMPTS]
    assert len({w[len(p):] for w, p in zip(want, PROMPTS)}) > 1
    prompt_file = setup["tmp"] / "prompts.txt"
    prompt_file.write_text("".join(p + "\n" for p in PROMPTS))
    gen = _tool("generate")
    args = ["--load", str(setup["run_dir"]), "--max-new-tokens", str(N), "--temperature", "0"]
    assert gen.main([*args, "--prompt-file", str(prompt_file), "--batch-size", "2"]) == 0
    captured = capsys.readouterr()
    assert captured.out == "".join(f"{w}\n{RULE}\n" for w in want)
    assert "[generate] RWKV in RNN mode: C++ step (" in captured.err or "fused torch step" in captured.err

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(port), str(ROOT / "tools/generate.py"), *args, "--prompt-file", str(prompt_file),
           "--tp", "2"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=180, cwd=ROOT, env=clean_env(),
                         stdin=subprocess.DEVNULL)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    assert res.stdout == "".join(f"{w}\n{RULE}\n" for w in want)
    assert "RWKV in RNN mode: the model's forward_rnn (TP 2" in res.stderr


def test_generate_save_and_load_state(setup, capsys):
    tmp = setup["tmp"]
    gen = _tool("generate")
    base = ["--load", str(setup["hf_dir"]), "--temperature", "1.0", "--top-k", "50", "--seed", "5"]
    assert gen.main([*base, "--prompt", "Once upon a time", "--max-new-tokens", "12"]) == 0
    whole = capsys.readouterr().out
    state = tmp / "state.safetensors"
    assert gen.main([*base, "--prompt", "Once upon a time", "--max-new-tokens", "5", "--save-state", str(state)]) == 0
    first = capsys.readouterr().out
    assert gen.main([*base, "--prompt", "", "--max-new-tokens", "7", "--load-state", str(state)]) == 0
    second = capsys.readouterr().out
    cont = [out.split("\n" + RULE)[0] for out in (whole, first, second)]
    assert cont[0].startswith("Once upon a time") and cont[1].startswith("Once upon a time")
    assert cont[0] == cont[1] + cont[2]  # the resumed run prints only its continuation
    assert len(cont[2]) > 0
    with pytest.raises(SystemExit, match="single --prompt"):
        gen.main([*base, "--interactive", "--load-state", str(state)])

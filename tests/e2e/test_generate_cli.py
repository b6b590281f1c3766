"""tools/generate.py as a user runs it: a prompt file (batched), --interactive on stdin, and torchrun TP 2.

A random HF GPT-NeoX with the GPT-2 tokenizer is converted to a neox run dir. The expected text
comes from transformers' greedy `generate` on each prompt alone, decoded with the same tokenizer;
the batched, interactive and 2-process outputs must all be exactly that.
"""

import importlib.util
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from neox.data.tokenizers import build_tokenizer  # noqa: E402
from tests.conftest import SHARED_DATA  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
PROMPTS = ["Hello world, this is", "The", "def main(args): return", "A longer prompt about the sea and the"]
N = 10
RULE = "-" * 40


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def clean_env() -> dict[str, str]:
    drop = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"}
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith(("TORCHELASTIC", "SLURM_"))}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", GLOO_SOCKET_IFNAME="lo", TOKENIZERS_PARALLELISM="false")
    return env


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def setup(one_thread, tmp_path_factory):
    if not (SHARED_DATA / "gpt2_tokenizer.json").is_file():
        pytest.skip(f"public test data not found at {SHARED_DATA} (set NEOX_SHARED_DATA)")
    tok_file = SHARED_DATA / "gpt2_tokenizer.json"
    tmp = tmp_path_factory.mktemp("gen_cli")
    tok = build_tokenizer("HFTokenizer", str(tok_file))
    config = transformers.GPTNeoXConfig(
        vocab_size=tok.vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=128, max_position_embeddings=64, rotary_pct=0.25, use_parallel_residual=True,
        tie_word_embeddings=False, bos_token_id=tok.eod, eos_token_id=tok.eod, attn_implementation="eager",
    )
    torch.manual_seed(3)
    hf = transformers.GPTNeoXForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" not in name:
                p.normal_(0.0, 0.15)  # continuations vary from prompt to prompt
    hf_dir, run_dir = tmp / "hf", tmp / "run"
    hf.save_pretrained(hf_dir)
    (hf_dir / "tokenizer.json").write_bytes(tok_file.read_bytes())
    assert _tool("convert_hf_to_neox").main(["--input", str(hf_dir), "--output", str(run_dir)]) == 0
    prompt_file = tmp / "prompts.txt"
    prompt_file.write_text("".join(p + "\n" for p in PROMPTS))
    want = _expected(hf, tok, PROMPTS)
    assert len({w[len(p):] for w, p in zip(want, PROMPTS)}) > 1  # continuations differ: the check means something
    return dict(run_dir=run_dir, prompt_file=prompt_file, want=want)


def _expected(hf, tok, prompts):
    """transformers' greedy continuation of each prompt alone, decoded (the eod ends it, unprinted)."""
    out = []
    with torch.no_grad():
        for prompt in prompts:
            ids = torch.tensor([tok.tokenize(prompt)])
            gen = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=N, do_sample=False,
                              pad_token_id=tok.eod, eos_token_id=tok.eod)[0, ids.shape[1]:].tolist()
            out.append(prompt + tok.detokenize([t for t in gen if t != tok.eod]))
    return out


def _args(setup, *extra):
    return ["--load", str(setup["run_dir"]), "--max-new-tokens", str(N), "--temperature", "0", *extra]


def test_prompt_file_batched_and_interactive_match_transformers(setup, capsys):
    want = setup["want"]
    gen = _tool("generate")
    assert gen.main(_args(setup, "--prompt-file", str(setup["prompt_file"]), "--batch-size", "4")) == 0
    batched = capsys.readouterr().out
    assert batched == "".join(f"{w}\n{RULE}\n" for w in want)
    # interactive: a real stdin pipe, one prompt per line, an empty line ends it
    res = subprocess.run([sys.executable, str(ROOT / "tools/generate.py"), *_args(setup, "--interactive")],
                         input="".join(p + "\n" for p in PROMPTS[:2]) + "\n", capture_output=True,
                         text=True, timeout=120, cwd=ROOT, env=clean_env())
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout == "".join(f"{w}\n" for w in want[:2])


def test_torchrun_tp2_equals_one_process(setup):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(port), str(ROOT / "tools/generate.py"),
           *_args(setup, "--prompt-file", str(setup["prompt_file"]), "--tp", "2", "--batch-size", "4")]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT, env=clean_env(),
                         stdin=subprocess.DEVNULL)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    want = setup["want"]
    assert res.stdout == "".join(f"{w}\n{RULE}\n" for w in want)  # rank 0 only prints

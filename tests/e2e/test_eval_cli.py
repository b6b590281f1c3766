"""tools/eval.py as a user runs it: one process and `torch.distributed.run` with 2 processes agree exactly.

The checkpoint is a tiny random neox model with the byte-level CharLevelTokenizer, so the .bin data
(documents + eod) and the same documents as jsonl text must give the same perplexity, and the byte
count is the UTF-8 length of the text.
"""

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from neox.checkpoint.io import save_model_checkpoint
from neox.config import NeoXConfig
from neox.data.tokenizers import CharLevelTokenizer
from neox.models.causal_lm import CausalLM

ROOT = Path(__file__).resolve().parents[2]
TEXTS = [f"Document {i}: the quick brown fox jumps over {i * 7} lazy dogs. Ünïcödé ✓ {'ab' * i}"
         for i in range(20)]
LAMBADA = [f"{' '.join(TEXTS[i].split()[:8])} and then came the fox" for i in range(12)]


def _tool():
    spec = importlib.util.spec_from_file_location("eval_tool", ROOT / "tools" / "eval.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    d = tmp_path_factory.mktemp("eval")
    cfg = NeoXConfig.from_dict(dict(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=24,
                                    max_position_embeddings=64, vocab_size=512,
                                    tokenizer_type="CharLevelTokenizer"))
    lm = CausalLM.from_config(cfg.model, init_seed=5)
    save_model_checkpoint(d / "run", lm.model.state_dict(), cfg, iteration=3)
    tok = CharLevelTokenizer()
    builder = IndexedDatasetBuilder(str(d / "data.bin"), dtype=np.uint16)
    for t in TEXTS:
        ids = tok.tokenize(t) + [tok.eod]
        builder.add_document(np.array(ids, dtype=np.uint16), [len(ids)])
    builder.finalize(str(d / "data.idx"))
    (d / "docs.jsonl").write_text("".join(json.dumps({"body": t}) + "\n" for t in TEXTS[16:19]))
    (d / "lambada.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in LAMBADA))
    return d


def run_both(setup, args, tmp_path, capsys):
    """The tool in this process (one thread, as torchrun's children) and under torchrun with 2 ranks."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert _tool().main([*args, "--json", str(tmp_path / "one.json")]) == 0
    finally:
        torch.set_num_threads(threads)
    table = capsys.readouterr().out
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(ROOT / "tools" / "eval.py"), *args, "--json", "-"]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=120, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    two = json.loads(r.stdout[r.stdout.index("{"):])
    one = json.loads((tmp_path / "one.json").read_text())
    assert (one.pop("processes"), two.pop("processes")) == (1, 2)
    assert one == two
    return one, table


def test_perplexity_bin_split_one_and_two_processes(setup, tmp_path, capsys):
    args = ["--load", str(setup / "run"), "--data-prefix", str(setup / "data"), "--split", "16,3,1",
            "--which", "valid", "--method", "concat", "--stride", "10", "--batch-size", "2"]
    res, table = run_both(setup, args, tmp_path, capsys)
    valid = TEXTS[16:19]  # 20 documents cut 16,3,1 as megatron-core does
    assert res["documents"] == 3 and res["bytes"] == sum(len(t.encode()) for t in valid)
    assert res["tokens"] == res["bytes"]  # byte-level tokenizer
    assert res["bits_per_byte"] == pytest.approx(res["nll_sum"] / res["bytes"] / math.log(2), rel=1e-12)
    assert res["perplexity"] == pytest.approx(math.exp(res["nll_sum"] / res["tokens"]), rel=1e-12)
    assert "bits_per_byte" in table and f"{res['perplexity']:.6g}" in table

    # the same documents as jsonl text (tokenized by the tool) give the same numbers
    assert _tool().main(["--load", str(setup / "run"), "--jsonl", str(setup / "docs.jsonl"), "--jsonl-key", "body",
                         "--method", "concat", "--stride", "10", "--json", str(tmp_path / "j.json")]) == 0
    j = json.loads((tmp_path / "j.json").read_text())
    assert (j["tokens"], j["bytes"]) == (res["tokens"], res["bytes"])
    assert j["nll_sum"] == pytest.approx(res["nll_sum"], rel=1e-9)


def test_lambada_one_and_two_processes(setup, tmp_path, capsys):
    args = ["--load", str(setup / "run" / "global_step3"), "--task", "lambada", "--jsonl",
            str(setup / "lambada.jsonl"), "--limit", "9", "--batch-size", "2"]
    res, table = run_both(setup, args, tmp_path, capsys)
    assert res["examples"] == 9 and res["target_tokens"] == 9 * len(" fox")
    assert "accuracy" in table


def test_bad_arguments(setup):
    with pytest.raises(SystemExit):
        _tool().main(["--load", str(setup / "run"), "--task", "lambada", "--data-prefix", str(setup / "data")])
    with pytest.raises(ValueError, match="jsonl-key"):
        _tool().main(["--load", str(setup / "run"), "--jsonl", str(setup / "docs.jsonl")])

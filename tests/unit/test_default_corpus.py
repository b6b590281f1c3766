"""The embedded default corpus: contents, format (read back with megatron-core), caching."""

import json
import random
import sysconfig
from pathlib import Path

import pytest
from tokenizers import Tokenizer

from neox.config import ConfigError
from neox.data import default_corpus as dc
from neox.data.tokenizers import build_tokenizer

TINY = {"max_bytes": 300_000, "vocab_size": 512, "log": None}


def _source_text(name: str) -> str:
    """The document's text read straight from where it lives (independent of gather_documents)."""
    kind, _, key = name.partition(":")
    if kind == "pydoc":
        from pydoc_data.topics import topics

        return topics[key]
    assert kind == "stdlib", name
    return (Path(sysconfig.get_paths()["stdlib"]) / key).read_text(encoding="utf-8", errors="replace")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("default")
    return dc.build_default_corpus(out, **TINY)


def test_documents_decode_back_to_sources(corpus):
    import numpy as np
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    names = json.loads(Path(corpus["manifest"]).read_text())["documents"]
    ds = IndexedDataset(corpus["data_prefix"])
    tok = build_tokenizer("HFTokenizer", corpus["tokenizer_file"])
    assert tok.eod == 0 and tok.vocab_size == corpus["vocab_size"] <= 512
    assert len(ds) == len(names) == corpus["num_documents"] >= 5
    assert list(ds.document_indices) == list(range(len(names) + 1))  # one sequence per document
    assert ds.index.dtype == np.uint16
    assert sum(int(n) for n in ds.sequence_lengths) == corpus["num_tokens"]
    assert any(n.startswith("pydoc:") for n in names) and any(n.startswith("stdlib:") for n in names)
    total = 0
    for i, name in enumerate(names):
        ids = ds[i].tolist()
        assert ids[-1] == tok.eod and tok.eod not in ids[:-1]
        text = _source_text(name)
        assert tok.detokenize(ids[:-1]) == text, name
        total += len(text.encode("utf-8"))
    assert total == corpus["num_bytes"] <= TINY["max_bytes"]


def test_split_counts_follow_megatron_split(corpus):
    n = corpus["num_documents"]
    assert corpus["split"] == "95,5,0"
    assert corpus["num_train_documents"] == int(round(0.95 * n)) and corpus["num_test_documents"] == 0
    assert corpus["num_train_documents"] + corpus["num_valid_documents"] == n
    assert dc.split_counts(200, "90,5,5") == (180, 10, 10)
    assert dc.split_counts(7, "1,1,1") == (2, 3, 2)  # megatron rounds each book-end: 0, 2.33, 4.67, 7


def test_selection_is_deterministic_and_order_free():
    docs = dc.gather_documents()
    assert docs == sorted(docs) and len({n for n, _ in docs}) == len(docs)
    assert not any("/test/" in n or n.startswith(("stdlib:site-packages", "stdlib:idlelib")) for n, _ in docs)
    shuffled = docs[:]
    random.Random(0).shuffle(shuffled)
    assert dc.select_documents(shuffled, 300_000) == dc.select_documents(docs, 300_000)


def test_tokenizer_never_sees_held_out_documents(tmp_path):
    """Training the tokenizer on the train part alone reproduces the saved tokenizer exactly."""
    r = dc.build_default_corpus(tmp_path, **{**TINY, "split": "50,50,0"})
    docs = dc.select_documents(dc.gather_documents(), TINY["max_bytes"])
    assert [n for n, _ in docs] == json.loads(Path(r["manifest"]).read_text())["documents"]
    ref = dc.train_bpe_tokenizer([t for _, t in docs[: r["num_train_documents"]]], TINY["vocab_size"])
    assert ref.to_str() == Tokenizer.from_file(r["tokenizer_file"]).to_str()
    everything = dc.train_bpe_tokenizer([t for _, t in docs], TINY["vocab_size"])
    assert everything.to_str() != ref.to_str()
    with pytest.raises(ConfigError, match="split"):
        dc.build_default_corpus(tmp_path, **{**TINY, "split": "100,0.0001,0"})


def test_cache_is_reused(corpus):
    out = Path(corpus["out_dir"])
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.is_file()}
    again = dc.build_default_corpus(out, **TINY)
    assert again["cached"] and not corpus["cached"]
    assert again["checksums"] == corpus["checksums"]
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.is_file()} == mtimes


def test_rebuilds_on_force_changed_settings_and_damage(tmp_path, corpus):
    first = dc.build_default_corpus(tmp_path, **TINY)
    assert not first["cached"]
    assert first["checksums"] == corpus["checksums"]  # a fresh build elsewhere gives the same bytes
    assert not dc.build_default_corpus(tmp_path, **TINY, force=True)["cached"]

    changed = dc.build_default_corpus(tmp_path, **{**TINY, "vocab_size": 400})
    assert not changed["cached"] and changed["vocab_size"] == 400
    assert changed["checksums"]["tokenizer.json"] != first["checksums"]["tokenizer.json"]

    with open(changed["bin"], "ab") as f:  # a damaged output is not trusted
        f.write(b"\0\0")
    assert not dc.build_default_corpus(tmp_path, **{**TINY, "vocab_size": 400})["cached"]
    Path(changed["idx"]).unlink()
    assert not dc.build_default_corpus(tmp_path, **{**TINY, "vocab_size": 400})["cached"]
    assert dc.build_default_corpus(tmp_path, **{**TINY, "vocab_size": 400})["cached"]


def test_interrupted_build_is_not_mistaken_for_done(tmp_path, monkeypatch):
    dc.build_default_corpus(tmp_path, **TINY)

    def crash(prefix, *args, **kwargs):
        Path(f"{prefix}.bin").write_bytes(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(dc, "write_indexed_dataset", crash)
    with pytest.raises(KeyboardInterrupt):
        dc.build_default_corpus(tmp_path, **TINY, force=True)
    monkeypatch.undo()
    assert not (tmp_path / dc.MANIFEST_NAME).exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".build-")]
    rebuilt = dc.build_default_corpus(tmp_path, **TINY)
    assert not rebuilt["cached"]
    assert dc.build_default_corpus(tmp_path, **TINY)["cached"]


def test_cli_reports_built_then_cached(tmp_path, capsys):
    import importlib.util

    tool = Path(__file__).resolve().parents[2] / "tools" / "prepare_default_data.py"
    spec = importlib.util.spec_from_file_location("prepare_default_data", tool)
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    argv = ["--out", str(tmp_path), "--max-bytes", "100000", "--vocab-size", "400"]
    assert cli.main(argv) == 0
    first = capsys.readouterr().out
    assert cli.main(argv) == 0
    second = capsys.readouterr().out
    assert "built:" in first and "cached:" in second
    assert (tmp_path / "corpus_text_document.bin").is_file()

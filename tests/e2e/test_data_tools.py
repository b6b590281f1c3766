"""The data CLIs as a user runs them: preprocess_data -> inspect_data -> merge_datasets, and the bench smoke."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import zstandard

ROOT = Path(__file__).resolve().parents[2]


def _run(tool, *args, ok=True):
    r = subprocess.run([sys.executable, str(ROOT / "tools" / tool), *map(str, args)], capture_output=True,
                       text=True, timeout=240, cwd=ROOT)
    assert (r.returncode == 0) == ok, (r.returncode, r.stdout, r.stderr)
    return r


def _texts(n, seed):
    from pydoc_data.topics import topics

    keys = sorted(topics)
    return [topics[keys[(seed + 7 * i) % len(keys)]] for i in range(n)]


def _pile_file(path, texts, bad_line_at=None):
    lines = [json.dumps({"text": t, "meta": {"pile_set_name": "Pydoc"}}) for t in texts]
    if bad_line_at is not None:
        lines.insert(bad_line_at, '{"text": "cut off')
    path.write_bytes(zstandard.ZstdCompressor().compress(("\n".join(lines) + "\n").encode()))
    return path


def _char_docs(texts):
    return [list(t.encode("utf-8")) + [0] for t in texts]  # CharLevelTokenizer: bytes, eod 0


def test_preprocess_inspect_merge(tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

    a, b = _texts(30, 0), _texts(12, 3)
    _pile_file(tmp_path / "a.jsonl.zst", a, bad_line_at=5)
    _pile_file(tmp_path / "b.jsonl.zst", b)
    common = ["--tokenizer-type", "CharLevelTokenizer", "--append-eod", "--workers", "2", "--chunk-bytes", "20000"]
    r = _run("preprocess_data.py", "--input", tmp_path / "a.jsonl.zst", "--output-prefix", tmp_path / "a", *common,
             ok=False)
    assert f"{tmp_path / 'a.jsonl.zst'}:6: malformed JSON" in r.stderr
    assert not list(tmp_path.glob("a_*"))
    r = _run("preprocess_data.py", "--input", tmp_path / "a.jsonl.zst", "--output-prefix", tmp_path / "a", *common,
             "--skip-bad-lines")
    assert "skipped 1 bad line(s)" in r.stdout and "30 documents" in r.stdout
    _run("preprocess_data.py", "--input", tmp_path / "b.jsonl.zst", "--output-prefix", tmp_path / "b", *common)

    ref = IndexedDatasetBuilder(str(tmp_path / "ref.bin"), dtype=np.uint16)
    for d in _char_docs(a):
        ref.add_document(np.array(d, dtype=np.uint16), [len(d)])
    ref.finalize(str(tmp_path / "ref.idx"))
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"a_text_document{ext}").read_bytes() == (tmp_path / f"ref{ext}").read_bytes()

    r = _run("inspect_data.py", tmp_path / "a_text_document", "--tokenizer-type", "CharLevelTokenizer",
             "--samples", "3", "--sample-tokens", "40", "--json")
    (info,) = json.loads(r.stdout)
    lengths = [len(d) for d in _char_docs(a)]
    assert info["documents"] == 30 and info["tokens"] == sum(lengths)
    assert info["max_id"] == max(max(d) for d in _char_docs(a))
    assert sum(info["length_histogram"].values()) == 30 and info["doc_tokens"]["max"] == max(lengths)
    for s in info["samples"]:
        doc = _char_docs(a)[s["sequence"]]
        assert s["ids"] == doc[:40] and s["text"] == bytes(doc[:40]).decode("utf-8", "replace")
    text = _run("inspect_data.py", tmp_path / "a_text_document.idx").stdout
    assert "valid (uint16)" in text and "documents 30" in text

    _run("merge_datasets.py", "--input", tmp_path / "a_text_document", tmp_path / "b_text_document",
         "--output-prefix", tmp_path / "ab")
    merged = IndexedDataset(str(tmp_path / "ab"))
    assert [merged[i].tolist() for i in range(len(merged))] == _char_docs(a) + _char_docs(b)
    r = _run("merge_datasets.py", "--input", tmp_path / "a_text_document", "--output-prefix", tmp_path / "ab",
             ok=False)
    assert "--overwrite" in r.stderr

    with open(tmp_path / "ab.bin", "r+b") as f:  # damage the merged data: inspect names the fault
        f.truncate(100)
    r = _run("inspect_data.py", tmp_path / "ab", ok=False)
    assert "ab.bin" in r.stderr and "truncated or corrupt" in r.stderr


def test_bench_smoke(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "bench" / "preprocess.py"), "--mb", "0.2",
                        "--repeats", "1", "--json", str(tmp_path / "r.json")],
                       capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "plain loop" in r.stdout and "byte-identical to the plain loop's: True" in r.stdout
    res = json.loads((tmp_path / "r.json").read_text())
    assert res["tokens"] > 0 and set(res["median_s"]) == {"pp", "plain", "bare1", "bareN"}

"""preprocess: outputs byte-identical to megatron-core's IndexedDatasetBuilder fed by `tokenizers` directly;
every input format; every kind of bad input gives one clear message and loses nothing."""

import gzip
import json
import os
from pathlib import Path

import numpy as np
import pytest
import zstandard

from neox.config import ConfigError
from neox.data import preprocess as pp
from neox.data.indexed import DataError
from neox.data.tokenizers import build_tokenizer

TEXTS = [
    "def tokenize(text):\n    return [ord(c) for c in text]  # bytes, not chars\n",
    "The quick brown fox jumps over the lazy dog. Ünïcödé: naïve café, 東京, emoji 🙂!",
    "  leading spaces\tand tabs\n\n\nand blank lines  ",
    "line\u2028separator and \r\n windows line ends",
]


def _corpus() -> list[str]:
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics)[:60]] + TEXTS


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    """(reference `tokenizers.Tokenizer`, path of its tokenizer.json): a byte-level BPE of 700 ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=700, special_tokens=["<|endoftext|>", "<|padding|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_corpus(), trainer)
    path = tmp_path_factory.mktemp("bpe") / "tokenizer.json"
    tok.save(str(path))
    return tok, path


@pytest.fixture
def tok(bpe):
    return build_tokenizer("HFTokenizer", bpe[1])


def _records():
    return [{"text": t, "meta": {"pile_set_name": "Pydoc", "i": i}} for i, t in enumerate(_corpus())]


def _write_jsonl(path: Path, records, ensure_ascii=True) -> Path:
    data = "".join(json.dumps(r, ensure_ascii=ensure_ascii) + "\n" for r in records).encode("utf-8")
    if path.name.endswith(".zst"):
        data = zstandard.ZstdCompressor().compress(data)
    elif path.name.endswith(".gz"):
        data = gzip.compress(data)
    path.write_bytes(data)
    return path


def _megatron_reference(prefix: Path, docs_ids, vocab_size: int) -> None:
    """What megatron-core's own builder writes for these documents (one sequence each)."""
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    dtype = DType.optimal_dtype(vocab_size)
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=dtype)
    for ids in docs_ids:
        builder.add_document(np.array(ids, dtype=dtype), [len(ids)])
    builder.finalize(f"{prefix}.idx")


def _same_files(a: str, b: str) -> bool:
    return all(Path(f"{a}{e}").read_bytes() == Path(f"{b}{e}").read_bytes() for e in (".bin", ".idx"))


@pytest.mark.parametrize("name,workers,chunk", [("in.jsonl", 1, 1 << 20), ("in.jsonl.zst", 2, 3000),
                                                ("in.jsonl.gz", 2, 1 << 20), ("in.jsonl.zst", 1, 3000)])
def test_bytes_identical_to_megatron_builder(bpe, tok, tmp_path, name, workers, chunk):
    ref_tok, _ = bpe
    records = _records()
    inp = _write_jsonl(tmp_path / name, records, ensure_ascii=workers == 1)
    # small chunks: many tasks, and documents longer than a chunk (pydoc topics reach tens of KB)
    assert max(len(json.dumps(r)) for r in records) > chunk or chunk > 1e5
    r = pp.preprocess(str(inp), tmp_path / "out", tok, append_eod=True, workers=workers, chunk_bytes=chunk, log=None)
    expected = [ref_tok.encode(x["text"]).ids + [0] for x in records]
    _megatron_reference(tmp_path / "ref", expected, ref_tok.get_vocab_size())
    assert _same_files(str(tmp_path / "out_text_document"), str(tmp_path / "ref"))
    out = r["outputs"]["text"]
    assert out["documents"] == len(records) and out["tokens"] == sum(map(len, expected)) and out["empty"] == 0
    assert r["records"] == len(records) and r["bad_lines"] == 0 and r["dtype"] == "uint16"
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_multiple_keys_no_eod_and_empty_documents(bpe, tok, tmp_path):
    ref_tok, _ = bpe
    records = [{"text": t, "title": t.split()[0] if i % 3 else "", "meta": {}} for i, t in enumerate(_corpus()[:20])]
    records[4]["text"] = ""  # an empty document: skipped (for this key only) and counted
    inp = _write_jsonl(tmp_path / "a.jsonl", records)
    r = pp.preprocess(inp, tmp_path / "out", tok, jsonl_keys=["text", "title"], workers=2, log=None)
    for key in ("text", "title"):
        ids = [ref_tok.encode(x[key]).ids for x in records]
        _megatron_reference(tmp_path / f"ref_{key}", [d for d in ids if d], ref_tok.get_vocab_size())
        assert _same_files(str(tmp_path / f"out_{key}_document"), str(tmp_path / f"ref_{key}"))
        assert r["outputs"][key]["empty"] == sum(1 for d in ids if not d)
    assert r["outputs"]["text"]["empty"] == 1 and r["outputs"]["title"]["empty"] == 7


def test_text_files_one_document_per_file_or_line(bpe, tok, tmp_path):
    ref_tok, _ = bpe
    (tmp_path / "docs").mkdir()
    texts = _corpus()[:12]
    for i, t in enumerate(texts):
        (tmp_path / "docs" / f"{i:02d}.txt").write_text(t, encoding="utf-8")
    (tmp_path / "docs" / "zz.txt.gz").write_bytes(gzip.compress(TEXTS[1].encode()))
    pp.preprocess(str(tmp_path / "docs"), tmp_path / "files", tok, append_eod=True, chunk_bytes=5000, log=None)
    expected = [ref_tok.encode(t).ids + [0] for t in [*texts, TEXTS[1]]]
    _megatron_reference(tmp_path / "ref_files", expected, 700)
    assert _same_files(str(tmp_path / "files_text_document"), str(tmp_path / "ref_files"))

    lines_file = tmp_path / "lines.txt"
    lines_file.write_bytes("\n".join(texts[:4]).encode("utf-8") + b"\n\n")
    r = pp.preprocess(lines_file, tmp_path / "lines", tok, append_eod=True, text_docs="line", workers=2,
                      chunk_bytes=500, log=None)
    lines = [ln.rstrip("\r") for ln in "\n".join(texts[:4]).split("\n") if ln.strip()]
    _megatron_reference(tmp_path / "ref_lines", [ref_tok.encode(ln).ids + [0] for ln in lines], 700)
    assert _same_files(str(tmp_path / "lines_text_document"), str(tmp_path / "ref_lines"))
    assert r["records"] == len(lines)


def test_enwik8_lines(shared_data, tok, bpe, tmp_path):
    path = shared_data / "enwik8_first100.txt"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    pp.preprocess(path, tmp_path / "e", tok, text_docs="line", workers=2, chunk_bytes=2000, log=None)
    lines = [ln.decode("utf-8", "replace").rstrip("\r") for ln in path.read_bytes().split(b"\n") if ln.strip()]
    _megatron_reference(tmp_path / "ref", [bpe[0].encode(ln).ids for ln in lines], 700)
    assert _same_files(str(tmp_path / "e_text_document"), str(tmp_path / "ref"))


def test_real_20b_tokenizer_on_lambada(shared_data, tmp_path):
    from tokenizers import Tokenizer

    tok_path, data = shared_data / "20B_tokenizer.json", shared_data / "lambada_test.jsonl"
    if not (tok_path.is_file() and data.is_file()):
        pytest.skip("20B tokenizer or LAMBADA not in shared data")
    lines = data.read_text(encoding="utf-8").splitlines()[:300]
    inp = tmp_path / "lambada.jsonl.zst"
    inp.write_bytes(zstandard.ZstdCompressor().compress(("\n".join(lines) + "\n").encode("utf-8")))
    r = pp.preprocess(inp, tmp_path / "l", build_tokenizer("HFTokenizer", tok_path), append_eod=True, workers=2,
                      chunk_bytes=20_000, log=None)
    ref = Tokenizer.from_file(str(tok_path))
    _megatron_reference(tmp_path / "ref", [ref.encode(json.loads(x)["text"]).ids + [0] for x in lines], 50277)
    assert _same_files(str(tmp_path / "l_text_document"), str(tmp_path / "ref"))
    assert r["dtype"] == "uint16"


class WideTokenizer:
    """A stand-in with a vocabulary above 65500 ids: megatron then stores int32."""

    name = "WideTokenizer"
    vocab_size = 70_000
    eod = 69_999

    def tokenize_batch(self, texts):
        return [[65_000 + ord(c) % 1000 for c in t] for t in texts]


def test_int32_above_65500_ids(tmp_path):
    records = _records()[:10]
    inp = _write_jsonl(tmp_path / "a.jsonl", records)
    r = pp.preprocess(inp, tmp_path / "w", WideTokenizer(), append_eod=True, workers=2, log=None)
    docs = [ids + [69_999] for ids in WideTokenizer().tokenize_batch([x["text"] for x in records])]
    _megatron_reference(tmp_path / "ref", docs, 70_000)
    assert r["dtype"] == "int32"
    assert _same_files(str(tmp_path / "w_text_document"), str(tmp_path / "ref"))
    assert np.fromfile(tmp_path / "ref.bin", dtype=np.int32).max() >= 65_500


def test_malformed_json_names_file_and_line(tok, tmp_path):
    good = [json.dumps(r) for r in _records()[:6]]
    lines = [*good[:3], '{"text": "broken', *good[3:5], "[1, 2]", "", good[5], b"\xff\xfe".decode("latin-1")]
    inp = tmp_path / "bad.jsonl"
    inp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(DataError) as err:
        pp.preprocess(inp, tmp_path / "out", tok, workers=2, chunk_bytes=50, log=None)
    msg = str(err.value)
    assert f"{inp}:4: malformed JSON" in msg and "--skip-bad-lines" in msg
    assert not list(tmp_path.glob("out*"))  # nothing written, no temp files left

    messages = []
    r = pp.preprocess(inp, tmp_path / "out", tok, skip_bad_lines=True, workers=2, chunk_bytes=50,
                      log=messages.append)
    assert r["bad_lines"] == 3 and r["records"] == r["outputs"]["text"]["documents"] == 6
    assert [e.split(": ")[0] for e in r["bad_examples"]] == [f"{inp}:4", f"{inp}:7", f"{inp}:10"]
    assert "not an object" in r["bad_examples"][1]
    report = "\n".join(messages)
    assert "skipped 3 bad line(s)" in report and f"{inp}:7" in report


def test_missing_key_and_non_text_values(tok, tmp_path):
    inp = _write_jsonl(tmp_path / "k.jsonl", [{"text": "a b"}, {"content": "x", "meta": {}}, {"text": 5}])
    with pytest.raises(DataError) as err:
        pp.preprocess(inp, tmp_path / "out", tok, log=None)
    msg = str(err.value)
    assert f"{inp}:2: no key 'text'" in msg and "'content', 'meta'" in msg and "--jsonl-keys" in msg
    r = pp.preprocess(inp, tmp_path / "out", tok, skip_bad_lines=True, log=None)
    assert r["bad_lines"] == 2 and "holds a int, not text" in r["bad_examples"][1]
    assert r["outputs"]["text"]["documents"] == 1


def test_existing_output_refused_and_failed_run_keeps_old_output(tok, tmp_path):
    inp = _write_jsonl(tmp_path / "a.jsonl", _records()[:5])
    pp.preprocess(inp, tmp_path / "out", tok, log=None)
    before = {e: Path(f"{tmp_path}/out_text_document{e}").read_bytes() for e in (".bin", ".idx")}
    with pytest.raises(ConfigError, match="--overwrite"):
        pp.preprocess(inp, tmp_path / "out", tok, log=None)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\nnot json\n', encoding="utf-8")
    with pytest.raises(DataError):
        pp.preprocess(bad, tmp_path / "out", tok, overwrite=True, workers=2, log=None)
    assert {e: Path(f"{tmp_path}/out_text_document{e}").read_bytes() for e in (".bin", ".idx")} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jsonl", "bad.jsonl", "out_text_document.bin",
                                                          "out_text_document.idx"]
    r = pp.preprocess(bad, tmp_path / "out", tok, overwrite=True, skip_bad_lines=True, log=None)
    assert r["outputs"]["text"]["documents"] == 1
    assert Path(f"{tmp_path}/out_text_document.bin").read_bytes() != before[".bin"]
    with pytest.raises(DataError, match="no documents"):  # only empty documents: nothing worth writing
        pp.preprocess(_write_jsonl(tmp_path / "e.jsonl", [{"text": ""}]), tmp_path / "e", tok, log=None)
    assert not list(tmp_path.glob("e_*"))


def test_input_expansion(tmp_path):
    for name in ("b.jsonl", "a.jsonl.zst", "c.txt", "skip.csv"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "d.ndjson.gz").write_bytes(b"")
    assert pp.expand_inputs(str(tmp_path / "*.jsonl*")) == [tmp_path / "a.jsonl.zst", tmp_path / "b.jsonl"]
    assert pp.expand_inputs(f"{tmp_path}/c.txt,{tmp_path}/b.jsonl,{tmp_path}/c.txt") == [
        tmp_path / "c.txt", tmp_path / "b.jsonl"]
    assert pp.expand_inputs(str(tmp_path)) == [tmp_path / n for n in ("a.jsonl.zst", "b.jsonl", "c.txt",
                                                                        "sub/d.ndjson.gz")]
    with pytest.raises(ConfigError, match="does not exist"):
        pp.expand_inputs(str(tmp_path / "nope.jsonl"))
    with pytest.raises(ConfigError, match="no file matches"):
        pp.expand_inputs(str(tmp_path / "*.parquet"))
    with pytest.raises(ConfigError, match="unknown format"):
        pp.expand_inputs(str(tmp_path / "skip.csv"))


def test_multi_frame_zst_and_corrupt_compressed_input(tok, bpe, tmp_path):
    records = _records()
    two = _write_jsonl(tmp_path / "two.jsonl.zst", records[:30]).read_bytes()
    two += _write_jsonl(tmp_path / "two.jsonl.zst", records[30:]).read_bytes()  # two zstd frames
    (tmp_path / "two.jsonl.zst").write_bytes(two)
    r = pp.preprocess(tmp_path / "two.jsonl.zst", tmp_path / "two", tok, chunk_bytes=4096, log=None)
    assert r["records"] == r["outputs"]["text"]["documents"] == len(records)

    good = _write_jsonl(tmp_path / "a.jsonl.zst", records)
    cut = tmp_path / "cut.jsonl.zst"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    garbage = tmp_path / "g.jsonl.gz"
    garbage.write_bytes(b"\x1f\x8b\x08\x00" + os.urandom(64))
    for path in (cut, garbage):
        with pytest.raises(DataError) as err:
            pp.preprocess(path, tmp_path / "out", tok, workers=2, log=None)
        assert str(path) in str(err.value) and "truncated or corrupt" in str(err.value)
    assert not list(tmp_path.glob("out*"))


def test_reading_is_bounded(tok, tmp_path, monkeypatch):
    """At most 2 * workers + 2 chunks are read ahead of the writer, whatever the input size."""
    inp = _write_jsonl(tmp_path / "a.jsonl", _records() * 3)
    state = {"read": 0, "written": 0, "ahead": 0}
    real_read, real_add = pp.read_tasks, pp.IndexedWriter.add_documents

    def read_tasks(*a, **k):
        for task in real_read(*a, **k):
            state["read"] += 1
            state["ahead"] = max(state["ahead"], state["read"] - state["written"])
            yield task

    def add_documents(self, flat, lengths):
        state["written"] += 1
        return real_add(self, flat, lengths)

    monkeypatch.setattr(pp, "read_tasks", read_tasks)
    monkeypatch.setattr(pp.IndexedWriter, "add_documents", add_documents)
    pp.preprocess(inp, tmp_path / "out", tok, workers=2, chunk_bytes=2000, log=None)
    assert state["read"] == state["written"] > 30
    assert state["ahead"] <= 2 * 2 + 2


def test_line_chunks_cut_at_line_ends():
    import io

    data = b"".join(f'{{"i": {i}, "pad": "{"x" * (i * 37 % 500)}"}}\n'.encode() for i in range(300)) + b'{"last": 1}'
    pieces = list(pp._line_chunks(io.BytesIO(data), 256))
    assert b"".join(p for _, p in pieces) == data
    assert all(p.endswith(b"\n") for _, p in pieces[:-1])
    line = 1
    for first, piece in pieces:
        assert first == line
        line += piece.count(b"\n")


def test_cli(tok, bpe, tmp_path, capsys):
    import importlib.util

    tool = Path(__file__).resolve().parents[2] / "tools" / "preprocess_data.py"
    spec = importlib.util.spec_from_file_location("preprocess_data", tool)
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    inp = _write_jsonl(tmp_path / "a.jsonl", _records()[:8])
    argv = ["--input", str(inp), "--output-prefix", str(tmp_path / "o"), "--tokenizer-type", "HFTokenizer",
            "--vocab-file", str(bpe[1]), "--append-eod", "--workers", "2", "--no-progress"]
    assert cli.main(argv) == 0
    assert "8 documents" in capsys.readouterr().out
    assert cli.main(argv) == 2
    assert "--overwrite" in capsys.readouterr().err
    with open(inp, "a") as f:
        f.write("{oops\n")
    assert cli.main([*argv, "--overwrite"]) == 2
    assert f"{inp}:9: malformed JSON" in capsys.readouterr().err
    assert cli.main([*argv, "--overwrite", "--skip-bad-lines"]) == 0
    assert "skipped 1 bad line(s)" in capsys.readouterr().out

""".bin/.idx writer, validation, token-range check and merge, against megatron-core's own builder/reader."""

import struct
from pathlib import Path

import numpy as np
import pytest

from neox.data import indexed as ix
from neox.data.gpt_dataset import build_train_valid_test_datasets
from neox.data.indexed import DataError
from neox.data.tokenizers import build_tokenizer


def _docs(n, vocab, seed=0, max_len=300):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, size=int(rng.integers(1, max_len))).tolist() for _ in range(n)]


def _megatron_write(prefix, docs, vocab):
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    dtype = DType.optimal_dtype(vocab)
    b = IndexedDatasetBuilder(f"{prefix}.bin", dtype=dtype)
    for d in docs:
        b.add_document(np.array(d, dtype=dtype), [len(d)])
    b.finalize(f"{prefix}.idx")


def _ours(prefix, docs, vocab, batch=7):
    w = ix.IndexedWriter(f"{prefix}.bin", ix.best_dtype(vocab))
    for i in range(0, len(docs), batch):
        part = docs[i:i + batch]
        w.add_documents(np.array([t for d in part for t in d], dtype=w.dtype),
                        np.array([len(d) for d in part], dtype=np.int32))
    w.finalize(f"{prefix}.idx")


def _bytes(prefix):
    return tuple(Path(f"{prefix}{e}").read_bytes() for e in (".bin", ".idx"))


@pytest.mark.parametrize("vocab", [300, 65_499, 65_500, 100_000])
@pytest.mark.parametrize("n", [0, 1, 50])
def test_writer_bytes_equal_megatron_builder(tmp_path, vocab, n):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    docs = _docs(n, vocab)
    _megatron_write(tmp_path / "ref", docs, vocab)
    _ours(tmp_path / "ours", docs, vocab)
    assert _bytes(tmp_path / "ours") == _bytes(tmp_path / "ref")
    info = ix.validate_indexed_dataset(tmp_path / "ours")
    assert (info.num_documents, info.num_tokens) == (n, sum(map(len, docs)))
    assert info.dtype == (np.uint16 if vocab < 65_500 else np.int32)
    if n:
        ds = IndexedDataset(str(tmp_path / "ours"))
        assert [ds[i].tolist() for i in range(len(ds))] == docs


def _corrupt_cases(prefix: Path):
    """(name, how to damage the dataset, words the message must contain)."""
    idx, bin_ = Path(f"{prefix}.idx"), Path(f"{prefix}.bin")

    def patch(path, offset, data):
        raw = bytearray(path.read_bytes())
        raw[offset:offset + len(data)] = data
        path.write_bytes(bytes(raw))

    n = struct.unpack("<Q", idx.read_bytes()[18:26])[0]
    return [
        ("truncated bin", lambda: bin_.write_bytes(bin_.read_bytes()[:-2]), [str(bin_), "indexes"]),
        ("longer bin", lambda: bin_.write_bytes(bin_.read_bytes() + b"\0\0"), [str(bin_), "bytes"]),
        ("truncated idx", lambda: idx.write_bytes(idx.read_bytes()[:-8]), [str(idx), "declares"]),
        ("header only", lambda: idx.write_bytes(idx.read_bytes()[:20]), [str(idx), "header"]),
        ("bad magic", lambda: patch(idx, 0, b"NOTANIDX\0"), [str(idx), "magic"]),
        ("bad version", lambda: patch(idx, 9, struct.pack("<Q", 2)), [str(idx), "version 2"]),
        ("bad dtype", lambda: patch(idx, 17, bytes([9])), [str(idx), "dtype code 9"]),
        ("bad pointer", lambda: patch(idx, 34 + 4 * n + 8 * 5, struct.pack("<q", 12)), ["sequence 5 starts"]),
        ("bad doc index", lambda: patch(idx, 34 + 12 * n, struct.pack("<q", 3)), ["document indices"]),
        ("missing bin", lambda: bin_.unlink(), ["not found"]),
    ]


@pytest.mark.parametrize("case", range(10))
def test_validation_names_each_fault(tmp_path, case):
    prefix = tmp_path / "d_text_document"
    _megatron_write(prefix, _docs(20, 500), 500)
    name, damage, words = _corrupt_cases(prefix)[case]
    damage()
    with pytest.raises(DataError) as err:
        ix.validate_indexed_dataset(prefix)
    assert all(w in str(err.value) for w in words), (name, str(err.value))


@pytest.fixture(scope="module")
def char_data(tmp_path_factory):
    """A CharLevelTokenizer dataset of pydoc texts (vocab 512, eod 0), written by megatron-core's builder."""
    from pydoc_data.topics import topics

    d = tmp_path_factory.mktemp("chars")
    tok = build_tokenizer("CharLevelTokenizer")
    docs = [tok.tokenize(topics[k]) + [tok.eod] for k in sorted(topics)[:40]]
    _megatron_write(d / "c_text_document", docs, tok.vocab_size)
    return d / "c_text_document", docs, tok


def test_datasets_refuse_corrupt_data_before_megatron_opens_it(char_data, tmp_path):
    prefix, docs, tok = char_data
    bad = tmp_path / "bad_text_document"
    _megatron_write(bad, docs, tok.vocab_size)
    Path(f"{bad}.bin").write_bytes(Path(f"{bad}.bin").read_bytes()[:-100])
    with pytest.raises(DataError, match="truncated or corrupt"):
        build_train_valid_test_datasets(tok, seq_length=16, seed=1, data_path=str(bad), split="1,0,0",
                                        cache_dir=tmp_path / "cache")


def test_token_ids_outside_the_vocabulary(char_data, tmp_path, monkeypatch):
    prefix, docs, tok = char_data
    other = [list(d) for d in docs]
    other[7][3] = 600  # a token no CharLevelTokenizer id can be
    bad = tmp_path / "wide_text_document"
    _megatron_write(bad, other, 70_000)  # int32
    assert ix.check_token_range(prefix, tok.vocab_size) == max(max(d) for d in docs)
    with pytest.raises(DataError) as err:
        ix.check_token_range(bad, tok.vocab_size)
    assert "token id 600 (sequence 7, token" in str(err.value) and "512" in str(err.value)
    pos = sum(map(len, other[:7])) + 3
    assert f"token {pos})" in str(err.value)
    with pytest.raises(DataError, match="outside the tokenizer's vocabulary"):
        build_train_valid_test_datasets(tok, seq_length=16, seed=1, train_data_paths=[str(prefix), str(bad)],
                                        cache_dir=tmp_path / "c1")
    train, _, _ = build_train_valid_test_datasets(tok, seq_length=16, seed=1, train_data_paths=[str(bad)],
                                                  cache_dir=tmp_path / "c2", check_vocab=False)
    assert len(train) > 0

    scans = []
    real = ix.check_token_range
    monkeypatch.setattr(ix, "check_token_range", lambda *a, **k: scans.append(a[0]) or real(*a, **k))
    for _ in range(2):  # the second start finds the scan result in the index cache
        build_train_valid_test_datasets(tok, seq_length=16, seed=1, data_path=str(prefix), split="9,1,0",
                                        cache_dir=tmp_path / "c3")
    assert scans == [str(prefix)]


def test_merge_equals_megatron_builder_over_all_documents(tmp_path):
    parts = [_docs(n, 1000, seed=n) for n in (5, 17, 1)]
    for i, docs in enumerate(parts):
        _ours(tmp_path / f"p{i}", docs, 1000)
    info = ix.merge_indexed_datasets([str(tmp_path / f"p{i}") for i in range(3)], tmp_path / "merged")
    _megatron_write(tmp_path / "ref", [d for p in parts for d in p], 1000)
    assert _bytes(tmp_path / "merged") == _bytes(tmp_path / "ref")
    assert info.num_documents == 23
    _ours(tmp_path / "wide", _docs(3, 70_000), 70_000)
    with pytest.raises(DataError, match="different token dtypes"):
        ix.merge_indexed_datasets([str(tmp_path / "p0"), str(tmp_path / "wide")], tmp_path / "m2")
    assert not list(tmp_path.glob("m2*"))

"""Megatron's mmap `.bin/.idx` format: a streaming writer, a validator, and a token-range check.

The format (megatron-core `indexed_dataset`, version 1):

    .idx  b"MMIDIDX\\x00\\x00" | <Q version=1 | <B dtype code | <Q n sequences | <Q n+1 doc indices
          | int32 lengths [n] | int64 byte pointers [n] | int64 document indices [n + 1]
    .bin  the tokens of every sequence, back to back, in that dtype

`IndexedWriter` writes exactly the bytes megatron-core's `IndexedDatasetBuilder.add_document(ids,
[len(ids)])` + `finalize` write (one sequence per document), but keeps the lengths as int32 arrays
(4 bytes a document, not two Python ints) and takes whole batches of documents at once.

megatron-core opens these files without checking them: a truncated `.bin` is found only when a
sample past its end is read (or never, with `mmap`), a bad `.idx` fails with a bare assert. So
training calls `validate_indexed_dataset` on every prefix before megatron-core sees it.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from neox.config import ConfigError

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
HEADER_BYTES = 9 + 8 + 1 + 8 + 8  # magic, version, dtype code, sequence count, document-index count
# megatron-core's DType codes
DTYPE_CODES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32,
               8: np.uint16}
CODE_OF = {np.dtype(v): k for k, v in DTYPE_CODES.items()}
_CHUNK = 1 << 24  # elements per step of the chunked scans (64 MB of int32)


class DataError(ConfigError):
    """A dataset named by the config is missing, truncated, corrupt, or does not fit the tokenizer."""


def best_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits below 65500 (megatron's rule, `DType.optimal_dtype`), else int32."""
    return np.dtype(np.uint16 if vocab_size is not None and vocab_size < 65500 else np.int32)


class IndexedWriter:
    """Write documents (one sequence each) to `bin_path`; `finalize(idx_path)` writes the index."""

    def __init__(self, bin_path: str | Path, dtype) -> None:
        self.dtype = np.dtype(dtype)
        assert self.dtype in CODE_OF, self.dtype
        self._file = open(bin_path, "wb")  # closed in finalize() or close()
        self._lengths: list[np.ndarray] = []
        self.num_documents = 0
        self.num_tokens = 0

    def add_document(self, ids) -> None:
        arr = np.asarray(ids, dtype=self.dtype)
        self.add_documents(arr, np.array([arr.size], dtype=np.int32))

    def add_documents(self, flat: np.ndarray, lengths: np.ndarray) -> None:
        """Append len(lengths) documents whose tokens are `flat` [sum(lengths)], back to back."""
        assert flat.dtype == self.dtype and flat.ndim == 1 and int(lengths.sum()) == flat.size
        self._file.write(memoryview(np.ascontiguousarray(flat)).cast("B"))
        self._lengths.append(np.asarray(lengths, dtype=np.int32))
        self.num_documents += int(lengths.size)
        self.num_tokens += int(flat.size)

    def finalize(self, idx_path: str | Path) -> None:
        self._file.close()
        lengths = np.concatenate(self._lengths) if self._lengths else np.zeros(0, np.int32)  # [n]
        n = lengths.size
        pointers = np.zeros(n, dtype=np.int64)  # [n] byte offset of each sequence in .bin
        if n > 1:
            np.cumsum(lengths[:-1].astype(np.int64) * self.dtype.itemsize, out=pointers[1:])
        with open(idx_path, "wb") as f:
            f.write(MAGIC + struct.pack("<Q", VERSION) + struct.pack("<B", CODE_OF[self.dtype]))
            f.write(struct.pack("<Q", n) + struct.pack("<Q", n + 1))
            f.write(lengths.tobytes())
            f.write(pointers.tobytes())
            f.write(np.arange(n + 1, dtype=np.int64).tobytes())  # document i = sequence i

    def close(self) -> None:
        """Give up: close the .bin without writing an index (the caller removes the files)."""
        self._file.close()


@dataclass
class IndexInfo:
    """What a valid prefix holds."""

    prefix: str
    dtype: np.dtype
    num_sequences: int
    num_documents: int
    num_tokens: int
    bin_bytes: int
    idx_bytes: int
    multimodal: bool


def _fail(path: str, what: str) -> DataError:
    return DataError(
        f"{path}: {what}. The dataset is truncated or corrupt (an interrupted copy or preprocessing?); "
        f"rebuild it with tools/preprocess_data.py or copy it again."
    )


def validate_indexed_dataset(prefix: str | Path) -> IndexInfo:
    """Check `prefix.idx` and `prefix.bin` against each other; raise DataError naming the first fault.

    Checks: both files exist; the header magic, version and dtype code; the .idx length against the
    counts it declares; document indices from 0 to n; every sequence pointer equals the running sum
    of the lengths before it; and the last pointer + last length * itemsize == the .bin size.
    """
    prefix = str(prefix)
    idx_path, bin_path = f"{prefix}.idx", f"{prefix}.bin"
    missing = [p for p in (idx_path, bin_path) if not os.path.isfile(p)]
    if missing:
        raise DataError(
            f"dataset prefix {prefix!r}: {' and '.join(missing)} not found; give the path without the "
            f"extension, as written by tools/preprocess_data.py (e.g. data/mydata_text_document)."
        )
    idx_bytes, bin_bytes = os.path.getsize(idx_path), os.path.getsize(bin_path)
    with open(idx_path, "rb") as f:
        head = f.read(HEADER_BYTES)
    if len(head) < HEADER_BYTES:
        raise _fail(idx_path, f"only {idx_bytes} bytes, shorter than the {HEADER_BYTES}-byte header")
    if head[:9] != MAGIC:
        raise _fail(idx_path, f"header {head[:9]!r} is not Megatron's mmap index magic {MAGIC!r}")
    (version,) = struct.unpack("<Q", head[9:17])
    if version != VERSION:
        raise _fail(idx_path, f"index version {version}, expected {VERSION}")
    code = head[17]
    if code not in DTYPE_CODES:
        raise _fail(idx_path, f"dtype code {code} is not one of megatron's {sorted(DTYPE_CODES)}")
    dtype = np.dtype(DTYPE_CODES[code])
    n, n_doc_idx = struct.unpack("<QQ", head[18:34])
    plain = HEADER_BYTES + n * 4 + n * 8 + n_doc_idx * 8
    if idx_bytes not in (plain, plain + n):
        raise _fail(idx_path, f"{idx_bytes} bytes, but its header declares {n} sequences and {n_doc_idx} "
                              f"document indices ({plain} bytes)")
    if n_doc_idx < 1:
        raise _fail(idx_path, "no document indices (a valid index has at least [0])")

    mm = np.memmap(idx_path, mode="r", dtype=np.uint8)
    lengths = np.frombuffer(mm, dtype=np.int32, count=n, offset=HEADER_BYTES)
    pointers = np.frombuffer(mm, dtype=np.int64, count=n, offset=HEADER_BYTES + 4 * n)
    doc_idx = np.frombuffer(mm, dtype=np.int64, count=n_doc_idx, offset=HEADER_BYTES + 12 * n)
    if doc_idx[0] != 0 or doc_idx[-1] != n:
        raise _fail(idx_path, f"document indices run from {doc_idx[0]} to {doc_idx[-1]}, expected 0 to {n}")
    item = dtype.itemsize
    total = 0  # tokens before the current chunk
    for beg in range(0, n, _CHUNK):
        ln = lengths[beg:beg + _CHUNK].astype(np.int64)
        if ln.size and ln.min() < 0:
            raise _fail(idx_path, f"negative sequence length near sequence {beg + int(np.argmin(ln))}")
        expected = (total + np.concatenate(([0], np.cumsum(ln)[:-1]))) * item
        bad = np.flatnonzero(pointers[beg:beg + _CHUNK] != expected)
        if bad.size:
            i = beg + int(bad[0])
            raise _fail(idx_path, f"sequence {i} starts at byte {int(pointers[i])}, but the lengths before it "
                                  f"put it at byte {int(expected[bad[0]])}")
        total += int(ln.sum())
    if total * item != bin_bytes:
        raise _fail(bin_path, f"{bin_bytes} bytes, but {idx_path} indexes {total} tokens of {dtype} "
                              f"= {total * item} bytes")
    info = IndexInfo(prefix, dtype, int(n), int(n_doc_idx) - 1, total, bin_bytes, idx_bytes, idx_bytes != plain)
    return info


def read_index(prefix: str | Path) -> tuple[IndexInfo, np.ndarray, np.ndarray]:
    """(validated info, sequence lengths int32 [n], document indices int64 [d + 1]) — copies, no mmap."""
    info = validate_indexed_dataset(prefix)
    n = info.num_sequences
    raw = np.fromfile(f"{info.prefix}.idx", dtype=np.uint8)
    lengths = np.frombuffer(raw, np.int32, n, HEADER_BYTES).copy()
    doc_idx = np.frombuffer(raw, np.int64, info.num_documents + 1, HEADER_BYTES + 12 * n).copy()
    return info, lengths, doc_idx


def read_document_tokens(prefix: str | Path, info: IndexInfo, lengths: np.ndarray, seq: int) -> np.ndarray:
    """The tokens of sequence `seq` (read from .bin at its offset)."""
    offset = int(lengths[:seq].astype(np.int64).sum()) * info.dtype.itemsize
    return np.fromfile(f"{info.prefix}.bin", dtype=info.dtype, count=int(lengths[seq]), offset=offset)


def token_range(prefix: str | Path, info: IndexInfo | None = None) -> tuple[int, int]:
    """(min, max) token id in `prefix.bin`, scanned in chunks through a memory map; (0, -1) if empty."""
    info = info or validate_indexed_dataset(prefix)
    if info.num_tokens == 0:
        return 0, -1
    data = np.memmap(f"{info.prefix}.bin", mode="r", dtype=info.dtype, shape=(info.num_tokens,))
    lo, hi = None, None
    for beg in range(0, info.num_tokens, _CHUNK):
        part = data[beg:beg + _CHUNK]
        lo = int(part.min()) if lo is None else min(lo, int(part.min()))
        hi = int(part.max()) if hi is None else max(hi, int(part.max()))
    del data
    return lo, hi


def check_token_range(prefix: str | Path, vocab_size: int, info: IndexInfo | None = None) -> int:
    """Raise DataError when any token id in `prefix.bin` is negative or >= vocab_size; return the max id."""
    info = info or validate_indexed_dataset(prefix)
    lo, hi = token_range(prefix, info)
    if hi < vocab_size and lo >= 0:
        return hi
    bad_value = hi if hi >= vocab_size else lo
    data = np.memmap(f"{info.prefix}.bin", mode="r", dtype=info.dtype, shape=(info.num_tokens,))
    pos = next(beg + int(np.argmax(data[beg:beg + _CHUNK] == bad_value))
               for beg in range(0, info.num_tokens, _CHUNK) if (data[beg:beg + _CHUNK] == bad_value).any())
    del data
    _, lengths, _ = read_index(prefix)
    seq = int(np.searchsorted(np.cumsum(lengths.astype(np.int64)), pos, side="right"))
    raise DataError(
        f"{info.prefix}.bin: token id {bad_value} (sequence {seq}, token {pos}) is outside the tokenizer's "
        f"vocabulary of {vocab_size} ids (max id in the data: {hi}). The data was tokenized with another "
        f"tokenizer: set tokenizer_type/vocab_file to that tokenizer, or re-run tools/preprocess_data.py "
        f"with this one."
    )


def merge_indexed_datasets(prefixes: list[str], output_prefix: str | Path) -> IndexInfo:
    """Concatenate datasets (in order) into `output_prefix` with megatron-core's builder `add_index`.

    Writes under temporary names and renames at the end; the caller decides about overwriting.
    """
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    if not prefixes:
        raise DataError("merge: no input datasets given")
    infos = [validate_indexed_dataset(p) for p in prefixes]
    dtypes = {str(i.dtype) for i in infos}
    if len(dtypes) > 1:
        listing = ", ".join(f"{i.prefix} ({i.dtype})" for i in infos)
        raise DataError(f"merge: the inputs have different token dtypes ({listing}); they were made with "
                        f"tokenizers of different vocabulary sizes and cannot share one index.")
    if any(i.multimodal for i in infos):
        raise DataError("merge: multimodal indexes (with sequence modes) are not supported")
    out = str(output_prefix)
    tmp = f"{out}.tmp-{os.getpid()}"
    builder = IndexedDatasetBuilder(f"{tmp}.bin", dtype=infos[0].dtype.type)
    try:
        for info in infos:
            builder.add_index(info.prefix)
        builder.finalize(f"{tmp}.idx")
        publish(tmp, out)
    except BaseException:
        builder.data_file.close()
        for ext in (".bin", ".idx"):
            Path(f"{tmp}{ext}").unlink(missing_ok=True)
        raise
    return validate_indexed_dataset(out)


def publish(tmp_prefix: str, prefix: str) -> None:
    """Move tmp_prefix.{bin,idx} to prefix.{bin,idx}: the old .idx goes first and the new one comes last,
    so a crash in between leaves no .idx (an incomplete dataset) rather than a mismatched pair."""
    Path(f"{prefix}.idx").unlink(missing_ok=True)
    os.replace(f"{tmp_prefix}.bin", f"{prefix}.bin")
    os.replace(f"{tmp_prefix}.idx", f"{prefix}.idx")

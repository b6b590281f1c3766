"""The embedded default corpus: text every Python installation carries, tokenized and indexed.

`make train` must work on a fresh machine with no download, so the corpus is the running
interpreter's own documentation topics (`pydoc_data.topics`) and standard-library sources, one
document per topic or module. From it we train a byte-level BPE tokenizer (the same kind as the
GPT-NeoX-20B one: ByteLevel pre-tokenizer and decoder, `<|endoftext|>` = 0, `<|padding|>` = 1) and
write Megatron `.bin/.idx` files with the preprocessing writer (neox.data.indexed; the same bytes as
megatron-core's `IndexedDatasetBuilder`).

Documents are ordered by a hash of their names, so the selection under `max_bytes` depends only on
the Python version, not on the machine. They are written in that order, and the held-out part is
where megatron-core's `split` (default "95,5,0", the same string the config gives) cuts: the
tokenizer is trained on the train documents only, so validation text is truly unseen.

The build is cached: a manifest (written last, atomically) holds the settings and checksums of the
inputs and outputs; a later call with the same settings and intact files returns at once.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import sysconfig
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

from neox.config import ConfigError
from neox.data.tokenizers import EOD_TOKEN, PAD_TOKEN

FORMAT_VERSION = 1
DATA_NAME = "corpus_text_document"
TOKENIZER_NAME = "tokenizer.json"
MANIFEST_NAME = "manifest.json"
# The filtered standard library is ~11 MB on CPython 3.11; all of it trains and writes in seconds.
DEFAULT_MAX_BYTES = 16_000_000
DEFAULT_VOCAB_SIZE = 8192
DEFAULT_SPLIT = "95,5,0"

_SKIP_TOP = {"site-packages", "dist-packages", "test", "idlelib", "turtledemo", "pydoc_data", "__phello__"}
_SKIP_ANY = {"test", "tests", "__pycache__"}
_MAX_FILE_BYTES = 300_000  # larger stdlib sources are generated tables, not prose or code to learn
_GENERATED = re.compile(r"generated (from|by)|auto-generated|do not edit", re.IGNORECASE)


def gather_documents() -> list[tuple[str, str]]:
    """All candidate documents as (name, text), sorted by name: pydoc topics, then stdlib modules."""
    docs: list[tuple[str, str]] = []
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions strip the pydoc data; the sources remain
        topics = {}
    for name in sorted(topics):
        docs.append((f"pydoc:{name}", topics[name]))

    root = Path(sysconfig.get_paths()["stdlib"])
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = Path(dirpath).relative_to(root)
        dirnames[:] = sorted(
            d
            for d in dirnames
            if d not in _SKIP_ANY
            and not (rel_dir == Path(".") and (d in _SKIP_TOP or d.startswith("config-")))
        )
        for fname in sorted(filenames):
            if not fname.endswith(".py"):
                continue
            path = Path(dirpath) / fname
            if path.stat().st_size > _MAX_FILE_BYTES:
                continue
            text = path.read_text(encoding="utf-8", errors="replace")
            if _GENERATED.search(text[:1000]):
                continue
            docs.append((f"stdlib:{(rel_dir / fname).as_posix()}", text))
    docs = [(n, t) for n, t in docs if t.strip()]
    docs.sort(key=lambda d: d[0])
    return docs


def select_documents(docs: list[tuple[str, str]], max_bytes: int) -> list[tuple[str, str]]:
    """The documents to write: hash-ordered by name, filled up to max_bytes."""
    ordered = sorted(docs, key=lambda d: hashlib.sha256(d[0].encode("utf-8")).hexdigest())
    chosen, total = [], 0
    for name, text in ordered:
        size = len(text.encode("utf-8"))
        if total + size <= max_bytes:
            chosen.append((name, text))
            total += size
    if not chosen:
        raise ConfigError(f"default corpus: max_bytes={max_bytes} admits no document; raise max_bytes.")
    return chosen


def split_counts(num_documents: int, split: str) -> tuple[int, int, int]:
    """How many documents megatron-core's `split` gives to train, valid and test (its own arithmetic)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets.blended_megatron_dataset_config import (
            convert_split_vector_to_split_matrix,
            parse_and_normalize_split,
        )

    try:
        matrix = convert_split_vector_to_split_matrix(parse_and_normalize_split(split))
    except (AssertionError, ZeroDivisionError, ValueError):
        raise ConfigError(f"default corpus: split {split!r} must be like '95,5,0' (train,valid,test)") from None
    bounds = [(0, 0) if m is None else (int(round(m[0] * num_documents)), int(round(m[1] * num_documents)))
              for m in matrix]
    assert bounds[0][0] == 0 and bounds[-1][1] in (0, num_documents)
    return tuple(end - beg for beg, end in bounds)  # type: ignore[return-value]


def train_bpe_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE `tokenizers.Tokenizer` with `<|endoftext|>` = 0 and `<|padding|>` = 1."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOD_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer, length=len(texts))
    assert tok.token_to_id(EOD_TOKEN) == 0 and tok.token_to_id(PAD_TOKEN) == 1
    return tok


def write_indexed_dataset(prefix: str | Path, docs_ids: list[list[int]], eod: int, vocab_size: int) -> int:
    """Write one Megatron document (ids + eod) per entry to prefix.{bin,idx}; returns token count.

    Uses the same writer as tools/preprocess_data.py (bytes identical to megatron-core's builder).
    """
    import numpy as np

    from neox.data.indexed import IndexedWriter, best_dtype

    writer = IndexedWriter(f"{prefix}.bin", best_dtype(vocab_size))  # uint16 below 65500 tokens, else int32
    docs = [[*ids, eod] for ids in docs_ids]
    lengths = np.fromiter(map(len, docs), dtype=np.int32, count=len(docs))
    writer.add_documents(np.fromiter((t for d in docs for t in d), dtype=writer.dtype, count=int(lengths.sum())),
                         lengths)
    writer.finalize(f"{prefix}.idx")
    return writer.num_tokens


def build_default_corpus(
    out_dir: str | Path,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    split: str = DEFAULT_SPLIT,
    force: bool = False,
    log: Callable[[str], None] | None = print,
) -> dict:
    """Build (or find cached) the default corpus in out_dir; returns its paths and sizes.

    `split` ("train,valid,test" weights, as gpt-neox's) decides which documents the tokenizer may
    see; give the training config the same data_path and split. Keys of the result: out_dir,
    tokenizer_file, data_prefix, bin, idx, manifest, split, num_documents, num_train_documents,
    num_valid_documents, num_test_documents, num_tokens, num_bytes, vocab_size, checksums, cached.
    """
    import tokenizers

    if vocab_size < 300:
        raise ConfigError(f"default corpus: vocab_size={vocab_size} is below the 258 byte-level symbols.")
    say = log or (lambda _msg: None)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    with _locked(out / ".lock"):
        docs = select_documents(gather_documents(), max_bytes)
        n_train, n_valid, n_test = split_counts(len(docs), split)
        if n_train == 0 or any(w > 0 and n == 0 for w, n in zip(_weights(split), (n_train, n_valid, n_test))):
            raise ConfigError(
                f"default corpus: split {split!r} leaves a part of the {len(docs)} documents empty; "
                f"raise max_bytes={max_bytes} or change the split."
            )
        settings = {
            "format_version": FORMAT_VERSION,
            "max_bytes": int(max_bytes),
            "vocab_size": int(vocab_size),
            "split": str(split),
            "tokenizers_version": tokenizers.__version__,
            "inputs_sha256": _docs_checksum(docs),
        }
        manifest = None if force else _valid_manifest(out, settings)
        if manifest is not None:
            result = _result(out, manifest, cached=True)
            say(
                f"default corpus cached in {out} ({result['num_documents']} documents, "
                f"{result['num_tokens'] / 1e6:.2f}M tokens; checked in {time.perf_counter() - t0:.1f} s)"
            )
            return result

        n_bytes = sum(len(t.encode("utf-8")) for _, t in docs)
        say(
            f"default corpus: {len(docs)} documents ({n_train} train, {n_valid} valid, {n_test} test), "
            f"{n_bytes / 1e6:.1f} MB from Python's docs and standard library"
        )
        (out / MANIFEST_NAME).unlink(missing_ok=True)  # from here on the old build is not "done"
        shutil.rmtree(out / f"{DATA_NAME}_cache", ignore_errors=True)  # stale dataset indices
        tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=out))
        try:
            t1 = time.perf_counter()
            tok = train_bpe_tokenizer([t for _, t in docs[:n_train]], vocab_size)
            tok.save(str(tmp / TOKENIZER_NAME))
            real_vocab = tok.get_vocab_size(with_added_tokens=True)
            say(f"  tokenizer: byte-level BPE, {real_vocab} tokens ({time.perf_counter() - t1:.1f} s)")

            t2 = time.perf_counter()
            ids = [e.ids for e in tok.encode_batch([t for _, t in docs], add_special_tokens=False)]
            n_tokens = write_indexed_dataset(tmp / DATA_NAME, ids, eod=0, vocab_size=real_vocab)
            say(f"  {DATA_NAME}.bin/.idx: {n_tokens / 1e6:.2f}M tokens in {time.perf_counter() - t2:.1f} s")

            files = [TOKENIZER_NAME, f"{DATA_NAME}.bin", f"{DATA_NAME}.idx"]
            manifest = {
                "settings": settings,
                "split": str(split),
                "num_documents": len(docs),
                "num_train_documents": n_train,
                "num_valid_documents": n_valid,
                "num_test_documents": n_test,
                "num_tokens": n_tokens,
                "num_bytes": n_bytes,
                "vocab_size": real_vocab,
                "documents": [n for n, _ in docs],
                "checksums": {f: _file_checksum(tmp / f) for f in files},
            }
            for f in files:
                os.replace(tmp / f, out / f)
            _write_json_atomic(out / MANIFEST_NAME, manifest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        say(f"  built in {time.perf_counter() - t0:.1f} s -> {out}")
        return _result(out, manifest, cached=False)


def _result(out: Path, manifest: dict, cached: bool) -> dict:
    prefix = out / DATA_NAME
    return {
        "out_dir": str(out),
        "tokenizer_file": str(out / TOKENIZER_NAME),
        "data_prefix": str(prefix),
        "bin": f"{prefix}.bin",
        "idx": f"{prefix}.idx",
        "manifest": str(out / MANIFEST_NAME),
        "cached": cached,
        **{k: manifest[k] for k in ("split", "num_documents", "num_train_documents", "num_valid_documents",
                                     "num_test_documents", "num_tokens", "num_bytes", "vocab_size",
                                     "checksums")},
    }


def _valid_manifest(out: Path, settings: dict) -> dict | None:
    """The manifest when it matches `settings` and every output file still has its checksum."""
    try:
        manifest = json.loads((out / MANIFEST_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("settings") != settings:
        return None
    checksums = manifest.get("checksums") or {}
    for fname, digest in checksums.items():
        path = out / fname
        if not path.is_file() or _file_checksum(path) != digest:
            return None
    return manifest if len(checksums) == 3 else None


def _weights(split: str) -> list[float]:
    parts = [float(x) for x in re.findall(r"[.0-9]+", split)]
    return parts + [0.0] * (3 - len(parts))


def _docs_checksum(docs: list[tuple[str, str]]) -> str:
    h = hashlib.sha256()
    for name, text in docs:
        for part in (name, text):
            data = part.encode("utf-8")
            h.update(len(data).to_bytes(8, "little"))
            h.update(data)
    return h.hexdigest()


def _file_checksum(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _write_json_atomic(path: Path, obj: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True), encoding="utf-8")
    os.replace(tmp, path)


@contextlib.contextmanager
def _locked(lock_path: Path):
    """An exclusive file lock, so concurrent ranks or commands build the corpus once."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no locking
        yield
        return
    with open(lock_path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)

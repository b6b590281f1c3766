"""Raw text -> tokenized Megatron `.bin/.idx`, streaming, in parallel, in input order.

Inputs (by file name; `.zst`, `.gz` or `.xz` may follow, decompressed as a stream):
- `.jsonl` / `.ndjson`: one JSON object a line (the Pile's format: {"text": ..., "meta": {...}});
  each of `jsonl_keys` is a text field and goes to its own output `{prefix}_{key}_document`.
- `.txt` / `.text`: `text_docs="file"` (default, as lm_dataformat/gpt-neox read .txt) makes each file
  one document; `text_docs="line"` makes each non-empty line one (enwik8-style line data).

Pipeline: the main process reads raw bytes in chunks of about `chunk_bytes` (cut at line ends; it
only counts newlines, for error line numbers), hands each chunk to a pool of `workers` processes
which parse the JSON and tokenize the whole chunk with one `tokenize_batch` call, and writes the
returned token arrays in submission order (so the output does not depend on `workers`). At most
2 * workers + 2 chunks are in flight, so memory stays flat whatever the input size.

Documents whose text gives no tokens are skipped and counted (as Megatron: a 0-length document is
never written). Outputs are written under temporary names and renamed at the end, so an interrupted
run leaves no half-written dataset under the final name.
"""

from __future__ import annotations

import contextlib
import glob
import io
import itertools
import json
import multiprocessing as mp
import os
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from neox.config import ConfigError
from neox.data.indexed import DataError, IndexedWriter, best_dtype, publish

JSONL_EXTS = (".jsonl", ".ndjson")
TEXT_EXTS = (".txt", ".text")
COMPRESSED = {".zst": "zstd", ".zstd": "zstd", ".gz": "gzip", ".xz": "xz"}
TEXT_DOCS = ("file", "line")
DEFAULT_CHUNK_BYTES = 1 << 20
_MAX_EXAMPLES = 5  # bad lines quoted in the final report


def input_format(path: str | Path) -> tuple[str, str | None]:
    """("jsonl" | "text", compression or None) from the file name; ConfigError when unsupported."""
    name = Path(path).name.lower()
    comp = next((c for ext, c in COMPRESSED.items() if name.endswith(ext)), None)
    if comp:
        name = name[: name.rfind(".")]
    if name.endswith(JSONL_EXTS):
        return "jsonl", comp
    if name.endswith(TEXT_EXTS):
        return "text", comp
    raise ConfigError(
        f"input {str(path)!r}: unknown format; preprocess_data reads {', '.join(JSONL_EXTS + TEXT_EXTS)} files, "
        f"optionally compressed ({', '.join(COMPRESSED)}). Rename the file or convert it to .jsonl."
    )


def expand_inputs(spec: str | Sequence[str]) -> list[Path]:
    """Files named by `spec`: a path, a glob, a folder (its supported files, recursively), or a
    comma-separated list of those. Order: as given, each glob/folder sorted; duplicates dropped."""
    if isinstance(spec, os.PathLike):
        spec = [os.fspath(spec)]  # a Path is one item, commas and all
    items = [str(s).strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if str(s).strip()]
    if not items:
        raise ConfigError("--input is empty: give a file, a glob (quoted) or a comma-separated list")
    files: list[Path] = []
    for item in map(str, items):
        if glob.has_magic(item):
            found = sorted(p for p in glob.glob(item, recursive=True) if os.path.isfile(p))
            if not found:
                raise ConfigError(f"--input: no file matches {item!r}")
        elif os.path.isdir(item):
            found = sorted(str(p) for p in Path(item).rglob("*") if p.is_file() and _supported(p))
            if not found:
                raise ConfigError(f"--input: folder {item!r} holds no .jsonl/.txt files (compressed or not)")
        elif os.path.isfile(item):
            found = [item]
        else:
            raise ConfigError(f"--input: {item!r} does not exist")
        files.extend(Path(p) for p in found)
    for f in files:
        input_format(f)
    return list(dict.fromkeys(files))


def _supported(path: Path) -> bool:
    try:
        input_format(path)
        return True
    except ConfigError:
        return False


def open_stream(path: str | Path):
    """A binary stream of the file's decompressed bytes (never reads the whole file)."""
    _, comp = input_format(path)
    if comp == "zstd":
        return _ZstdReader(path)
    if comp == "gzip":
        import gzip

        return gzip.open(path, "rb")
    if comp == "xz":
        import lzma

        return lzma.open(path, "rb")
    return open(path, "rb")


class _ZstdReader(io.RawIOBase):
    """Decompress a (multi-frame) .zst file as a stream, and fail on a truncated last frame, which
    zstandard's own `stream_reader` ends silently (documents would be lost without a word)."""

    def __init__(self, path: str | Path) -> None:
        import zstandard

        self._path = path
        self._raw = open(path, "rb")  # closed in close()
        self._dctx = zstandard.ZstdDecompressor(max_window_size=1 << 31)
        self._obj = self._dctx.decompressobj()
        self._fed = False  # the current frame has had input
        self._buf = bytearray()

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        while n < 0 or len(self._buf) < n:
            comp = self._raw.read(1 << 20)
            if not comp:
                if self._fed and not self._obj.eof:
                    raise EOFError("the last zstd frame ends early")
                break
            while comp:
                self._buf += self._obj.decompress(comp)
                self._fed = True
                comp = b""
                if self._obj.eof:  # next frame, if any, starts in unused_data
                    comp = self._obj.unused_data
                    self._obj, self._fed = self._dctx.decompressobj(), False
        n = len(self._buf) if n < 0 else min(n, len(self._buf))
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out

    def close(self) -> None:
        self._raw.close()
        super().close()


@dataclass
class Task:
    """A chunk of input: `data` holds whole lines (jsonl / text lines) or whole files (text files)."""

    kind: str  # "jsonl" | "lines" | "files"
    file_no: int
    first_line: int
    data: bytes | list[bytes]


def read_tasks(files: Sequence[Path], chunk_bytes: int = DEFAULT_CHUNK_BYTES, text_docs: str = "file"
               ) -> Iterator[Task]:
    """Cut the inputs into Tasks of about chunk_bytes, in order."""
    pending_files: list[bytes] = []  # whole text files waiting to fill a task
    pending_size, pending_no = 0, 0
    for file_no, path in enumerate(files):
        fmt, _ = input_format(path)
        with _read_errors(path), open_stream(path) as stream:
            if fmt == "text" and text_docs == "file":
                data = stream.read()
                if pending_files and pending_size + len(data) > chunk_bytes:
                    yield Task("files", pending_no, 0, pending_files)
                    pending_files, pending_size = [], 0
                if not pending_files:
                    pending_no = file_no
                pending_files.append(data)
                pending_size += len(data)
                continue
            kind = "jsonl" if fmt == "jsonl" else "lines"
            for first_line, data in _line_chunks(stream, chunk_bytes):
                yield Task(kind, file_no, first_line, data)
    if pending_files:
        yield Task("files", pending_no, 0, pending_files)


def _line_chunks(stream, chunk_bytes: int) -> Iterator[tuple[int, bytes]]:
    """(number of the first line, bytes of whole lines) pieces of a stream."""
    line_no, carry = 1, []
    while True:
        block = stream.read(chunk_bytes)
        if not block:
            break
        cut = block.rfind(b"\n")
        if cut < 0:  # a line longer than a chunk: keep reading
            carry.append(block)
            continue
        data = b"".join([*carry, block[: cut + 1]])
        carry = [block[cut + 1:]] if cut + 1 < len(block) else []
        yield line_no, data
        line_no += data.count(b"\n")
    tail = b"".join(carry)
    if tail:
        yield line_no, tail


@contextlib.contextmanager
def _read_errors(path: Path):
    """Decompression and I/O failures name the file."""
    import lzma
    import zlib

    errors: tuple = (OSError, EOFError, lzma.LZMAError, zlib.error)
    try:
        import zstandard

        errors += (zstandard.ZstdError,)
    except ImportError:
        pass
    try:
        yield
    except errors as e:
        raise DataError(f"{path}: cannot read it ({type(e).__name__}: {e}); the file is truncated or "
                        f"corrupt. Replace it, or leave it out of --input.") from None


# ---- worker side ------------------------------------------------------------------------------


@dataclass
class _Settings:
    tokenizer: object
    keys: tuple[str, ...]
    append_eod: bool
    dtype: np.dtype
    skip_bad_lines: bool
    file_names: list[str]
    ftfy: bool = False


_STATE: dict = {}  # the worker's settings, set once per process by _init_worker


def _init_worker(settings: _Settings) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per worker: the pool is the parallelism
    _STATE["s"] = settings


@dataclass
class ChunkResult:
    records: int = 0
    bytes: int = 0
    bad: int = 0
    bad_examples: list[str] = field(default_factory=list)
    error: str | None = None
    outputs: dict = field(default_factory=dict)  # key -> (flat tokens [sum], lengths int32 [docs], n_empty)


def encode_task(task: Task) -> ChunkResult:
    """Parse and tokenize one chunk (in a worker, or in the main process when workers == 1)."""
    s: _Settings = _STATE["s"]
    res = ChunkResult()
    texts: dict[str, list[str]] = {k: [] for k in s.keys}
    if task.kind == "files":
        res.bytes = sum(map(len, task.data))
        texts[s.keys[0]] = [d.decode("utf-8", errors="replace") for d in task.data]
        res.records = len(task.data)
    elif task.kind == "lines":
        res.bytes = len(task.data)
        lines = (ln.decode("utf-8", errors="replace").rstrip("\r") for ln in task.data.split(b"\n"))
        texts[s.keys[0]] = [ln for ln in lines if ln.strip()]  # split at \n only, as the jsonl reader
        res.records = len(texts[s.keys[0]])
    else:
        res.bytes = len(task.data)
        for i, line in enumerate(task.data.split(b"\n")):
            if not line.strip():
                continue
            problem, record = _parse_line(line, s.keys)
            if problem is None:
                for k in s.keys:
                    texts[k].append(record[k])
                res.records += 1
                continue
            where = f"{s.file_names[task.file_no]}:{task.first_line + i}"
            if not s.skip_bad_lines:
                res.error = (f"{where}: {problem}. Fix the input, or pass --skip-bad-lines to skip such lines "
                             f"(they are counted and reported).")
                return res
            res.bad += 1
            if len(res.bad_examples) < _MAX_EXAMPLES:
                res.bad_examples.append(f"{where}: {problem}")
    for key in s.keys:
        res.outputs[key] = _tokenize(s, texts[key])
    return res


def _parse_line(line: bytes, keys: Sequence[str]) -> tuple[str | None, dict | None]:
    try:
        record = json.loads(line)
    except UnicodeDecodeError as e:
        return f"not valid UTF-8 ({e.reason} at byte {e.start})", None
    except json.JSONDecodeError as e:
        return f"malformed JSON ({e.msg} at column {e.colno})", None
    if not isinstance(record, dict):
        return f"the line is JSON but not an object (a {type(record).__name__})", None
    for k in keys:
        if k not in record:
            return (f"no key {k!r} in this record (its keys: {', '.join(map(repr, record)) or 'none'}); "
                    f"choose the text field with --jsonl-keys"), None
        if not isinstance(record[k], str):
            return f"key {k!r} holds a {type(record[k]).__name__}, not text", None
    return None, record


def _tokenize(s: _Settings, texts: list[str]) -> tuple[np.ndarray, np.ndarray, int]:
    """(flat tokens in s.dtype, int32 lengths of the non-empty documents, how many were empty)."""
    if s.ftfy:
        import ftfy

        texts = [ftfy.fix_text(t) for t in texts]
    ids = s.tokenizer.tokenize_batch(texts) if texts else []
    docs = [d for d in ids if len(d)]
    if s.append_eod:
        eod = s.tokenizer.eod
        for d in docs:
            d.append(eod)
    lengths = np.fromiter(map(len, docs), dtype=np.int32, count=len(docs))
    flat = np.fromiter(itertools.chain.from_iterable(docs), dtype=s.dtype, count=int(lengths.sum()))
    return flat, lengths, len(ids) - len(docs)


# ---- main process -----------------------------------------------------------------------------


def output_prefixes(output_prefix: str | Path, keys: Sequence[str]) -> dict[str, str]:
    """gpt-neox's output names: `{output_prefix}_{key}_document` (+ .bin / .idx)."""
    return {k: f"{output_prefix}_{k}_document" for k in keys}


def preprocess(
    inputs: str | Sequence[str],
    output_prefix: str | Path,
    tokenizer,
    *,
    jsonl_keys: Sequence[str] = ("text",),
    append_eod: bool = False,
    workers: int = 1,
    skip_bad_lines: bool = False,
    overwrite: bool = False,
    num_docs: int | None = None,
    log_interval: int = 10_000,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    text_docs: str = "file",
    ftfy: bool = False,
    progress: bool | None = None,
    log: Callable[[str], None] | None = print,
) -> dict:
    """Tokenize `inputs` into `{output_prefix}_{key}_document.{bin,idx}`; returns counts per output.

    `tokenizer` is a neox.data.tokenizers Tokenizer (it must pickle when the platform cannot fork).
    `num_docs` is only the progress bar's total (as gpt-neox). Result keys: outputs {key: {prefix,
    documents, tokens, empty}}, records, bad_lines, bad_examples, bytes, seconds, files, dtype, workers.
    """
    say = log or (lambda _m: None)
    keys = tuple(dict.fromkeys(jsonl_keys))
    if not keys:
        raise ConfigError("--jsonl-keys: give at least one key")
    if workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {workers}")
    if text_docs not in TEXT_DOCS:
        raise ConfigError(f"text_docs must be one of {TEXT_DOCS}, got {text_docs!r}")
    if ftfy:
        try:
            import ftfy as _  # noqa: F401
        except ImportError:
            raise ConfigError("--ftfy needs the ftfy package: pip install ftfy") from None
    files = expand_inputs(inputs)
    if len(keys) > 1 and any(input_format(f)[0] == "text" for f in files):
        raise ConfigError(f"--jsonl-keys {' '.join(keys)}: text files have a single field; give one key")
    finals = output_prefixes(output_prefix, keys)
    existing = [f"{p}{ext}" for p in finals.values() for ext in (".bin", ".idx") if os.path.exists(f"{p}{ext}")]
    if existing and not overwrite:
        raise ConfigError(f"output exists: {', '.join(existing)}; pass --overwrite to replace it, or choose "
                          f"another --output-prefix")
    Path(finals[keys[0]]).parent.mkdir(parents=True, exist_ok=True)

    dtype = best_dtype(tokenizer.vocab_size)
    settings = _Settings(tokenizer, keys, append_eod, dtype, skip_bad_lines, [str(f) for f in files], ftfy)
    temps = {k: f"{p}.tmp-{os.getpid()}" for k, p in finals.items()}
    writers = {k: IndexedWriter(f"{t}.bin", dtype) for k, t in temps.items()}
    totals = {"records": 0, "bytes": 0, "bad": 0, "tokens": 0}
    examples: list[str] = []
    empty = dict.fromkeys(keys, 0)
    show_bar = sys.stderr.isatty() if progress is None else progress
    t0 = time.perf_counter()
    say(f"preprocess: {len(files)} input file(s) -> {output_prefix}_{{{','.join(keys)}}}_document "
        f"({type(tokenizer).__name__}, vocab {tokenizer.vocab_size}, {dtype.name}, {workers} worker(s))")

    from tqdm import tqdm

    bar = tqdm(total=num_docs, unit=" docs", disable=not show_bar, dynamic_ncols=True, mininterval=0.5)
    last_log = [0, t0]

    def consume(res: ChunkResult) -> None:
        if res.error:
            raise DataError(res.error)
        totals["records"] += res.records
        totals["bytes"] += res.bytes
        totals["bad"] += res.bad
        examples.extend(res.bad_examples[: _MAX_EXAMPLES - len(examples)])
        for key, (flat, lengths, n_empty) in res.outputs.items():
            writers[key].add_documents(flat, lengths)
            empty[key] += n_empty
            totals["tokens"] += flat.size
        dt = max(time.perf_counter() - t0, 1e-9)
        rates = f"{totals['tokens'] / dt / 1e3:,.0f}k tok/s, {totals['bytes'] / dt / 1e6:.1f} MB/s"
        bar.update(res.records)
        bar.set_postfix_str(rates, refresh=False)
        if not show_bar and totals["records"] - last_log[0] >= log_interval and time.perf_counter() - last_log[1] > 2:
            say(f"  {totals['records']:,} docs ({totals['records'] / dt:,.0f} docs/s, {rates})")
            last_log[:] = [totals["records"], time.perf_counter()]

    try:
        tasks = read_tasks(files, chunk_bytes, text_docs)
        if workers == 1:
            with _env("TOKENIZERS_PARALLELISM", "false"):
                _init_worker(settings)
                for task in tasks:
                    consume(encode_task(task))
        else:
            method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
            with mp.get_context(method).Pool(workers, initializer=_init_worker, initargs=(settings,)) as pool:
                pending: deque = deque()
                try:
                    for task in tasks:
                        pending.append(pool.apply_async(encode_task, (task,)))
                        if len(pending) >= 2 * workers + 2:
                            consume(pending.popleft().get())
                    while pending:
                        consume(pending.popleft().get())
                except BaseException:
                    # Let the workers finish their few queued chunks and exit before the pool is torn down:
                    # Pool.terminate() right away can kill a worker that holds the task queue's lock, and
                    # then waits on that lock forever (a bad input line hung a CI run this way).
                    pool.close()
                    pool.join()
                    raise
        bar.close()
        for key, w in writers.items():
            if w.num_documents == 0:
                raise DataError(f"no documents with text under key {key!r} in {len(files)} input file(s) "
                                f"({totals['records']} records, {empty[key]} empty, {totals['bad']} bad lines); "
                                f"nothing written")
            w.finalize(f"{temps[key]}.idx")
        for key in keys:
            publish(temps[key], finals[key])
    except BaseException:
        bar.close()
        for key, w in writers.items():
            w.close()
            for ext in (".bin", ".idx"):
                Path(f"{temps[key]}{ext}").unlink(missing_ok=True)
        raise
    finally:
        _STATE.pop("s", None)

    seconds = time.perf_counter() - t0
    result = {
        "outputs": {k: {"prefix": finals[k], "documents": writers[k].num_documents,
                        "tokens": writers[k].num_tokens, "empty": empty[k]} for k in keys},
        "records": totals["records"], "bad_lines": totals["bad"], "bad_examples": examples,
        "bytes": totals["bytes"], "seconds": seconds, "files": [str(f) for f in files], "dtype": dtype.name,
        "workers": workers,
    }
    _report(result, say)
    return result


def _report(r: dict, say: Callable[[str], None]) -> None:
    dt = max(r["seconds"], 1e-9)
    toks = sum(o["tokens"] for o in r["outputs"].values())
    say(f"done: {r['records']:,} documents, {toks:,} tokens, {r['bytes'] / 1e6:,.1f} MB in {dt:.1f} s "
        f"({r['records'] / dt:,.0f} docs/s, {toks / dt / 1e3:,.0f}k tok/s, {r['bytes'] / dt / 1e6:.1f} MB/s)")
    for key, o in r["outputs"].items():
        skipped = f"; {o['empty']:,} empty documents skipped" if o["empty"] else ""
        say(f"  {key}: {o['prefix']}.bin/.idx  {o['documents']:,} documents, {o['tokens']:,} tokens{skipped}")
    if r["bad_lines"]:
        say(f"  skipped {r['bad_lines']:,} bad line(s) (--skip-bad-lines), e.g.:")
        for e in r["bad_examples"]:
            say(f"    {e}")


@contextlib.contextmanager
def _env(name: str, value: str):
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old

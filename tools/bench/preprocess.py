"""Preprocessing throughput, side by side on one generated Pile-style input (.jsonl.zst with `meta`).

    python tools/bench/preprocess.py [--mb 20] [--repeats 3] [--workers 2] [--keep DIR]

Rows (tokens/s, medians of --repeats runs):
- preprocess_data (--workers N): neox.data.preprocess, the tools/preprocess_data.py path;
- plain loop: one document at a time (json.loads, tokenize, add to megatron-core's
  IndexedDatasetBuilder), which is what gpt-neox's preprocess_data.py does with one worker;
- encode_batch in memory, 1 thread and all threads: the bare tokenizer on texts already decoded,
  no reading, parsing or writing (the ceiling).
Uses the GPT-NeoX-20B tokenizer from ../shared/data when present, else a byte-level BPE trained on
the generated text. The preprocess output is checked to be byte-identical to the plain loop's.
"""

from __future__ import annotations

import argparse
import filecmp
import io
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

import numpy as np  # noqa: E402

SHARED_TOKENIZER = Path(os.environ.get("NEOX_SHARED_DATA", ROOT.parent / "shared" / "data")) / "20B_tokenizer.json"


def english_words() -> list[str]:
    """Words of Python's own documentation (real English, no download)."""
    import re
    from pydoc_data.topics import topics

    words = re.findall(r"[A-Za-z][a-z]{1,14}", " ".join(topics[k] for k in sorted(topics)))
    return sorted(set(words))


def generate_input(path: Path, megabytes: float, seed: int = 0) -> int:
    """Write a .jsonl.zst of documents of 1-8 KB of Zipf-distributed words; returns documents."""
    import zstandard

    rng = np.random.default_rng(seed)
    words = np.array(english_words())
    p = 1.0 / np.arange(1, len(words) + 1)
    p /= p.sum()
    target, size, n = int(megabytes * 1e6), 0, 0
    cctx = zstandard.ZstdCompressor(level=3)
    with open(path, "wb") as raw, cctx.stream_writer(raw) as out:
        while size < target:
            n_words = int(rng.integers(150, 1300))
            w = words[rng.choice(len(words), size=n_words, p=p)]
            ends = rng.random(n_words) < 0.08
            sentences = " ".join(f"{x}." if e else str(x) for x, e in zip(w, ends)).split(". ")
            sentences = [s[:1].upper() + s[1:] for s in sentences]
            text = ".\n\n".join(". ".join(sentences[i:i + 5]) for i in range(0, len(sentences), 5))
            line = json.dumps({"text": text, "meta": {"pile_set_name": "Bench", "id": n}}) + "\n"
            out.write(line.encode())
            size += len(line)
            n += 1
    return n


def read_texts(path: Path) -> list[str]:
    from neox.data.preprocess import open_stream

    with open_stream(path) as f:
        return [json.loads(line)["text"] for line in io.TextIOWrapper(f, encoding="utf-8")]


def plain_loop(path: Path, tok, prefix: str) -> int:
    """gpt-neox's single-worker loop: one document at a time into megatron-core's builder."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    from neox.data.preprocess import open_stream

    dtype = DType.optimal_dtype(tok.vocab_size)
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=dtype)
    n = 0
    with open_stream(path) as f:
        for line in io.TextIOWrapper(f, encoding="utf-8"):
            ids = tok.tokenize(json.loads(line)["text"])
            if not ids:
                continue
            ids.append(tok.eod)
            builder.add_document(np.array(ids, dtype=dtype), [len(ids)])
            n += len(ids)
    builder.finalize(f"{prefix}.idx")
    return n


def bare_encode_batch(texts: list[str], tok, threads: str) -> int:
    os.environ["TOKENIZERS_PARALLELISM"] = threads
    return sum(len(ids) + 1 for ids in tok.tokenize_batch(texts) if ids)


def build_bench_tokenizer(work: Path, input_path: Path):
    from neox.data.tokenizers import build_tokenizer

    if SHARED_TOKENIZER.is_file():
        return build_tokenizer("HFTokenizer", SHARED_TOKENIZER), "GPT-NeoX-20B (HFTokenizer)"
    from neox.data.default_corpus import train_bpe_tokenizer

    texts = read_texts(input_path)[:2000]
    train_bpe_tokenizer(texts, 8192).save(str(work / "bpe.json"))
    return build_tokenizer("HFTokenizer", work / "bpe.json"), "byte-level BPE 8192 trained on the input"


def run(mb: float, repeats: int, workers: int, work: Path, log=print) -> dict:
    import warnings

    from neox.data.preprocess import preprocess

    with warnings.catch_warnings():  # import megatron-core (seconds: it pulls in torch) outside the timings
        warnings.simplefilter("ignore")
        import megatron.core.datasets.indexed_dataset  # noqa: F401

    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # no tokenizer threads before the pool forks
    inp = work / "bench.jsonl.zst"
    t0 = time.perf_counter()
    n_docs = generate_input(inp, mb)
    in_bytes = sum(len(t.encode()) for t in read_texts(inp))
    tok, tok_name = build_bench_tokenizer(work, inp)
    log(f"input: {inp} ({n_docs:,} documents, {in_bytes / 1e6:.1f} MB of text, "
        f"{inp.stat().st_size / 1e6:.1f} MB compressed; made in {time.perf_counter() - t0:.1f} s); "
        f"tokenizer: {tok_name}; {os.cpu_count()} CPUs")

    times: dict[str, list[float]] = {"pp": [], "plain": [], "bare1": [], "bareN": []}
    cpu: dict[str, list[float]] = {k: [] for k in times}
    tokens: dict[str, int] = {}

    def timed(key, fn):
        c, t = _cpu(), time.perf_counter()
        out = fn()
        times[key].append(time.perf_counter() - t)
        cpu[key].append(_cpu() - c)
        return out

    for r in range(repeats):
        res = timed("pp", lambda: preprocess(str(inp), work / "pp", tok, append_eod=True, workers=workers,
                                             overwrite=True, progress=False, log=None))
        tokens["pp"] = res["outputs"]["text"]["tokens"]
        tokens["plain"] = timed("plain", lambda: plain_loop(inp, tok, str(work / "plain")))
        log(f"  repeat {r + 1}: preprocess {times['pp'][-1]:.2f} s ({cpu['pp'][-1]:.2f} CPU-s), "
            f"plain loop {times['plain'][-1]:.2f} s ({cpu['plain'][-1]:.2f} CPU-s)")
    identical = all(filecmp.cmp(work / f"pp_text_document{e}", work / f"plain{e}", shallow=False)
                    for e in (".bin", ".idx"))
    texts = read_texts(inp)
    for key, threads in (("bare1", "false"), ("bareN", "true")):
        for _ in range(repeats):
            tokens[key] = timed(key, lambda threads=threads: bare_encode_batch(texts, tok, threads))
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    assert len(set(tokens.values())) == 1, tokens
    med = {k: statistics.median(v) for k, v in times.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    return {"tokens": tokens["pp"], "bytes": in_bytes, "docs": n_docs, "median_s": med, "all_s": times,
            "median_cpu_s": med_cpu, "load_avg": os.getloadavg()[0],
            "identical": identical, "tokenizer": tok_name, "workers": workers}


def _cpu() -> float:
    """CPU seconds of this process (all threads) and of its finished children (pool workers)."""
    import resource

    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def table(r: dict) -> str:
    n, b, med, cpu = r["tokens"], r["bytes"], r["median_s"], r["median_cpu_s"]
    rows = [("preprocess_data.py", f"--workers {r['workers']}", "pp"),
            ("plain loop (gpt-neox, 1 worker)", "1 process", "plain"),
            ("encode_batch in memory", "1 thread", "bare1"),
            ("encode_batch in memory (ceiling)", f"{os.cpu_count()} threads", "bareN")]
    out = [f"{'path':34} {'parallelism':>12} {'median s':>9} {'CPU-s':>6} {'Mtok/s':>8} {'MB/s':>7} "
           f"{'vs plain':>9} {'vs ceiling':>11}"]
    for name, par, k in rows:
        s = med[k]
        out.append(f"{name:34} {par:>12} {s:9.2f} {cpu[k]:6.2f} {n / s / 1e6:8.3f} {b / s / 1e6:7.2f} "
                   f"{med['plain'] / s:8.2f}x {med['bareN'] / s:10.2f}x")
    out.append(f"{n:,} tokens; preprocess output byte-identical to the plain loop's: {r['identical']}; "
               f"load average at the end {r['load_avg']:.1f} on {os.cpu_count()} CPUs")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mb", type=float, default=20.0, help="size of the generated input, MB of JSON (default 20)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--keep", default=None, help="work in this folder and keep it (default: a temp folder)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = p.parse_args(argv)
    if args.keep:
        Path(args.keep).mkdir(parents=True, exist_ok=True)
        r = run(args.mb, args.repeats, args.workers, Path(args.keep))
    else:
        with tempfile.TemporaryDirectory(prefix="neox_bench_pp_") as d:
            r = run(args.mb, args.repeats, args.workers, Path(d))
    print(table(r))
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=1), encoding="utf-8")
    return 0 if r["identical"] else 1


if __name__ == "__main__":
    sys.exit(main())

"""Look inside a Megatron .bin/.idx dataset: validity, sizes, length histogram, decoded samples.

    python tools/inspect_data.py data/pile_text_document \\
        [--tokenizer-type HFTokenizer --vocab-file 20B_tokenizer.json] [--samples 2] [--json]

Without a tokenizer the samples are shown as token ids; with one, also decoded, and every id is
checked against its vocabulary.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import numpy as np  # noqa: E402

from neox.config import ConfigError  # noqa: E402
from neox.data.indexed import check_token_range, read_document_tokens, read_index, token_range  # noqa: E402
from neox.data.tokenizers import TOKENIZER_TYPES, build_tokenizer  # noqa: E402


def describe(prefix: str, tokenizer=None, samples: int = 1, sample_tokens: int = 64, seed: int = 0) -> dict:
    """Sizes, a log2 length histogram and `samples` random documents of a validated dataset."""
    info, lengths, doc_idx = read_index(prefix)
    lo, hi = token_range(prefix, info)
    cum = np.concatenate(([0], np.cumsum(lengths, dtype=np.int64)))  # [sequences + 1]
    doc_tokens = cum[doc_idx[1:]] - cum[doc_idx[:-1]]  # [documents]
    hist = {}
    if doc_tokens.size:
        buckets = np.floor(np.log2(np.maximum(doc_tokens, 1))).astype(int)
        for b, c in zip(*np.unique(buckets, return_counts=True)):
            hist[f"{2 ** int(b)}-{2 ** (int(b) + 1) - 1}"] = int(c)
    out = {
        "prefix": info.prefix, "dtype": info.dtype.name, "documents": info.num_documents,
        "sequences": info.num_sequences, "tokens": info.num_tokens, "bin_bytes": info.bin_bytes,
        "min_id": lo, "max_id": hi,
        "doc_tokens": {"min": int(doc_tokens.min()), "mean": float(doc_tokens.mean()),
                       "median": float(np.median(doc_tokens)), "max": int(doc_tokens.max())} if doc_tokens.size
        else {},
        "length_histogram": hist,
        "samples": [],
    }
    if tokenizer is not None:
        out["vocab_size"] = tokenizer.vocab_size
        check_token_range(prefix, tokenizer.vocab_size, info)
    rng = np.random.default_rng(seed)
    for seq in sorted(rng.choice(info.num_sequences, size=min(samples, info.num_sequences), replace=False)):
        ids = read_document_tokens(prefix, info, lengths, int(seq))[:sample_tokens].tolist()
        s = {"sequence": int(seq), "length": int(lengths[seq]), "ids": ids}
        if tokenizer is not None:
            s["text"] = tokenizer.detokenize(ids)
        out["samples"].append(s)
    return out


def render(d: dict) -> str:
    lines = [f"{d['prefix']}: valid ({d['dtype']})",
             f"  documents {d['documents']:,}  sequences {d['sequences']:,}  tokens {d['tokens']:,}  "
             f"({d['bin_bytes'] / 1e6:,.1f} MB)",
             f"  token ids {d['min_id']}..{d['max_id']}"
             + (f" (vocabulary {d['vocab_size']}: all inside)" if "vocab_size" in d else "")]
    if d["doc_tokens"]:
        t = d["doc_tokens"]
        lines.append(f"  tokens per document: min {t['min']:,}  median {t['median']:,.0f}  mean {t['mean']:,.1f}  "
                     f"max {t['max']:,}")
        top = max(d["length_histogram"].values())
        for bucket, count in d["length_histogram"].items():
            lines.append(f"  {bucket:>17} {count:>10,} {'#' * max(1, round(40 * count / top))}")
    for s in d["samples"]:
        lines.append(f"  sample: sequence {s['sequence']} ({s['length']:,} tokens), first ids {s['ids'][:16]}")
        if "text" in s:
            lines.append("    " + repr(s["text"])[:400])
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("prefix", nargs="+", help="dataset prefixes (paths without .bin/.idx)")
    p.add_argument("--tokenizer-type", choices=TOKENIZER_TYPES, default=None)
    p.add_argument("--vocab-file", default=None)
    p.add_argument("--merge-file", default=None)
    p.add_argument("--samples", type=int, default=1, help="random documents to show (default 1)")
    p.add_argument("--sample-tokens", type=int, default=64, help="tokens shown per sample")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    args = p.parse_args(argv)
    try:
        tok = build_tokenizer(args.tokenizer_type, args.vocab_file, args.merge_file) if args.tokenizer_type else None
        results = [describe(x[:-4] if x.endswith((".bin", ".idx")) else x, tok, args.samples, args.sample_tokens,
                            args.seed) for x in args.prefix]
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(results, indent=1) if args.json else "\n".join(map(render, results)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Build the embedded default corpus (Python's docs and stdlib -> BPE tokenizer -> Megatron .bin/.idx).

Usage: python tools/prepare_default_data.py [--out cache/default] [--force]
       [--max-bytes N] [--vocab-size N] [--split 95,5,0]

Needs no download; a second run with the same settings finds the cached build and returns at once.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from neox.data.default_corpus import (  # noqa: E402
    DEFAULT_MAX_BYTES,
    DEFAULT_SPLIT,
    DEFAULT_VOCAB_SIZE,
    build_default_corpus,
)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="cache/default", help="output folder (default: cache/default)")
    p.add_argument("--force", action="store_true", help="rebuild even when a valid cached build exists")
    p.add_argument("--max-bytes", type=int, default=DEFAULT_MAX_BYTES, help="cap on corpus text size")
    p.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE, help="BPE vocabulary size")
    p.add_argument("--split", default=DEFAULT_SPLIT,
                   help="train,valid,test weights as in the config; the tokenizer sees train only")
    args = p.parse_args(argv)

    r = build_default_corpus(args.out, max_bytes=args.max_bytes, vocab_size=args.vocab_size,
                             split=args.split, force=args.force)
    state = "cached" if r["cached"] else "built"
    print(f"{state}: data_path={r['data_prefix']}  split={r['split']}  tokenizer={r['tokenizer_file']} "
          f"(HFTokenizer, vocab {r['vocab_size']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

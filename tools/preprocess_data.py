"""Tokenize .jsonl / .jsonl.zst / .jsonl.gz / .txt files into Megatron .bin/.idx (gpt-neox's flags).

    python tools/preprocess_data.py --input data/pile/*.jsonl.zst --output-prefix data/pile \\
        --tokenizer-type HFTokenizer --vocab-file 20B_tokenizer.json --append-eod --workers 8

writes data/pile_text_document.bin/.idx (one pair per --jsonl-keys key). See docs/data.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from neox.config import ConfigError  # noqa: E402
from neox.data.preprocess import DEFAULT_CHUNK_BYTES, TEXT_DOCS, preprocess  # noqa: E402
from neox.data.tokenizers import TOKENIZER_TYPES, build_tokenizer  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("input data")
    g.add_argument("--input", required=True,
                   help="a file, a folder, a glob (quote it) or a comma-separated list of those")
    g.add_argument("--jsonl-keys", nargs="+", default=["text"],
                   help="JSON fields to tokenize, each into its own output (default: text)")
    g.add_argument("--num-docs", type=int, default=None,
                   help="number of documents in the input, if known (the progress bar's total)")
    g.add_argument("--text-docs", choices=TEXT_DOCS, default="file",
                   help=".txt inputs: one document per file (default) or per non-empty line")
    g.add_argument("--skip-bad-lines", action="store_true",
                   help="skip malformed JSON lines / records without the key (counted and reported) "
                        "instead of stopping at the first")
    g = p.add_argument_group("tokenizer")
    g.add_argument("--tokenizer-type", required=True, choices=TOKENIZER_TYPES)
    g.add_argument("--vocab-file", default=None, help="tokenizer.json, vocab.json or a sentencepiece .model")
    g.add_argument("--merge-file", default=None, help="GPT-2 merges.txt (GPT2BPETokenizer/HFGPT2Tokenizer)")
    g.add_argument("--append-eod", action="store_true", help="append the end-of-document token to every document")
    g.add_argument("--ftfy", action="store_true", help="fix text with ftfy first (needs the ftfy package)")
    g = p.add_argument_group("output data")
    g.add_argument("--output-prefix", required=True, help="writes {prefix}_{key}_document.bin/.idx")
    g.add_argument("--dataset-impl", default="mmap", choices=["mmap"], help="only Megatron's mmap format")
    g.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    g = p.add_argument_group("runtime")
    g.add_argument("--workers", type=int, default=1, help="tokenizer processes (default 1)")
    g.add_argument("--log-interval", type=int, default=10_000,
                   help="documents between progress lines when stderr is not a terminal")
    g.add_argument("--chunk-bytes", type=int, default=DEFAULT_CHUNK_BYTES,
                   help="input bytes per batch handed to a worker")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        tok = build_tokenizer(args.tokenizer_type, args.vocab_file, args.merge_file)
        preprocess(args.input, args.output_prefix, tok, jsonl_keys=args.jsonl_keys, append_eod=args.append_eod,
                   workers=args.workers, skip_bad_lines=args.skip_bad_lines, overwrite=args.overwrite,
                   num_docs=args.num_docs, log_interval=args.log_interval, chunk_bytes=args.chunk_bytes,
                   text_docs=args.text_docs, ftfy=args.ftfy, progress=False if args.no_progress else None)
    except ConfigError as e:  # DataError too
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; no output written", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

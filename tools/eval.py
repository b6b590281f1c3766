"""Evaluate a neox checkpoint or HF GPT-NeoX directory: perplexity / bits per byte, LAMBADA accuracy.

    # perplexity and bits per byte of the validation part of a .bin/.idx dataset
    python tools/eval.py --load runs/tiny --data-prefix data/corpus_text_document --split 969,30,1 --which valid
    # of a jsonl file, each document on its own with a sliding window (stride 512 of seq_length 2048)
    python tools/eval.py --load runs/tiny --jsonl docs.jsonl --jsonl-key text --stride 512
    # LAMBADA last-word accuracy and perplexity (first 500 passages), as JSON
    python tools/eval.py --load runs/tiny --task lambada --jsonl lambada_test.jsonl --limit 500 --json -
    # data parallel over batches (same numbers as one process)
    torchrun --nproc-per-node 8 tools/eval.py --load ... --task lambada --jsonl lambada_test.jsonl

Methods (see neox/inference/evaluate.py): `--method document` scores each document alone after an eod
(lm-eval-harness's rolling log-likelihood); `--method concat` joins documents with eod into one
stream. Windows hold --seq-length inputs; with --stride < seq-length they overlap and each scores
only its last `stride` tokens. End-of-document tokens are never scored. Bits per byte use the UTF-8
bytes of the documents' text (for .bin data, the text the tokenizer decodes each document to).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

import neox
from neox.checkpoint.loading import find_tokenizer
from neox.inference.evaluate import (
    METHODS,
    evaluate_lambada,
    evaluate_perplexity,
    format_table,
    read_bin_documents,
    read_jsonl,
    text_bytes,
)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", required=True, help="run dir, global_stepN dir, or HF GPT-NeoX dir")
    p.add_argument("--task", choices=("perplexity", "lambada"), default="perplexity")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data-prefix", help=".bin/.idx dataset prefix (token data; perplexity only)")
    src.add_argument("--jsonl", help="a jsonl file of documents (or LAMBADA passages)")
    p.add_argument("--jsonl-key", default="text", help="the field holding the text (default: text)")
    p.add_argument("--split", help='cut --data-prefix as training does, e.g. "969,30,1" (default: whole file)')
    p.add_argument("--which", choices=("train", "valid", "test"), default="valid", help="part of --split")
    p.add_argument("--method", choices=METHODS, default="document", help="perplexity windows (see above)")
    p.add_argument("--seq-length", type=int, help="window length (default: the model's seq_length)")
    p.add_argument("--stride", type=int, help="tokens scored per window after the first (default: seq-length)")
    p.add_argument("--limit", type=int, help="only the first N documents / passages")
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward pass, per process")
    p.add_argument("--tokenizer", help="tokenizer file (default: the checkpoint's)")
    p.add_argument("--tokenizer-type", default="HFTokenizer", help="type of --tokenizer (default HFTokenizer)")
    p.add_argument("--device", help="default: cuda (this process's LOCAL_RANK) when available, else cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--json", nargs="?", const="-", metavar="FILE", help="write results as JSON (- = stdout)")
    args = p.parse_args(argv)
    if args.task == "lambada" and not args.jsonl:
        p.error("--task lambada needs --jsonl (passages whose last word is the target)")
    if args.split and not args.data_prefix:
        p.error("--split applies to --data-prefix")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available() and (args.device is None or args.device.startswith("cuda"))
    device = torch.device(args.device or "cpu")
    if cuda and args.device is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if cuda:
        torch.cuda.set_device(device)
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if cuda else "gloo")
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0

    load = Path(args.load)
    model = neox.load(load, dtype=DTYPES[args.dtype], device=device)
    tok = find_tokenizer(load, model.config, args.tokenizer, args.tokenizer_type)
    seq_length = args.seq_length or model.config.model.seq_length
    common = dict(seq_length=seq_length, batch_size=args.batch_size, device=device)

    if args.task == "lambada":
        texts = read_jsonl(args.jsonl, args.jsonl_key, args.limit)
        res = evaluate_lambada(model, tok, texts, **common)
        res["source"] = args.jsonl
    else:
        if args.jsonl:
            texts = read_jsonl(args.jsonl, args.jsonl_key, args.limit)
            docs = tok.tokenize_batch(texts)
            source = args.jsonl
        else:
            docs = read_bin_documents(args.data_prefix, tok.eod, split=args.split, which=args.which,
                                      limit=args.limit)
            texts = [tok.detokenize(d) for d in docs]
            source = args.data_prefix + (f" [{args.which} of {args.split}]" if args.split else "")
        res = evaluate_perplexity(model, docs, eod=tok.eod, stride=args.stride, method=args.method,
                                  num_bytes=text_bytes(texts), **common)
        res["source"] = source
    res.update(load=str(load), processes=world)

    if rank == 0:
        if args.json == "-":
            print(json.dumps(res, indent=1))
        else:
            print(format_table(res))
            if args.json:
                Path(args.json).write_text(json.dumps(res, indent=1) + "\n")
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Generate text from a neox checkpoint or a Hugging Face GPT-NeoX / RWKV directory.

    python tools/generate.py --load runs/tiny-neox --prompt "def main(" --max-new-tokens 60
    python tools/generate.py --load runs/tiny-neox --prompt-file prompts.txt --temperature 0
    python tools/generate.py --load runs/tiny-neox --interactive
    torchrun --nproc-per-node 2 tools/generate.py --load runs/tiny-neox --prompt-file p.txt --tp 2

A prompt file holds one prompt per line; prompts run in batches of --batch-size (left-padded, each
row stops on its own). RWKV checkpoints generate in RNN mode: each prompt runs in parallel mode returning
its state, then one token per step with O(1) state (no context limit). `--save-state FILE` writes the
state after the generated text (safetensors, with the next-token logits and the sampling RNG) and
`--load-state FILE` continues from it, exactly: an empty --prompt "" resumes the generation, a prompt is
read on from the state. Under torchrun every rank loads its tensor-parallel shard of the checkpoint,
all ranks sample the same tokens, and rank 0 prints.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_ext.launch import init_distributed
from megatron_ext.topology import ParallelState
from neox.checkpoint.loading import find_tokenizer
from neox.inference.generate import generate_batch
from neox.inference.loading import load_model_for_inference
from neox.inference.rnn import RNNRunner, load_state, rnn_generate_batch, save_state
from neox.inference.sampling import SamplingParams

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", required=True, help="run dir, global_stepN dir, or HF GPT-NeoX dir")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="one prompt")
    src.add_argument("--prompt-file", help="a file with one prompt per line (run in batches)")
    src.add_argument("--interactive", action="store_true", help="read prompts from stdin, one per line")
    p.add_argument("--tokenizer", help="tokenizer.json (default: the checkpoint's)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per batch for --prompt-file")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size (= the number of processes)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--no-kv-cache", action="store_true", help="recompute the whole sequence each step")
    p.add_argument("--save-state", help="RWKV: write the state after the generated text to this file")
    p.add_argument("--load-state", help="RWKV: continue from a state written by --save-state")
    return p.parse_args(argv)


def setup_parallel(tp: int) -> ParallelState:
    _, world = init_distributed()
    if world != tp:
        raise SystemExit(f"--tp {tp} needs exactly {tp} processes, got {world}; run "
                         f"`torchrun --nproc-per-node {tp} tools/generate.py ... --tp {tp}`")
    return ParallelState.from_sizes(tp=tp) if tp > 1 else ParallelState.single()


def read_prompts(args, ps: ParallelState):
    """Yield batches of prompt strings; in interactive mode rank 0 reads stdin and shares each line."""
    if args.prompt is not None:
        yield [args.prompt]
        return
    if args.prompt_file:
        prompts = [line.rstrip("\n") for line in open(args.prompt_file) if line.strip()]
        for i in range(0, len(prompts), args.batch_size):
            yield prompts[i: i + args.batch_size]
        return
    if ps.rank == 0:
        print("interactive: type a prompt, empty line or Ctrl-D to quit", file=sys.stderr, flush=True)
    while True:
        line = [None]
        if ps.rank == 0:
            raw = sys.stdin.readline()
            line = [raw.rstrip("\n") if raw else ""]
        if ps.tp_size > 1:
            dist.broadcast_object_list(line, src=0)
        if not line[0]:
            return
        yield [line[0]]


def print_texts(args, ps: ParallelState, batch, texts) -> None:
    if ps.rank == 0:
        for prompt, text in zip(batch, texts):
            print(f"{prompt}{text}")
            if not args.interactive:
                print("-" * 40)
        sys.stdout.flush()


def generate_kv(args, ps, cfg, model, tok, params, gen) -> int:
    """GPT-NeoX: batched generation with a KV cache; returns the number of generated tokens."""
    ctx = cfg.model.max_position_embeddings or cfg.model.seq_length
    keep = ctx - args.max_new_tokens
    if keep < 1:
        raise SystemExit(f"--max-new-tokens {args.max_new_tokens} leaves no room for a prompt in the model's "
                         f"{ctx} positions")
    n_tokens = 0
    for batch in read_prompts(args, ps):
        ids = [(tok.tokenize(p) or [tok.eod])[-keep:] for p in batch]  # the newest `keep` tokens fit
        res = generate_batch(model, ids, max_new_tokens=args.max_new_tokens, params=params, eod_id=tok.eod,
                             stop_strings=args.stop, detokenize=tok.detokenize, generator=gen,
                             use_cache=not args.no_kv_cache)
        n_tokens += sum(len(t) for t in res.tokens)
        print_texts(args, ps, batch, res.texts)
    return n_tokens


def generate_rnn(args, ps, model, tok, params, gen) -> int:
    """RWKV: RNN-mode generation (no context limit), optionally from / to a saved state."""
    if (args.save_state or args.load_state) and args.prompt is None:
        raise SystemExit("--save-state / --load-state need a single --prompt (use --prompt '' to just continue)")
    saved = None
    if args.load_state:
        saved = load_state(args.load_state, model)
        if saved.rng is not None:  # the sampling stream continues where the saved run stopped
            gen.set_state(saved.rng)
    runner = RNNRunner(model)
    if ps.rank == 0:
        print(f"[generate] RWKV in RNN mode: {runner.describe()}", file=sys.stderr, flush=True)
    n_tokens = 0
    for batch in read_prompts(args, ps):
        ids = [tok.tokenize(p) if saved is not None else (tok.tokenize(p) or [tok.eod]) for p in batch]
        res = rnn_generate_batch(runner, ids, max_new_tokens=args.max_new_tokens, params=params, eod_id=tok.eod,
                                 stop_strings=args.stop, detokenize=tok.detokenize, generator=gen,
                                 state=saved.state if saved else None, logits=saved.logits if saved else None,
                                 return_state=bool(args.save_state))
        n_tokens += sum(len(t) for t in res.tokens)
        print_texts(args, ps, batch, res.texts)
        if args.save_state and ps.rank == 0:
            save_state(args.save_state, res.state, res.next_logits, gen)
    return n_tokens


def main(argv=None) -> int:
    args = parse_args(argv)
    ps = setup_parallel(args.tp)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
    load = Path(args.load)
    cfg, model = load_model_for_inference(load, ps, dtype=DTYPES[args.dtype], device=device)
    tok = find_tokenizer(load, cfg, args.tokenizer)
    params = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    if cfg.model.model_type == "rwkv":
        t0 = time.perf_counter()
        n_tokens = generate_rnn(args, ps, model, tok, params, gen)
    else:
        if args.save_state or args.load_state:
            raise SystemExit("--save-state / --load-state are for RWKV checkpoints (GPT-NeoX has no RNN state)")
        t0 = time.perf_counter()
        n_tokens = generate_kv(args, ps, cfg, model, tok, params, gen)
    if ps.rank == 0:
        dt = time.perf_counter() - t0
        print(f"[generate] {n_tokens} tokens in {dt:.2f}s ({n_tokens / max(dt, 1e-9):.1f} tok/s)", file=sys.stderr)
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Generate text from a neox checkpoint or a Hugging Face GPT-NeoX directory.

    python tools/generate.py --load runs/tiny-neox --prompt "def main(" --max-new-tokens 60
    python tools/generate.py --load runs/tiny-neox --prompt-file prompts.txt --temperature 0
    python tools/generate.py --load runs/tiny-neox --interactive
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import neox
from neox.checkpoint.io import resolve_step_dir
from neox.data.tokenizers import build_tokenizer
from neox.inference.generate import generate
from neox.inference.sampling import SamplingParams


def find_tokenizer(load: Path, cfg, explicit: str | None):
    """The tokenizer: --tokenizer, else a tokenizer.json beside the checkpoint, else the config's."""
    if explicit:
        return build_tokenizer("HFTokenizer", explicit)
    candidates = [load / "tokenizer.json"]
    if load.is_dir() and not (load / "config.json").is_file():
        try:
            step = resolve_step_dir(load)
            candidates += [step / "tokenizer.json", step.parent / "tokenizer.json"]
        except ValueError:
            pass
    for c in candidates:
        if c.is_file():
            return build_tokenizer("HFTokenizer", str(c))
    d = cfg.data
    if d.vocab_file and Path(d.vocab_file).is_file():
        return build_tokenizer(d.tokenizer_type, d.vocab_file, d.merge_file)
    raise SystemExit(f"no tokenizer found for {load}: pass --tokenizer path/to/tokenizer.json")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", required=True, help="run dir, global_stepN dir, or HF GPT-NeoX dir")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="one prompt")
    src.add_argument("--prompt-file", help="a file with one prompt per line")
    src.add_argument("--interactive", action="store_true", help="read prompts from stdin")
    p.add_argument("--tokenizer", help="tokenizer.json (default: the checkpoint's)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=1234)
    args = p.parse_args(argv)

    load = Path(args.load)
    model = neox.load(load)
    tok = find_tokenizer(load, model.config, args.tokenizer)
    params = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    ctx = model.config.model.seq_length

    def complete(prompt: str) -> str:
        ids = tok.tokenize(prompt)
        new = generate(model, ids, max_new_tokens=args.max_new_tokens, params=params,
                       stop_token_ids=[tok.eod], max_context=ctx, seed=args.seed)
        return tok.detokenize(new)

    if args.prompt is not None:
        prompts = [args.prompt]
    elif args.prompt_file:
        prompts = [line.rstrip("\n") for line in open(args.prompt_file) if line.strip()]
    else:
        prompts = None
    if prompts is not None:
        for prompt in prompts:
            print(f"{prompt}{complete(prompt)}")
            print("-" * 40)
        return 0
    print("interactive: type a prompt, empty line or Ctrl-D to quit", file=sys.stderr)
    for line in sys.stdin:
        prompt = line.rstrip("\n")
        if not prompt:
            break
        print(f"{prompt}{complete(prompt)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

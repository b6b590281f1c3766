"""Tokens/s of RWKV RNN-mode generation (batch 1, CPU) against transformers and BlinkDL's `rwkv` package,
and the per-token time as the context grows (RWKV stays flat; a GPT-NeoX with a KV cache grows).

    python tools/bench/rwkv_generate.py                       # 72M RWKV-4: hidden 512, 6 layers, vocab 50277
    python tools/bench/rwkv_generate.py --hidden 256 --layers 2 --tokens 16 --contexts 32,64 --json out.json
    python tools/bench/rwkv_generate.py --bf16-values         # weights rounded to bf16, as released checkpoints
    python tools/bench/rwkv_generate.py --contention 1        # also with a busy process competing for a core

Every model gets the same (random) weights. Each step is timed alone (greedy pick included); the sides
take turns of --block steps (after --warmup untimed ones) until each has --tokens, and the median is
reported, so load from other processes falls on every side alike. Peers: transformers' RwkvForCausalLM
one token at a time carrying its state (what its generate does), and `rwkv.model.RWKV(path, "cpu fp32")`
(RWKV_JIT_ON as set in the environment, default on). neox: the fused RWKVStepper (the C++ step where it
builds) and, for reference, the model's own forward_rnn. The "floor" row is one torch.mv over a float32
matrix of as many bytes as a neox token reads: memory bandwidth with no model around it. Context
growth: the state (or KV cache) after a random prompt of each length, then --tokens timed steps.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from neox.checkpoint.rwkv_convert import neox_config_to_hf, neox_to_blinkdl_state_dict, neox_to_hf_state_dict  # noqa: E402
from neox.config import NeoXConfig  # noqa: E402
from neox.inference.kv_cache import KVCache  # noqa: E402
from neox.inference.rnn import RWKVStepper  # noqa: E402
from neox.models import CausalLM  # noqa: E402


def timed_steps(step, first_token: int, n: int, warmup: int) -> float:
    """Median seconds per step of `step(token) -> next token` (greedy), after warmup steps."""
    tok, times = first_token, []
    for i in range(warmup + n):
        t = time.perf_counter()
        tok = step(tok)
        if i >= warmup:
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def interleaved(steps: dict, n: int, warmup: int, block: int) -> dict:
    """Median seconds per step of each `step(token) -> next token`, timed in turns of `block` steps
    (round robin until each has n timed steps), so a noisy neighbour slows every side alike. Each turn's
    first `warmup` steps are untimed: they pull that side's weights back into the caches."""
    toks = {name: 1 for name in steps}
    times: dict = {name: [] for name in steps}
    while any(len(t) < n for t in times.values()):
        for name, step in steps.items():
            for i in range(warmup + block):
                t = time.perf_counter()
                toks[name] = step(toks[name])
                if i >= warmup:
                    times[name].append(time.perf_counter() - t)
    return {name: statistics.median(t[:n]) for name, t in times.items()}


PEER = "rwkv package (cpu fp32)"


def rwkv_config(args) -> NeoXConfig:
    return NeoXConfig.from_dict({"model_type": "rwkv", "num_layers": args.layers, "hidden_size": args.hidden,
                                 "vocab_size": args.vocab, "no_weight_tying": True, "seq_length": 1024,
                                 "max_position_embeddings": 1024})


def random_rwkv(cfg: NeoXConfig, bf16_values: bool = False) -> CausalLM:
    """Random weights (float32). bf16_values: every weight rounded to a bf16 value, still stored as float32,
    as in a checkpoint trained or released in bf16 and loaded with strategy "cpu fp32"."""
    torch.manual_seed(0)
    lm = CausalLM.from_config(cfg.model).eval()
    with torch.no_grad():  # neox init zeroes some matrices; fill them so no path is trivially cheap
        for name, p in lm.model.named_parameters():
            if p.dim() == 2 and "embed" not in name:
                p.copy_(torch.randn_like(p) / p.shape[1] ** 0.5)
            if bf16_values:
                p.copy_(p.to(torch.bfloat16).float())
    return lm


def neox_steps(lm, args) -> dict:
    """neox's step functions: the fused RWKVStepper (the default path) and the model's forward_rnn."""
    stepper = RWKVStepper(lm)
    state = stepper.init_state(1)

    def fused(tok):
        nonlocal state
        logits, state = stepper.step(torch.tensor([tok]), state)
        return int(logits.argmax())

    mstate = None

    def plain(tok):
        nonlocal mstate
        with torch.inference_mode():
            logits, mstate = lm.model.forward_rnn(torch.tensor([tok]), mstate)
        return int(logits[0, : args.vocab].argmax())

    kind = "C++ step" if stepper._cpp is not None else "torch step"
    if stepper._cpp is not None:
        c = stepper._cpp
        print(f"neox C++ step: {c.threads} threads, {c.isa} kernels, {c.packed_bytes / 1e6:.1f} MB of weights per "
              f"token, {c.bf16_bytes / 1e6:.1f} MB of them stored as exact bf16")
    return {f"neox RWKVStepper ({kind})": fused, "neox forward_rnn (unfused)": plain}


FLOOR = "floor: one torch.mv, same bytes"


def floor_step(nbytes: int, hidden: int):
    """One MKL gemv over a float32 matrix of `nbytes` (what a token reads): the memory-bandwidth floor
    no step that reads those bytes once can beat by much."""
    w = torch.randn(max(1, nbytes // 4 // hidden), hidden)
    x = torch.randn(hidden)

    def step(tok):
        torch.mv(w, x)
        return tok

    return step


def hf_step(lm, cfg):
    """transformers' RwkvForCausalLM one token at a time carrying its state, or None if not installed."""
    try:
        from transformers import RwkvForCausalLM
    except ImportError:
        return None
    hf = RwkvForCausalLM(neox_config_to_hf(cfg)).eval()
    hf.load_state_dict(neox_to_hf_state_dict(lm.model.state_dict(), cfg))
    state = None

    def step(tok):
        nonlocal state
        with torch.no_grad():
            r = hf(torch.tensor([[tok]]), state=state, use_cache=True)
        state = r.state
        return int(r.logits[0, -1].argmax())

    return step


def rwkv_package_step(lm, cfg):
    """BlinkDL's rwkv package, strategy "cpu fp32", or None if not installed."""
    os.environ.setdefault("RWKV_CUDA_ON", "0")
    try:
        from rwkv.model import RWKV
    except ImportError:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.pth"
        torch.save(neox_to_blinkdl_state_dict(lm.model.state_dict(), cfg), path)
        model = RWKV(model=str(path), strategy="cpu fp32", verbose=False)
    state = None

    def step(tok):
        nonlocal state
        logits, state = model.forward([tok], state)
        return int(logits.argmax())

    return step


def under_contention(steps: dict, args) -> dict:
    """The same interleaved medians while --contention busy processes compete for the cores."""
    import subprocess

    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.contention)]
    try:
        time.sleep(0.5)
        return interleaved(steps, args.tokens, args.warmup, args.block)
    finally:
        for h in hogs:
            h.kill()
            h.wait()


def print_table(results: dict) -> None:
    peer = results.get(PEER)
    print(f"\n{'implementation':32s} {'ms/token':>9s} {'tokens/s':>9s} {'vs rwkv pkg':>11s}")
    for name, sec in results.items():
        if sec is None:
            print(f"{name:32s} {'(not installed)':>20s}")
            continue
        rel = f"{peer / sec:.2f}x" if peer else "-"
        print(f"{name:32s} {sec * 1e3:9.2f} {1 / sec:9.1f} {rel:>11s}")


def context_growth(lm, args) -> dict:
    """Per-token seconds at each context length: neox RWKV (fused) and a neox GPT-NeoX with a KV cache."""
    g = torch.Generator().manual_seed(1)
    gcfg = NeoXConfig.from_dict({"model_type": "gpt_neox", "num_layers": args.layers, "hidden_size": args.hidden,
                                 "num_attention_heads": max(1, args.hidden // 64), "vocab_size": args.vocab,
                                 "seq_length": max(args.contexts) + args.warmup + args.tokens + 1,
                                 "max_position_embeddings": max(args.contexts) + args.warmup + args.tokens + 1,
                                 "no_weight_tying": True})
    torch.manual_seed(0)
    neox_gpt = CausalLM.from_config(gcfg.model).eval()
    stepper = RWKVStepper(lm)
    rows = {"RWKV-4 (neox, RNN)": {}, "GPT-NeoX (neox, KV cache)": {},
            "_params": {"rwkv": sum(p.numel() for p in lm.parameters()),
                        "gpt_neox": sum(p.numel() for p in neox_gpt.parameters())}}
    for c in args.contexts:
        prompt = torch.randint(0, args.vocab, (1, c), generator=g)
        with torch.inference_mode():
            _, mstate = lm.model(prompt, return_state=True)
        state = stepper.from_model_state(mstate)

        def rstep(tok, state=state):
            logits, _ = stepper.step(torch.tensor([tok]), state)
            return int(logits.argmax())

        rows["RWKV-4 (neox, RNN)"][c] = timed_steps(rstep, 1, args.tokens, args.warmup)

        net = neox_gpt.model
        cache = KVCache.for_model(net, 1, c + args.warmup + args.tokens + 1)
        with torch.inference_mode():
            net(prompt, position_ids=torch.arange(c)[None], kv_cache=cache)
        pos = [c]

        def gstep(tok, net=net, cache=cache, pos=pos):
            with torch.inference_mode():
                out = net(torch.tensor([[tok]]), position_ids=torch.tensor([[pos[0]]]), kv_cache=cache)
            pos[0] += 1
            return int(out[0, -1, : args.vocab].argmax())

        rows["GPT-NeoX (neox, KV cache)"][c] = timed_steps(gstep, 1, args.tokens, args.warmup)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--vocab", type=int, default=50277)
    ap.add_argument("--tokens", type=int, default=64, help="timed steps per measurement (median)")
    ap.add_argument("--warmup", type=int, default=4, help="untimed steps at the start of each turn")
    ap.add_argument("--block", type=int, default=16, help="timed steps per turn (the sides take turns)")
    ap.add_argument("--contexts", default="128,512,2048", help="context lengths for the growth table")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    ap.add_argument("--skip-peers", action="store_true", help="only neox (no transformers / rwkv package)")
    ap.add_argument("--bf16-values", action="store_true",
                    help="round every weight to a bf16 value (kept float32 everywhere), as a bf16 checkpoint is")
    ap.add_argument("--contention", type=int, default=0,
                    help="also time neox and the rwkv package with this many busy processes running")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)
    args.contexts = [int(c) for c in args.contexts.split(",") if c]
    if args.threads:
        torch.set_num_threads(args.threads)

    cfg = rwkv_config(args)
    lm = random_rwkv(cfg, args.bf16_values)
    n = sum(p.numel() for p in lm.parameters())
    print(f"RWKV-4: hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}: {n / 1e6:.1f}M parameters; "
          f"float32{' (bf16 values)' if args.bf16_values else ''}, batch 1, {torch.get_num_threads()} threads; "
          f"median of {args.tokens} steps")
    steps = neox_steps(lm, args)
    stepper = RWKVStepper(lm)
    nbytes = stepper._cpp.packed_bytes if stepper._cpp is not None else 4 * sum(
        p.numel() for n, p in lm.model.named_parameters() if p.dim() == 2 and "embed" not in n)
    del stepper
    steps[FLOOR] = floor_step(nbytes, args.hidden)
    missing = []
    if not args.skip_peers:
        for name, make in (("transformers RwkvForCausalLM", hf_step), (PEER, rwkv_package_step)):
            fn = make(lm, cfg)
            if fn is None:
                missing.append(name)
            else:
                steps[name] = fn
    results = interleaved(steps, args.tokens, args.warmup, args.block)
    results.update({name: None for name in missing})
    print_table(results)
    contended = None
    if args.contention:
        names = [n for n in steps if n.startswith("neox RWKVStepper") or n == PEER]
        contended = under_contention({n: steps[n] for n in names}, args)
        print(f"\nwith {args.contention} busy process(es) competing for the {os.cpu_count()} cores:")
        print_table(contended)
    growth = context_growth(lm, args)
    params = growth.pop("_params")
    print(f"\nper-token ms as the context grows (GPT-NeoX: {params['gpt_neox'] / 1e6:.1f}M parameters)")
    print(f"{'model':28s}" + "".join(f"{c:>10d}" for c in args.contexts))
    for name, row in growth.items():
        print(f"{name:28s}" + "".join(f"{row[c] * 1e3:10.2f}" for c in args.contexts))
    if args.json:
        Path(args.json).write_text(json.dumps({"config": vars(args), "threads": torch.get_num_threads(),
                                               "seconds_per_token": results, "context_growth": growth,
                                               "seconds_per_token_contended": contended,
                                               "params": params}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

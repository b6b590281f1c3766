"""Training throughput and peak memory of neox against transformers' GPTNeoXForCausalLM, side by side.

    python tools/bench/train_throughput.py                     # Pythia-14M shape, batch 8 x 512, CPU fp32
    python tools/bench/train_throughput.py --sides neox,neox-unfused,hf --steps 10 --json out.json
    python tools/bench/train_throughput.py --profile neox      # torch.profiler table of one neox step

Both sides train the same model (6 layers, hidden 128, 4 heads, vocab 50,304 padded / 50,277 real,
rotary_pct 0.25, parallel residual, untied embeddings) from the SAME initial weights (neox's init,
converted to transformers), on the same synthetic batches, with the same AdamW (foreach, weight decay on
matrices only) and gradient clipping at 1.0, in float32 on one process:

* ``neox``: the real training engine (neox.training.engine.Engine.train_batch), whose last stage runs
  the output layer and cross entropy in token chunks (GPTNeoX.forward_loss): no [B, T, V] logits.
* ``neox-unfused`` (optional): the same engine with the old loss path, loss(forward()) on full logits;
  shows what the chunked loss buys.
* ``hf``: a plain loop over ``GPTNeoXForCausalLM(input_ids, labels=, shift_labels=labels).loss``
  (pre-shifted labels: the same 512 targets per row; HF's default attention implementation),
  ``loss.backward()``, clip, ``AdamW.step()``. Its vocab is the padded 50,304 as in Pythia's published
  checkpoints, so its loss differs from neox's (which masks the 27 padding columns) by about
  log(1 + 27/50277) ~ 5e-4 at the start.

Each side runs in its own fresh subprocess, so the peak resident set size (``getrusage(RUSAGE_SELF)
.ru_maxrss``, what a user sees as the process's peak memory, imports included) belongs to that side
alone. The processes run in lock-step: step i runs on one side at a time, every side in turn (the order
rotating), so on a shared machine a burst of load elsewhere falls on every side alike. tokens/s =
B * T / median step time over ``--steps`` steps after ``--warmup``.
The loss columns (first and last step) show both sides compute the same thing.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

SIDES = ("neox", "neox-unfused", "hf")
MARK = "@@RESULT "


def rss_mb() -> float:
    """Current resident set size in MB (Linux /proc; falls back to the peak elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return peak_rss_mb()


def peak_rss_mb() -> float:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return kb / 2**20 if sys.platform == "darwin" else kb / 1024


def make_config(args):
    from neox.config import NeoXConfig

    return NeoXConfig.from_dict(dict(
        num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=args.heads, seq_length=args.seq,
        max_position_embeddings=max(args.seq, 2048), vocab_size=args.vocab, make_vocab_size_divisible_by=128,
        rotary_pct=0.25, gpt_j_residual=True, no_weight_tying=True, hidden_dropout=0.0, attention_dropout=0.0,
        optimizer_type="adamw", lr=args.lr, weight_decay=0.01, clip_grad=1.0, precision="fp32", seed=args.seed,
        train_iters=args.warmup + args.steps, train_micro_batch_size_per_gpu=args.batch,
        gradient_accumulation_steps=1,
    ))


def make_batches(args) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1234)
    out = []
    for _ in range(args.warmup + args.steps):
        rows = torch.randint(0, args.vocab, (args.batch, args.seq + 1), generator=g)
        out.append({"tokens": rows[:, :-1].contiguous(), "labels": rows[:, 1:].contiguous(),
                    "loss_mask": torch.ones(args.batch, args.seq)})
    return out


def build_neox(args, fused: bool):
    from megatron_ext.topology import ParallelState
    from neox.training.engine import Engine

    cfg = make_config(args)
    torch.manual_seed(args.seed)
    engine = Engine(cfg, ParallelState.single(), init_seed=args.seed)
    if not fused:  # the pre-chunking path: full [B, T, V] logits, then the vocab-parallel cross entropy
        for chunk in engine.chunks:
            if chunk.post_process:
                chunk.forward_loss = lambda x, labels, mask, c=chunk: c.loss(c(x), labels, mask)
    return cfg, engine


def neox_step(args, fused: bool):
    _, engine = build_neox(args, fused)
    return lambda b: engine.train_batch([b])[0]


def build_hf(args):
    """transformers' GPTNeoXForCausalLM holding neox's initial weights (vocab kept padded, as Pythia's)."""
    import dataclasses

    from transformers import GPTNeoXForCausalLM

    from megatron_ext.topology import ParallelState
    from neox.checkpoint.hf_gpt_neox import neox_config_to_hf, neox_to_hf_state_dict
    from neox.models.gpt_neox import GPTNeoX

    cfg = make_config(args)
    padded = dataclasses.replace(cfg.model, vocab_size=cfg.model.padded_vocab_size(1))
    ref = GPTNeoX(cfg.model, ParallelState.single(), init_seed=args.seed)  # the engine's init (same seed)
    sd = neox_to_hf_state_dict(ref.state_dict(), padded)
    del ref
    hf_cfg = neox_config_to_hf(padded)
    model = GPTNeoXForCausalLM(hf_cfg)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    params = dict(model.named_parameters())
    assert not unexpected and not [k for k in missing if k in params], (missing, unexpected)  # only buffers
    return cfg, model


def hf_step(args):
    from neox.training.optim import param_groups

    cfg, model = build_hf(args)
    model.train()
    opt = torch.optim.AdamW(param_groups(model.named_parameters(), cfg.optimizer.weight_decay), lr=args.lr,
                            betas=tuple(cfg.optimizer.betas), eps=cfg.optimizer.eps, foreach=True)

    def step(b):
        opt.zero_grad(set_to_none=True)
        loss = model(input_ids=b["tokens"], labels=b["labels"], shift_labels=b["labels"]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
        opt.step()
        return float(loss)

    return step


def worker(side: str, args) -> None:
    """One side in its own process: set up, then run one step per ``step`` line on stdin (lock-step with
    the other sides), answering each with a result line; ``done`` answers the process peak and exits."""
    torch.manual_seed(args.seed)
    step = hf_step(args) if side == "hf" else neox_step(args, fused=side == "neox")
    batches = make_batches(args)
    reply({"rss_setup_mb": rss_mb(), "threads": torch.get_num_threads()})
    for line in sys.stdin:
        if line.strip() == "done":
            break
        i = int(line.split()[1])
        t0 = time.perf_counter()
        loss = step(batches[i])
        reply({"step_s": time.perf_counter() - t0, "loss": loss})
    reply({"peak_rss_mb": peak_rss_mb()})


def reply(obj: dict) -> None:
    print(MARK + json.dumps(obj), flush=True)


def profile(side: str, args) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    args.steps, args.warmup = 1, 1
    if side == "hf":
        raise SystemExit("--profile supports the neox sides")
    _, engine = build_neox(args, fused=side == "neox")
    batches = make_batches(args)
    engine.train_batch([batches[0]])
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        engine.train_batch([batches[1]])
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


class Side:
    """A worker process driven over pipes; stderr goes to a file so a chatty side cannot block."""

    def __init__(self, name: str, argv: list[str], log_dir: Path):
        self.name, self.log = name, log_dir / f"{name}.stderr"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", name, *argv]
        with open(self.log, "w") as err:
            self.proc = subprocess.Popen(cmd, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err,
                                         text=True)

    def read(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith(MARK):
                return json.loads(line[len(MARK):])
        self.proc.wait()
        raise SystemExit(f"side {self.name!r} failed (exit {self.proc.returncode}):\n{self.log.read_text()}")

    def ask(self, command: str) -> dict:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self.read()


def run_sides(args, argv: list[str]) -> dict[str, dict]:
    """Start every side, then run step i on each side in turn (the order rotating every step), so load
    from elsewhere on a shared machine falls on all sides alike."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="bench_tp_") as tmp:
        sides = [Side(name, argv, Path(tmp)) for name in args.side_list]
        try:
            res = {s.name: {**s.read(), "step_s": [], "losses": []} for s in sides}
            for i in range(args.warmup + args.steps):
                k = i % len(sides)
                for s in sides[k:] + sides[:k]:
                    r = s.ask(f"step {i}")
                    res[s.name]["losses"].append(r["loss"])
                    if i >= args.warmup:
                        res[s.name]["step_s"].append(r["step_s"])
            for s in sides:
                res[s.name].update(s.ask("done"))
                s.proc.wait()
        finally:
            for s in sides:
                if s.proc.poll() is None:
                    s.proc.kill()
    return res


def summarise(side: str, r: dict, tokens_per_step: int) -> dict:
    med = statistics.median(r["step_s"])
    return {"side": side, "tokens_per_s": tokens_per_step / med, "median_step_ms": med * 1e3,
            "peak_rss_mb": r["peak_rss_mb"], "rss_setup_mb": r["rss_setup_mb"],
            "first_loss": r["losses"][0], "last_loss": r["losses"][-1], "steps": len(r["step_s"]),
            "threads": r["threads"]}


def print_table(rows: list[dict], ref: dict | None) -> None:
    head = (f"{'side':<13} {'tokens/s':>9} {'median step ms':>15} {'peak RSS MB':>12} {'setup RSS MB':>13} "
            f"{'tok/s vs hf':>12} {'peak vs hf':>11} {'first loss':>11} {'last loss':>10}")
    print(head)
    print("-" * len(head))
    for r in rows:
        speed = f"{r['tokens_per_s'] / ref['tokens_per_s']:.2f}x" if ref else "-"
        mem = f"{r['peak_rss_mb'] / ref['peak_rss_mb']:.0%}" if ref else "-"
        print(f"{r['side']:<13} {r['tokens_per_s']:>9.0f} {r['median_step_ms']:>15.1f} {r['peak_rss_mb']:>12.0f} "
              f"{r['rss_setup_mb']:>13.0f} {speed:>12} {mem:>11} {r['first_loss']:>11.5f} {r['last_loss']:>10.5f}")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sides", default="neox,hf", help=f"comma list of {', '.join(SIDES)}")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=50277, help="real vocab (padded to a multiple of 128)")
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--json", help="also write the rows here")
    ap.add_argument("--profile", choices=("neox", "neox-unfused"), help="print a torch.profiler table of one step")
    ap.add_argument("--worker", choices=SIDES, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    sides = [s for s in args.sides.split(",") if s]
    bad = [s for s in sides if s not in SIDES]
    if bad or not sides:
        ap.error(f"--sides: unknown {bad}; choose from {', '.join(SIDES)}")
    if args.steps < 1 or args.warmup < 0:
        ap.error("--steps must be >= 1 and --warmup >= 0")
    args.side_list = sides
    return args


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.worker:
        worker(args.worker, args)
        return
    if args.profile:
        profile(args.profile, args)
        return
    res = run_sides(args, list(argv))
    rows = [summarise(s, res[s], args.batch * args.seq) for s in args.side_list]
    ref = next((r for r in rows if r["side"] == "hf"), None)
    print(f"GPT-NeoX {args.layers} layers, hidden {args.hidden}, {args.heads} heads, vocab {args.vocab} "
          f"(padded {-(-args.vocab // 128) * 128}), batch {args.batch} x {args.seq} tokens, fp32, CPU, "
          f"{rows[0]['threads']} threads; median of {args.steps} lock-step steps after {args.warmup} warmup")
    print_table(rows, ref)
    print("note: peak RSS = getrusage ru_maxrss of each side's own fresh process (imports, weights and "
          "optimizer state included); setup RSS = resident size before the first step")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": {k: v for k, v in vars(args).items() if k != "worker"},
                                               "rows": rows}, indent=1))


if __name__ == "__main__":
    main()

"""Step time and communication share of TP / PP / DP layouts of a small GPT-NeoX, side by side with one process.

    python tools/bench/parallel.py                                   # CPU: forked gloo ranks per layout
    python tools/bench/parallel.py --layouts single,tp2,dp2-zero1 --steps 20 --hidden 256
    python tools/bench/parallel.py --device cuda                     # one GPU per rank, NCCL, forked ranks
    torchrun --nproc-per-node 8 tools/bench/parallel.py --device cuda  # the launcher's world for every layout

Every layout runs the real training engine (neox.training.engine.Engine: pipeline schedule, DP buckets,
ZeRO-1, sequence parallel) on the same synthetic samples with the same global batch, so rows differ only
in how the work is split; the final loss column is a sanity check that they computed the same thing.

Communication share = time inside torch.distributed calls (collectives, batched p2p, and the ``wait()`` of
async handles) / step time, averaged over ranks. It includes waiting for peers, so pipeline bubbles and
load imbalance show up as communication. On CUDA every timed call is bracketed by device synchronisation
(kernels are asynchronous), which also stops compute/communication overlap: read it as an upper bound.

Layout names: ``single`` or dash-joined parts ``tp<N>``, ``pp<N>``, ``dp<N>``, ``vpp<N>``, ``sp``,
``zero1`` (e.g. ``tp2-pp2-dp2``, ``tp2-sp``, ``dp4-zero1``). Without a launcher a missing size is 1; under
torchrun every layout uses the whole world, a missing dp is inferred and a layout that does not fit is
skipped with a note.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

DEFAULT_LAYOUTS = "single,tp2,pp2,dp2,tp2-pp2-dp2"


# ------------------------------------------------------------------------------ communication timer
class CommTimer:
    """Wraps torch.distributed's communication functions, summing the seconds spent inside them.

    Module attributes that captured a function at import (``_all_gather_single = dist.all_gather_into_tensor``)
    are rebound too. One per process; the bench installs it once (forked ranks inherit it and each keeps
    its own counters). isend/irecv stay unwrapped: P2POp checks their identity; batch_isend_irecv and the
    handles' wait() carry their time.
    """

    NAMES = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_single", "reduce_scatter",
             "reduce_scatter_tensor", "reduce_scatter_single", "broadcast", "reduce", "barrier", "send", "recv",
             "batch_isend_irecv", "all_to_all", "all_to_all_single", "gather", "scatter")

    def __init__(self):
        self.seconds = 0.0
        self.calls = 0
        self.cuda = False
        self._depth = 0

    def _sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def _timed(self, fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            if self._depth:
                return fn(*args, **kwargs)
            self._depth += 1
            self._sync()
            t0 = time.perf_counter()
            try:
                out = fn(*args, **kwargs)
                self._sync()
            finally:
                self.seconds += time.perf_counter() - t0
                self.calls += 1
                self._depth -= 1
            if isinstance(out, list):
                return [self._work(w) for w in out]
            return self._work(out)
        return wrapper

    def _work(self, work):
        return work if work is None or not hasattr(work, "wait") else _TimedWork(work, self)

    def install(self) -> None:
        wrapped_by_id = {}  # id(original) -> wrapper (ids: some module attributes are unhashable callables)
        for name in self.NAMES:
            fn = getattr(dist, name, None)
            if fn is not None and not getattr(fn, "_comm_timed", False):
                wrapped = self._timed(fn)
                wrapped._comm_timed = True
                setattr(dist, name, wrapped)
                wrapped_by_id[id(fn)] = (fn, wrapped)
        for mod_name, mod in list(sys.modules.items()):
            if mod is None or not mod_name.startswith(("megatron_ext", "neox")):
                continue
            for attr, val in list(vars(mod).items()):
                hit = wrapped_by_id.get(id(val))
                if hit is not None and hit[0] is val:
                    setattr(mod, attr, hit[1])

    def reset(self) -> tuple[float, int]:
        out = (self.seconds, self.calls)
        self.seconds, self.calls = 0.0, 0
        return out


class _TimedWork:
    """An async handle whose wait() is counted as communication."""

    def __init__(self, work, timer: CommTimer):
        self._work, self._timer = work, timer

    def wait(self, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            out = self._work.wait(*args, **kwargs)
            self._timer._sync()
            return out
        finally:
            self._timer.seconds += time.perf_counter() - t0

    def __getattr__(self, name):
        return getattr(self._work, name)


TIMER = CommTimer()


# ------------------------------------------------------------------------------ layouts
@dataclass(frozen=True)
class Layout:
    name: str
    tp: int = 1
    pp: int = 1
    dp: int | None = None  # None: 1 when forking ranks, inferred from the world under a launcher
    vpp: int | None = None
    sp: bool = False
    zero1: bool = False

    @property
    def single(self) -> bool:
        return self.name == "single"

    def ranks(self, world: int | None = None) -> int:
        dp = self.dp or (world // (self.tp * self.pp) if world else 1)
        return self.tp * self.pp * dp


def parse_layout(text: str) -> Layout:
    name = text.strip().lower()
    if name in ("single", "1"):
        return Layout("single")
    sizes: dict = {}
    for part in re.split(r"[-x_]", name):
        m = re.fullmatch(r"(tp|pp|dp|vpp)(\d+)", part)
        if m and int(m.group(2)) >= 1:
            sizes[m.group(1)] = int(m.group(2))
        elif part in ("sp", "zero1"):
            sizes[part] = True
        else:
            raise SystemExit(f"--layouts: cannot read {part!r} in {text!r}; use e.g. single, tp2, pp2-vpp2, "
                             "tp2-pp2-dp2, tp2-sp, dp2-zero1")
    return Layout(name, **sizes)


# ------------------------------------------------------------------------------ one rank
class SyntheticSamples:
    """Deterministic GPT samples: sample i depends only on i, so every layout reads the same data."""

    def __init__(self, n: int, seq: int, vocab: int):
        g = torch.Generator().manual_seed(1234)
        self.data = torch.randint(0, vocab, (n, seq + 1), generator=g)
        self.seq = seq

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        row = self.data[i]
        return {"tokens": row[:-1], "labels": row[1:], "loss_mask": torch.ones(self.seq)}


def make_config(args, layout: Layout, dp: int):
    from neox.config import NeoXConfig

    micro = args.global_batch // (args.micro_batches * dp)
    if micro < 1 or micro * args.micro_batches * dp != args.global_batch:
        raise SystemExit(f"layout {layout.name}: --global-batch {args.global_batch} does not split into "
                         f"{args.micro_batches} micro-batches x DP {dp}; "
                         f"choose a multiple of {args.micro_batches * dp}")
    return NeoXConfig.from_dict(dict(
        num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=args.heads, seq_length=args.seq,
        max_position_embeddings=args.seq, vocab_size=args.vocab, rotary_pct=0.25, gpt_j_residual=True,
        no_weight_tying=True, lr=1e-3, train_iters=args.warmup + args.steps, train_micro_batch_size_per_gpu=micro,
        gradient_accumulation_steps=args.micro_batches, clip_grad=1.0, seed=7,
        model_parallel_size=layout.tp, pipe_parallel_size=layout.pp, num_virtual_pipeline_stages=layout.vpp,
        pipeline_schedule="interleaved" if (layout.vpp or 1) > 1 else "1f1b",
        sequence_parallel=layout.sp, zero_stage=1 if layout.zero1 else 0,
    ))


def bench_rank(args_dict: dict, layout: Layout) -> dict:
    """Build the engine for this rank's share of ``layout``, run warmup + timed steps, return timings."""
    from megatron_ext.topology import ParallelState
    from neox.data.gpt_dataset import make_batch_iterator
    from neox.training.engine import Engine

    args = argparse.Namespace(**args_dict)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
        device = torch.device("cuda", torch.cuda.current_device())
        TIMER.cuda = True
    if layout.single:
        ps = ParallelState.single()
    else:
        ps = ParallelState.from_sizes(tp=layout.tp, pp=layout.pp, dp=layout.dp, vpp=layout.vpp)
    cfg = make_config(args, layout, ps.dp_size)
    t = cfg.training
    torch.manual_seed(t.seed)
    torch.set_default_device(device)
    try:
        engine = Engine(cfg, ps, init_seed=t.seed)
    finally:
        torch.set_default_device(None)
    ds = SyntheticSamples((args.warmup + args.steps) * args.global_batch, args.seq, args.vocab)
    it = make_batch_iterator(ds, t.train_micro_batch_size_per_gpu, dp_rank=ps.dp_rank, dp_size=ps.dp_size)
    step_s, comm_s, loss = [], [], float("nan")
    for step in range(args.warmup + args.steps):
        batches = [{k: v.to(device) for k, v in next(it).items()} for _ in range(t.gradient_accumulation_steps)]
        if device.type == "cuda":
            torch.cuda.synchronize()
        TIMER.reset()
        t0 = time.perf_counter()
        loss, _ = engine.train_batch(batches)
        if device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - t0
        comm, _ = TIMER.reset()
        if step >= args.warmup:
            step_s.append(elapsed)
            comm_s.append(comm)
    return {"step_s": step_s, "comm_s": comm_s, "loss": loss, "dp": ps.dp_size, "world": ps.world_size}


def summarise(layout: Layout, per_rank: list[dict]) -> dict:
    """Step i takes as long as its slowest rank; the median over steps; comm share averaged over ranks."""
    steps = [max(r["step_s"][i] for r in per_rank) for i in range(len(per_rank[0]["step_s"]))]
    comm = statistics.fmean(sum(r["comm_s"]) / sum(r["step_s"]) for r in per_rank)
    r0 = per_rank[0]
    name = layout.name if layout.single or layout.dp or r0["dp"] == 1 else f"{layout.name} (dp{r0['dp']})"
    return {"layout": name, "ranks": len(per_rank) if not layout.single else 1,
            "median_step_ms": 1e3 * statistics.median(steps), "comm_pct": 100 * comm, "loss": r0["loss"]}


# ------------------------------------------------------------------------------ drivers
def run_forked(args, layouts: list[Layout]) -> tuple[list[dict], list[str]]:
    """No launcher: each layout on its own freshly forked ranks (gloo on CPU, NCCL on CUDA)."""
    from megatron_ext.testing import run_distributed

    backend = "nccl" if args.device == "cuda" else "gloo"
    rows, notes = [], []
    if args.device == "cpu":
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        biggest = max(lay.ranks() for lay in layouts)
        if biggest > cores:
            notes.append(f"{biggest} ranks on {cores} CPU cores: ranks share cores, so step times include "
                         "waiting for a core (and comm % waiting for descheduled peers)")
    elif torch.cuda.device_count() < max(lay.ranks() for lay in layouts):
        raise SystemExit(f"--device cuda: {torch.cuda.device_count()} GPUs, layouts need up to "
                         f"{max(lay.ranks() for lay in layouts)}")
    for lay in layouts:
        per_rank = run_distributed(bench_rank, lay.ranks(), vars(args), lay, timeout=args.timeout, backend=backend)
        rows.append(summarise(lay, per_rank))
    return rows, notes


def run_launched(args, layouts: list[Layout]) -> tuple[list[dict], list[str]]:
    """Under torchrun / srun / mpirun: every layout spans the whole world; rank 0 collects."""
    from megatron_ext.launch import init_distributed

    rank, world = init_distributed(backend="nccl" if args.device == "cuda" else "gloo", timeout_s=args.timeout)
    if args.device == "cpu":
        torch.set_num_threads(1)
    rows, notes = [], []
    for lay in layouts:
        if not lay.single and (world % (lay.tp * lay.pp) or lay.ranks(world) != world):
            notes.append(f"skipped {lay.name}: needs {lay.ranks(world)} ranks, launched with {world}")
            continue
        result = bench_rank(vars(args), lay)  # single: every rank runs its own copy, no communication
        gathered = [None] * world
        dist.all_gather_object(gathered, result)
        rows.append(summarise(lay, gathered[:1] if lay.single else gathered))
    return (rows, notes) if rank == 0 else ([], [])


def format_table(rows: list[dict]) -> str:
    base = next((r["median_step_ms"] for r in rows if r["layout"] == "single"), None)
    header = f"{'layout':<22} {'ranks':>5} {'median step ms':>15} {'vs single':>10} {'comm %':>7} {'loss':>9}"
    lines = [header, "-" * len(header)]
    for r in rows:
        ratio = f"{r['median_step_ms'] / base:.2f}x" if base else "n/a"
        lines.append(f"{r['layout']:<22} {r['ranks']:>5} {r['median_step_ms']:>15.1f} {ratio:>10} "
                     f"{r['comm_pct']:>7.1f} {r['loss']:>9.5f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layouts", default=DEFAULT_LAYOUTS, help=f"comma-separated (default {DEFAULT_LAYOUTS})")
    p.add_argument("--steps", type=int, default=10, help="timed optimizer steps per layout (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--global-batch", type=int, default=8, help="sequences per optimizer step, every layout")
    p.add_argument("--micro-batches", type=int, default=4, help="micro-batches per step (gradient accumulation)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--timeout", type=float, default=600, help="seconds per layout before its ranks are killed")
    p.add_argument("--json", help="also write the rows to this file")
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0")
    layouts = [parse_layout(s) for s in args.layouts.split(",") if s.strip()]

    import neox.training.engine  # noqa: F401 - import before forking ranks, and before the timer rebinds
    from megatron_ext.launch import detect_launcher_env

    TIMER.install()
    launched = detect_launcher_env(os.environ)["world_size"] > 1
    rows, notes = (run_launched if launched else run_forked)(args, layouts)
    if launched and dist.is_initialized():
        dist.destroy_process_group()
    if not rows:
        return 0  # not rank 0
    print(f"GPT-NeoX {args.layers} layers, hidden {args.hidden}, seq {args.seq}, global batch {args.global_batch} "
          f"= {args.micro_batches} micro-batches; {args.device}, median of {args.steps} steps after {args.warmup}")
    print(format_table(rows))
    for n in notes:
        print(f"note: {n}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows, "notes": notes}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""run_distributed: run a function on N forked ranks with a gloo process group, fast and hang-proof.

Children are forked (torch is already imported, so start-up costs milliseconds), run with one
intra-op thread each, rendezvous through a file store, and report back over a pipe. The parent
watches all pipes and process sentinels at once: the first failure or the deadline kills every
child, so a rank stuck in a collective never hangs the test run.
"""

from __future__ import annotations

import io
import multiprocessing as mp
import os
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from multiprocessing.connection import wait
from typing import Any

import torch
import torch.distributed as dist

_GRACE_S = 0.5  # after a first failure, wait this long to collect other ranks' errors


def _wait_for_parent_kill(limit_s: float = 600.0) -> None:
    """Block until the parent kills this child (or is gone itself, so nothing lingers)."""
    parent, deadline = os.getppid(), time.monotonic() + limit_s
    while os.getppid() == parent and time.monotonic() < deadline:
        time.sleep(0.2)


def _child(fn: Callable, rank: int, world_size: int, store_path: str, backend: str, conn, args, kwargs):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world_size))
    if sys.platform.startswith("linux"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    code = 0
    try:
        torch.set_num_threads(1)
        dist.init_process_group(backend, init_method=f"file://{store_path}", rank=rank, world_size=world_size)
        result = fn(*args, **kwargs)
        # torch.save bytes, not the pipe's own pickling: multiprocessing shares tensors through file
        # descriptors that die with this process, so the parent could not read them after we exit
        buf = io.BytesIO()
        torch.save(result, buf)
        conn.send(("ok", buf.getvalue()))
        # Stay alive until the parent kills us: a rank that exits as soon as its own work is done closes
        # its sockets under peers still inside a collective (or still connecting), failing them.
        conn.close()
        _wait_for_parent_kill()
    except BaseException as exc:  # noqa: BLE001 - everything goes back to the parent
        tb = traceback.format_exc()
        try:
            conn.send(("error", f"{type(exc).__name__}: {exc}", tb))
        except Exception:  # unpicklable result etc.
            pass
        code = 1
        # Stay alive (blocked) until the parent kills us: exiting now would close our sockets and make
        # the healthy ranks fail with secondary "connection closed" errors that hide the real one.
        conn.close()
        _wait_for_parent_kill()
    finally:
        try:
            if dist.is_initialized():
                dist.destroy_process_group()
        except Exception:
            pass
        if not conn.closed:
            conn.close()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)  # skip the parent's atexit handlers (pytest, etc.) inherited by fork


def _kill(procs) -> None:
    for p in procs:
        if p.is_alive():
            p.kill()
    for p in procs:
        p.join(timeout=5)


def run_distributed(fn: Callable, world_size: int, *args: Any, timeout: float = 120, backend: str = "gloo",
                    **kwargs: Any) -> list:
    """Run ``fn(*args, **kwargs)`` on ``world_size`` forked ranks; return their results in rank order.

    Each child has RANK/WORLD_SIZE/LOCAL_RANK set and torch.distributed initialised. Results must be
    picklable. Raises one RuntimeError naming the failing rank(s) with a traceback, or the ranks that
    had not finished when ``timeout`` seconds ran out; all children are killed in both cases.
    """
    if world_size < 1:
        raise ValueError(f"run_distributed: world_size must be >= 1, got {world_size}")
    ctx = mp.get_context("fork")
    tmpdir = tempfile.mkdtemp(prefix="neox_dist_")
    store_path = os.path.join(tmpdir, "store")
    procs, conns = [], {}
    try:
        for rank in range(world_size):
            recv, send = ctx.Pipe(duplex=False)
            child_args = (fn, rank, world_size, store_path, backend, send, args, kwargs)
            p = ctx.Process(target=_child, args=child_args, daemon=True, name=f"rank{rank}")
            p.start()
            send.close()
            procs.append(p)
            conns[recv] = rank
        return _collect(procs, conns, world_size, timeout)
    finally:
        _kill(procs)
        for c in conns:
            c.close()
        shutil.rmtree(tmpdir, ignore_errors=True)


def _collect(procs, conns: dict, world_size: int, timeout: float) -> list:
    results: dict[int, Any] = {}
    errors: dict[int, tuple[str, str]] = {}
    deadline = time.monotonic() + timeout
    first_error_at = None
    pending = dict(conns)
    sentinels = {p.sentinel: r for r, p in enumerate(procs)}
    while pending:
        now = time.monotonic()
        limit = deadline if first_error_at is None else min(deadline, first_error_at + _GRACE_S)
        if now >= limit:
            break
        ready = wait(list(pending) + [s for s, r in sentinels.items() if r in pending.values()], limit - now)
        for obj in ready:
            if obj in pending:
                rank = pending.pop(obj)
                try:
                    msg = obj.recv()
                except EOFError:  # died without reporting (segfault, os._exit, killed)
                    procs[rank].join(timeout=1)
                    msg = ("error", f"process exited with code {procs[rank].exitcode} without a result", "")
                if msg[0] == "ok":
                    results[rank] = torch.load(io.BytesIO(msg[1]), weights_only=False)  # our own child
                else:
                    errors[rank] = (msg[1], msg[2])
            elif obj in sentinels:
                rank = sentinels[obj]
                conn = next((c for c, r in pending.items() if r == rank), None)
                if conn is not None and not conn.poll():
                    pending.pop(conn)
                    procs[rank].join(timeout=1)
                    errors[rank] = (f"process exited with code {procs[rank].exitcode} without a result", "")
        if errors and first_error_at is None:
            first_error_at = time.monotonic()

    if errors:
        first = next(iter(errors))  # dicts keep arrival order: the first failure is the likely cause
        summary, tb = errors[first]
        lines = [f"run_distributed: rank(s) {sorted(errors)} of {world_size} failed; rank {first}: {summary}"]
        others = sorted({e[0] for e in errors.values()} - {summary})
        lines += [f"  (another rank raised: {o})" for o in others]
        if tb:
            lines += [f"--- traceback of rank {first} ---", tb.rstrip()]
        raise RuntimeError("\n".join(lines))
    if pending:
        missing = sorted(pending.values())
        raise RuntimeError(
            f"run_distributed: timed out after {timeout:.0f}s; rank(s) {missing} of {world_size} "
            f"did not finish (finished: {sorted(results)}); all ranks were killed"
        )
    return [results[r] for r in range(world_size)]

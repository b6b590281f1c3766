"""Pipeline schedules as data: per-rank lists of small action records.

A schedule is written as a *compute order* per pp rank (``Forward``/``Backward`` of a microbatch on a
local chunk). :func:`add_communication` then lowers all ranks' orders together into action lists with
explicit, batched communication (``Exchange`` records holding ``Send*``/``Recv*`` ops). A new schedule
(e.g. for RLHF generation or scoring) is only a new compute order; the engine never changes.

How the lowering guarantees matching order and no deadlock (NCCL has no tags, matches p2p per pair in
issue order, and a send may block until its receive is posted):

* It simulates all ranks on a shared clock (forward costs 1 tick, backward 2). When a compute op
  finishes at tick ``t`` on rank ``a``, its send is appended to ``a``'s exchange for tick ``t`` and
  the matching receive to the receiver's exchange for the same tick, in the same call. So every
  exchange holds only ops whose partners sit in the partner's exchange *of the same tick*, and for
  every ordered pair (a, b) the sends a->b and receives b<-a are appended in one common order:
  pairwise FIFO matching holds by construction, also inside one batch and when prev == next (pp=2).
* Each rank executes its exchanges in increasing tick order with only local compute between them.
  By induction on ticks: once every exchange of ticks < t has completed, every rank can reach its
  tick-t exchange, whose partners are all tick-t exchanges -> all complete. Hence no deadlock, even
  if every send is a rendezvous. A rank receives data no later than it needs it (possibly earlier;
  it then waits in a buffer), and the simulation raises if a compute order is infeasible.

:func:`megatron_ext.pipeline.validate.check_schedule` re-checks both properties independently.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Union

from .partition import rank_and_chunk_of, stage_of


@dataclass(frozen=True)
class Forward:
    """Run forward_step(chunk, microbatch, input) on this rank's local ``chunk``."""

    microbatch: int
    chunk: int = 0


@dataclass(frozen=True)
class Backward:
    """Back-propagate microbatch ``microbatch`` through local ``chunk``."""

    microbatch: int
    chunk: int = 0


@dataclass(frozen=True)
class SendActivation:
    """Send the output of Forward(microbatch, chunk) to pp rank ``peer`` (next model stage)."""

    microbatch: int
    chunk: int
    peer: int


@dataclass(frozen=True)
class RecvActivation:
    """Receive the input of Forward(microbatch, chunk) from pp rank ``peer`` (previous model stage)."""

    microbatch: int
    chunk: int
    peer: int


@dataclass(frozen=True)
class SendGrad:
    """Send the input gradient of Backward(microbatch, chunk) to pp rank ``peer``."""

    microbatch: int
    chunk: int
    peer: int


@dataclass(frozen=True)
class RecvGrad:
    """Receive the output gradient needed by Backward(microbatch, chunk) from pp rank ``peer``."""

    microbatch: int
    chunk: int
    peer: int


CommOp = Union[SendActivation, RecvActivation, SendGrad, RecvGrad]


@dataclass(frozen=True)
class Exchange:
    """One batched p2p call (batch_isend_irecv) issuing ``ops`` in this order; all finish before moving on."""

    ops: tuple[CommOp, ...]


Compute = Union[Forward, Backward]
Action = Union[Forward, Backward, Exchange]

FORWARD_COST, BACKWARD_COST = 1, 2  # simulated ticks; only decide how communication is batched


def _check_sizes(pp_size: int, pp_rank: int | None, num_microbatches: int, vpp_size: int) -> None:
    for name, val in (("pp_size", pp_size), ("num_microbatches", num_microbatches), ("vpp_size", vpp_size)):
        if not isinstance(val, int) or val < 1:
            raise ValueError(f"pipeline schedule: {name} must be a positive integer, got {val!r}")
    if pp_rank is not None and not 0 <= pp_rank < pp_size:
        raise ValueError(f"pipeline schedule: pp_rank={pp_rank} is outside [0, {pp_size})")


def add_communication(orders: list[list[Compute]], pp_size: int, vpp_size: int = 1) -> list[list[Action]]:
    """Lower every rank's compute order into action lists with batched, matched communication.

    ``orders[r]`` is pp rank r's sequence of Forward/Backward ops. Returns ``actions[r]``. Raises
    ValueError when the orders cannot run (a rank waits for data that is never produced).
    """
    assert len(orders) == pp_size
    last_stage = pp_size * vpp_size - 1
    pos = [0] * pp_size
    busy_until = [0] * pp_size
    running: list[Compute | None] = [None] * pp_size
    have: list[set] = [set() for _ in range(pp_size)]  # ("act"|"grad"|"fwd", mb, chunk) available
    out: list[list[Action]] = [[] for _ in range(pp_size)]
    t = 0
    while any(p < len(o) for p, o in zip(pos, orders)) or any(op is not None for op in running):
        # 1. ops finishing now emit sends (sender side) and receives (receiver side) for tick t
        group: list[list[CommOp]] = [[] for _ in range(pp_size)]
        for r in range(pp_size):
            op = running[r]
            if op is None or busy_until[r] != t:
                continue
            running[r] = None
            stage = stage_of(pp_size, r, op.chunk)
            if isinstance(op, Forward):
                have[r].add(("fwd", op.microbatch, op.chunk))
                if stage < last_stage:
                    dst, dchunk = rank_and_chunk_of(pp_size, stage + 1)
                    group[r].append(SendActivation(op.microbatch, op.chunk, dst))
                    group[dst].append(RecvActivation(op.microbatch, dchunk, r))
                    have[dst].add(("act", op.microbatch, dchunk))
            elif stage > 0:
                dst, dchunk = rank_and_chunk_of(pp_size, stage - 1)
                group[r].append(SendGrad(op.microbatch, op.chunk, dst))
                group[dst].append(RecvGrad(op.microbatch, dchunk, r))
                have[dst].add(("grad", op.microbatch, dchunk))
        for r in range(pp_size):
            if group[r]:
                out[r].append(Exchange(tuple(group[r])))
        # 2. idle ranks start their next op if its inputs have arrived
        for r in range(pp_size):
            if running[r] is not None or pos[r] >= len(orders[r]):
                continue
            op = orders[r][pos[r]]
            stage = stage_of(pp_size, r, op.chunk)
            if isinstance(op, Forward):
                ready = stage == 0 or ("act", op.microbatch, op.chunk) in have[r]
                cost = FORWARD_COST
            else:
                ready = ("fwd", op.microbatch, op.chunk) in have[r] and (
                    stage == last_stage or ("grad", op.microbatch, op.chunk) in have[r])
                cost = BACKWARD_COST
            if ready:
                out[r].append(op)
                running[r], busy_until[r] = op, t + cost
                pos[r] += 1
        if all(op is None for op in running) and any(p < len(o) for p, o in zip(pos, orders)):
            stuck = {r: orders[r][pos[r]] for r in range(pp_size) if pos[r] < len(orders[r])}
            raise ValueError(f"pipeline schedule cannot run: every rank waits for data never produced; "
                             f"next ops {stuck}")
        t = min((busy_until[r] for r in range(pp_size) if running[r] is not None), default=t + 1)
    return [_merge_adjacent(actions) for actions in out]


def _merge_adjacent(actions: list[Action]) -> list[Action]:
    """Fuse exchanges with no compute between them into one batch (fewer, larger p2p calls).

    Still deadlock-free: a merged batch only posts later-tick ops *earlier*, and the induction on
    ticks above needs only that a rank posts its tick-t ops once all its ops of earlier ticks are done.
    """
    merged: list[Action] = []
    for a in actions:
        if isinstance(a, Exchange) and merged and isinstance(merged[-1], Exchange):
            merged[-1] = Exchange(merged[-1].ops + a.ops)
        else:
            merged.append(a)
    return merged


# ---------------------------------------------------------------------------------- compute orders
def _forward_order(num_microbatches: int, vpp_size: int) -> list[Forward]:
    return [Forward(mb, c) for c in range(vpp_size) for mb in range(num_microbatches)]


def gpipe_order(pp_size: int, pp_rank: int, num_microbatches: int, vpp_size: int = 1) -> list[Compute]:
    """All forwards, then all backwards (most activation memory: every microbatch is in flight)."""
    back = [Backward(mb, c) for c in reversed(range(vpp_size)) for mb in range(num_microbatches)]
    return [*_forward_order(num_microbatches, vpp_size), *back]


def forward_only_order(pp_size: int, pp_rank: int, num_microbatches: int, vpp_size: int = 1) -> list[Compute]:
    """Evaluation: forwards only."""
    return list(_forward_order(num_microbatches, vpp_size))


def one_f_one_b_order(pp_size: int, pp_rank: int, num_microbatches: int, vpp_size: int = 1) -> list[Compute]:
    """PipeDream-flush 1F1B: pp-rank-1 warm-up forwards, then alternate, then drain the backwards.

    At most ``pp_size - pp_rank`` microbatches are in flight on a rank. vpp > 1 means interleaved.
    """
    if vpp_size > 1:
        return interleaved_order(pp_size, pp_rank, num_microbatches, vpp_size)
    warmup = min(pp_size - pp_rank - 1, num_microbatches)
    order: list[Compute] = [Forward(mb) for mb in range(warmup)]
    for i in range(num_microbatches - warmup):
        order += [Forward(warmup + i), Backward(i)]
    order += [Backward(mb) for mb in range(num_microbatches - warmup, num_microbatches)]
    return order


def interleaved_order(pp_size: int, pp_rank: int, num_microbatches: int, vpp_size: int) -> list[Compute]:
    """Megatron's interleaved 1F1B over ``vpp_size`` model chunks per rank.

    Virtual microbatch k walks groups of ``pp_size`` microbatches through the chunks:
    chunk = (k mod pp*vpp) // pp, microbatch = (k // (pp*vpp)) * pp + k mod pp; backwards visit the
    chunks in reverse. Warm-up is 2*(pp-rank-1) + (vpp-1)*pp forwards (everything if M == pp).
    """
    if vpp_size == 1:
        return one_f_one_b_order(pp_size, pp_rank, num_microbatches)
    if num_microbatches % pp_size != 0:
        raise ValueError(
            f"interleaved schedule: num_microbatches={num_microbatches} must be a multiple of "
            f"pp_size={pp_size} when vpp_size={vpp_size} > 1; change the microbatch count or use vpp_size=1"
        )
    group = pp_size * vpp_size
    total = num_microbatches * vpp_size

    def key(k: int, backward: bool) -> tuple[int, int]:
        chunk = (k % group) // pp_size
        return (k // group) * pp_size + k % pp_size, (vpp_size - 1 - chunk if backward else chunk)

    if num_microbatches == pp_size:
        warmup = total
    else:
        warmup = min((pp_size - pp_rank - 1) * 2 + (vpp_size - 1) * pp_size, total)
    order: list[Compute] = [Forward(*key(k, False)) for k in range(warmup)]
    for k in range(total - warmup):
        order += [Forward(*key(warmup + k, False)), Backward(*key(k, True))]
    order += [Backward(*key(k, True)) for k in range(total - warmup, total)]
    return order


# ---------------------------------------------------------------------------------- builders
OrderFn = Callable[[int, int, int, int], list[Compute]]
_ORDERS: dict[str, OrderFn] = {
    "gpipe": gpipe_order,
    "1f1b": one_f_one_b_order,
    "interleaved": interleaved_order,
    "forward_only": forward_only_order,
}


@functools.lru_cache(maxsize=256)
def _lowered(name: str, pp_size: int, num_microbatches: int, vpp_size: int) -> tuple[tuple[Action, ...], ...]:
    orders = [_ORDERS[name](pp_size, r, num_microbatches, vpp_size) for r in range(pp_size)]
    return tuple(tuple(a) for a in add_communication(orders, pp_size, vpp_size))


def build_all_ranks(name: str, pp_size: int, num_microbatches: int, vpp_size: int = 1) -> list[list[Action]]:
    """Every pp rank's action list for schedule ``name`` (what the validator and tests inspect)."""
    if name not in _ORDERS:
        raise ValueError(f"unknown pipeline schedule {name!r}; known schedules: {', '.join(_ORDERS)}")
    _check_sizes(pp_size, None, num_microbatches, vpp_size)
    if name == "interleaved" and vpp_size > 1 and num_microbatches % pp_size != 0:
        interleaved_order(pp_size, 0, num_microbatches, vpp_size)  # raises the clear error
    return [list(a) for a in _lowered(name, pp_size, num_microbatches, vpp_size)]


def get_schedule(name: str, pp_size: int, pp_rank: int, num_microbatches: int, vpp_size: int = 1) -> list[Action]:
    """This rank's action list for schedule ``name`` ("gpipe", "1f1b", "interleaved", "forward_only")."""
    _check_sizes(pp_size, pp_rank, num_microbatches, vpp_size)
    return build_all_ranks(name, pp_size, num_microbatches, vpp_size)[pp_rank]


def gpipe(pp_size: int, pp_rank: int, num_microbatches: int, vpp_size: int = 1) -> list[Action]:
    return get_schedule("gpipe", pp_size, pp_rank, num_microbatches, vpp_size)


def one_f_one_b(pp_size: int, pp_rank: int, num_microbatches: int, vpp_size: int = 1) -> list[Action]:
    return get_schedule("1f1b", pp_size, pp_rank, num_microbatches, vpp_size)


def interleaved_one_f_one_b(pp_size: int, pp_rank: int, num_microbatches: int, vpp_size: int) -> list[Action]:
    return get_schedule("interleaved", pp_size, pp_rank, num_microbatches, vpp_size)


def forward_only(pp_size: int, pp_rank: int, num_microbatches: int, vpp_size: int = 1) -> list[Action]:
    return get_schedule("forward_only", pp_size, pp_rank, num_microbatches, vpp_size)


def schedule_from_orders(orders: list[list[Compute]], pp_size: int, pp_rank: int, vpp_size: int = 1) -> list[Action]:
    """This rank's action list for custom per-rank compute orders (new schedules are just data)."""
    _check_sizes(pp_size, pp_rank, 1, vpp_size)
    if len(orders) != pp_size:
        raise ValueError(f"schedule_from_orders: need one compute order per pp rank ({pp_size}), got {len(orders)}")
    return add_communication(orders, pp_size, vpp_size)[pp_rank]

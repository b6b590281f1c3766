"""Check a set of per-rank action lists without running them: coverage, dependencies, FIFO, deadlock.

Independent of how the lists were built, so it also checks hand-written or future schedules. The
communication model is the strictest real one (NCCL): no tags; per ordered pair of ranks the k-th
send matches the k-th receive; an Exchange is one batch whose ops all must complete before the rank
moves on, and an op completes only while both its batch and its partner's batch are posted (a send
may block until the receive exists).
"""

from __future__ import annotations

from .partition import rank_and_chunk_of, stage_of
from .schedules import Action, Backward, Exchange, Forward, RecvActivation, SendActivation, SendGrad


def _label(pp_size: int, rank: int, op) -> tuple[str, int, int]:
    """What travels: (kind, microbatch, consumer model stage) -- equal on both ends of a matched pair."""
    stage = stage_of(pp_size, rank, op.chunk)
    if isinstance(op, SendActivation):
        return "act", op.microbatch, stage + 1
    if isinstance(op, RecvActivation):
        return "act", op.microbatch, stage
    if isinstance(op, SendGrad):
        return "grad", op.microbatch, stage - 1
    return "grad", op.microbatch, stage


def _check_rank(actions: list[Action], pp_size: int, vpp_size: int, rank: int, m: int, forward_only: bool) -> None:
    last = pp_size * vpp_size - 1
    done: dict[str, set] = {k: set() for k in ("fwd", "bwd", "act", "grad", "sent_act", "sent_grad")}
    where = f"rank {rank}"
    for i, a in enumerate(actions):
        if isinstance(a, Exchange):
            assert a.ops, f"{where} action {i}: empty Exchange"
            for op in a.ops:
                key = (op.microbatch, op.chunk)
                stage = stage_of(pp_size, rank, op.chunk)
                assert 0 <= op.chunk < vpp_size and 0 <= op.microbatch < m, f"{where}: {op} out of range"
                if isinstance(op, (SendActivation, RecvActivation)):
                    other = stage + 1 if isinstance(op, SendActivation) else stage - 1
                else:
                    other = stage - 1 if isinstance(op, SendGrad) else stage + 1
                assert 0 <= other <= last, f"{where} action {i}: {op} talks to missing stage {other}"
                assert op.peer == rank_and_chunk_of(pp_size, other)[0], f"{where} action {i}: {op} has wrong peer"
                if isinstance(op, SendActivation):
                    assert key in done["fwd"] and key not in done["sent_act"], f"{where} action {i}: bad {op}"
                    done["sent_act"].add(key)
                elif isinstance(op, SendGrad):
                    assert key in done["bwd"] and key not in done["sent_grad"], f"{where} action {i}: bad {op}"
                    done["sent_grad"].add(key)
                elif isinstance(op, RecvActivation):
                    assert key not in done["act"], f"{where} action {i}: {op} received twice"
                    done["act"].add(key)
                else:
                    assert key not in done["grad"], f"{where} action {i}: {op} received twice"
                    done["grad"].add(key)
            continue
        key = (a.microbatch, a.chunk)
        stage = stage_of(pp_size, rank, a.chunk)
        if isinstance(a, Forward):
            assert key not in done["fwd"], f"{where}: {a} runs twice"
            assert stage == 0 or key in done["act"], f"{where} action {i}: {a} runs before its input arrived"
            done["fwd"].add(key)
        else:
            assert isinstance(a, Backward), f"{where}: unknown action {a!r}"
            assert not forward_only, f"{where}: {a} in a forward-only schedule"
            assert key in done["fwd"] and key not in done["bwd"], f"{where} action {i}: {a} out of order"
            assert stage == last or key in done["grad"], f"{where} action {i}: {a} runs before its grad arrived"
            done["bwd"].add(key)
    every = {(mb, c) for mb in range(m) for c in range(vpp_size)}
    assert done["fwd"] == every, f"{where}: forwards missing {sorted(every - done['fwd'])}"
    if not forward_only:
        assert done["bwd"] == every, f"{where}: backwards missing {sorted(every - done['bwd'])}"
    sends_act = {k for k in every if stage_of(pp_size, rank, k[1]) < last}
    assert done["sent_act"] == sends_act, f"{where}: activation sends {sorted(done['sent_act'] ^ sends_act)} wrong"
    if not forward_only:
        sends_grad = {k for k in every if stage_of(pp_size, rank, k[1]) > 0}
        assert done["sent_grad"] == sends_grad, f"{where}: grad sends {sorted(done['sent_grad'] ^ sends_grad)} wrong"


def _check_fifo(all_actions: list[list[Action]], pp_size: int) -> dict:
    """Per ordered pair (src, dst): the send labels of src equal the receive labels of dst, in order."""
    sends: dict[tuple[int, int], list] = {}
    recvs: dict[tuple[int, int], list] = {}
    for r, actions in enumerate(all_actions):
        for a in actions:
            if isinstance(a, Exchange):
                for op in a.ops:
                    if isinstance(op, (SendActivation, SendGrad)):
                        sends.setdefault((r, op.peer), []).append(_label(pp_size, r, op))
                    else:
                        recvs.setdefault((op.peer, r), []).append(_label(pp_size, r, op))
    for pair in set(sends) | set(recvs):
        s, v = sends.get(pair, []), recvs.get(pair, [])
        assert s == v, f"channel {pair[0]}->{pair[1]}: sends {s} do not match receives {v} in order"
    return sends


def _check_no_deadlock(all_actions: list[list[Action]]) -> None:
    """Run all ranks under rendezvous semantics; fail if some rank can never finish."""
    n = len(all_actions)
    pos = [0] * n
    # index every comm op by (src, dst, k): its k-th position on that channel, on each side
    chan_count: dict[tuple[int, int, str], int] = {}
    op_key: dict[tuple[int, int, int], tuple] = {}  # (rank, action idx, op idx) -> channel key
    for r, actions in enumerate(all_actions):
        for i, a in enumerate(actions):
            if isinstance(a, Exchange):
                for j, op in enumerate(a.ops):
                    is_send = isinstance(op, (SendActivation, SendGrad))
                    src, dst = (r, op.peer) if is_send else (op.peer, r)
                    side = "s" if is_send else "r"
                    k = chan_count.get((src, dst, side), 0)
                    chan_count[(src, dst, side)] = k + 1
                    op_key[(r, i, j)] = (src, dst, k)
    completed: set[tuple] = set()  # (src, dst, k) channel messages delivered
    progress = True
    while progress:
        progress = False
        posted: dict[tuple, int] = {}  # channel message -> how many sides have it posted right now
        for r, actions in enumerate(all_actions):
            while pos[r] < len(actions) and not isinstance(actions[pos[r]], Exchange):
                pos[r] += 1  # local compute never blocks
                progress = True
            if pos[r] < len(actions):
                for j in range(len(actions[pos[r]].ops)):
                    key = op_key[(r, pos[r], j)]
                    posted[key] = posted.get(key, 0) + 1
        newly = {k for k, c in posted.items() if c == 2 and k not in completed}
        if newly:
            completed |= newly
            progress = True
        for r, actions in enumerate(all_actions):
            if pos[r] < len(actions):
                ops = actions[pos[r]].ops
                if all(op_key[(r, pos[r], j)] in completed for j in range(len(ops))):
                    pos[r] += 1
                    progress = True
    stuck = {r: all_actions[r][pos[r]] for r in range(n) if pos[r] < len(all_actions[r])}
    assert not stuck, f"deadlock: ranks blocked at {stuck}"


def check_schedule(all_actions: list[list[Action]], pp_size: int, num_microbatches: int, vpp_size: int = 1,
                   forward_only: bool = False) -> None:
    """Raise AssertionError describing the first problem in ``all_actions`` (one list per pp rank).

    Checks that each rank runs every (microbatch, chunk) forward (and backward) exactly once after
    its inputs arrived, sends each activation/grad once to the right peer, that every channel's
    sends and receives match in order (tag-free FIFO), and that rendezvous execution cannot deadlock.
    """
    assert len(all_actions) == pp_size, f"need {pp_size} rank lists, got {len(all_actions)}"
    for r, actions in enumerate(all_actions):
        _check_rank(actions, pp_size, vpp_size, r, num_microbatches, forward_only)
    _check_fifo(all_actions, pp_size)
    _check_no_deadlock(all_actions)

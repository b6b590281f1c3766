"""Pipeline schedules and partitioning, checked without running anything.

The validator simulates every rank's communication under NCCL's rules (no tags, per-pair FIFO,
rendezvous sends) and must accept every built-in schedule for many layouts and reject broken ones.
Orders are compared with megatron-core's schedule table and with brute-force partitions.
"""

import itertools

import pytest

from megatron_ext.pipeline import (
    Backward,
    Exchange,
    Forward,
    RecvActivation,
    SendActivation,
    add_communication,
    build_all_ranks,
    check_schedule,
    get_schedule,
    interleaved_one_f_one_b,
    partition_layers,
    schedule_from_orders,
)

NAMES = ("gpipe", "1f1b", "interleaved", "forward_only")


def _layouts():
    for pp, vpp in itertools.product(range(1, 7), range(1, 4)):
        for m in sorted({1, 2, 3, pp, pp + 1, 2 * pp, 3 * pp, 4 * pp + 1}):
            yield pp, vpp, m


@pytest.mark.parametrize("name", NAMES)
def test_builtin_schedules_match_and_cannot_deadlock(name):
    checked = 0
    for pp, vpp, m in _layouts():
        if name in ("1f1b", "interleaved") and vpp > 1 and m % pp:
            continue
        check_schedule(build_all_ranks(name, pp, m, vpp), pp, m, vpp, forward_only=name == "forward_only")
        checked += 1
    assert checked > 50


def _compute(actions):
    return [a for a in actions if isinstance(a, (Forward, Backward))]


def _max_in_flight(actions):
    live = peak = 0
    for a in _compute(actions):
        live += 1 if isinstance(a, Forward) else -1
        peak = max(peak, live)
    return peak


def test_memory_bounds():
    for pp, m in itertools.product(range(1, 6), (1, 3, 8)):
        for r in range(pp):
            assert _max_in_flight(get_schedule("1f1b", pp, r, m)) == min(pp - r, m)
            assert _max_in_flight(get_schedule("gpipe", pp, r, m)) == m


def test_interleaved_order_matches_megatron_table():
    schedules = pytest.importorskip("megatron.core.pipeline_parallel.schedules")
    for pp, vpp, groups in itertools.product((2, 3, 4), (2, 3), (1, 2, 3)):
        m = pp * groups
        table = schedules.get_schedule_table(m, vpp, pp)  # virtual microbatch k -> (microbatch, chunk)
        total = m * vpp
        for r in range(pp):
            warmup = total if m == pp else min(total, 2 * (pp - r - 1) + (vpp - 1) * pp)
            fwd = [Forward(*table[k]) for k in range(total)]
            bwd = [Backward(table[k][0], vpp - 1 - table[k][1]) for k in range(total)]
            want = fwd[:warmup]
            for k in range(total - warmup):
                want += [fwd[warmup + k], bwd[k]]
            want += bwd[total - warmup:]
            assert _compute(interleaved_one_f_one_b(pp, r, m, vpp)) == want, (pp, vpp, m, r)


def test_pp2_same_peer_both_directions_in_one_batch():
    # pp=2 interleaved: prev == next, so one batch can carry activations and grads to one peer.
    all_actions = build_all_ranks("interleaved", 2, 8, 2)
    mixed = [a for acts in all_actions for a in acts if isinstance(a, Exchange)
             and len({type(op).__name__.replace("Recv", "").replace("Send", "") for op in a.ops}) > 1]
    assert mixed


def test_validator_rejects_mismatched_fifo_order():
    # reorder one rank's two activation sends (same peer) -> receiver would get them swapped
    acts = build_all_ranks("forward_only", 2, 3)
    rank0 = [a for a in acts[0] if isinstance(a, Forward)]
    sends = [SendActivation(mb, 0, 1) for mb in (1, 0, 2)]
    acts[0] = [*rank0, Exchange(tuple(sends))]
    with pytest.raises(AssertionError, match="do not match"):
        check_schedule(acts, 2, 3, forward_only=True)


def test_validator_rejects_deadlock():
    # one receiving batch may span two of the sender's batches: fine
    ok = [[Forward(0), Forward(1), Exchange((SendActivation(0, 0, 1),)), Exchange((SendActivation(1, 0, 1),))],
          [Exchange((RecvActivation(0, 0, 0), RecvActivation(1, 0, 0))), Forward(0), Forward(1)]]
    check_schedule(ok, 2, 2, forward_only=True)
    # pp=2, vpp=2: rank 0 waits for chunk 1's input before sending chunk 0's output -> circular wait
    r0 = [Forward(0, 0), Exchange((RecvActivation(0, 1, 1),)), Exchange((SendActivation(0, 0, 1),)), Forward(0, 1),
          Exchange((SendActivation(0, 1, 1),))]
    r1 = [Exchange((RecvActivation(0, 0, 0),)), Forward(0, 0), Exchange((SendActivation(0, 0, 0),)),
          Exchange((RecvActivation(0, 1, 0),)), Forward(0, 1)]
    with pytest.raises(AssertionError, match="deadlock"):
        check_schedule([r0, r1], 2, 1, vpp_size=2, forward_only=True)
    # the same orders lowered by add_communication are fine
    fixed = add_communication([[Forward(0, 0), Forward(0, 1)], [Forward(0, 0), Forward(0, 1)]], 2, 2)
    check_schedule(fixed, 2, 1, vpp_size=2, forward_only=True)


def test_validator_rejects_missing_work():
    acts = build_all_ranks("1f1b", 3, 4)
    acts[2] = [a for a in acts[2] if a != Backward(3)]
    with pytest.raises(AssertionError, match="backwards missing|out of order|bad"):
        check_schedule(acts, 3, 4)


def test_custom_orders_are_lowered():
    # a made-up schedule: last rank does its backwards in reverse microbatch order
    pp, m = 3, 4
    orders = [[Forward(mb) for mb in range(m)] + [Backward(mb) for mb in range(m)] for _ in range(pp)]
    orders[-1] = [Forward(mb) for mb in range(m)] + [Backward(mb) for mb in reversed(range(m))]
    lowered = [schedule_from_orders(orders, pp, r) for r in range(pp)]
    check_schedule(lowered, pp, m)
    with pytest.raises(ValueError, match="cannot run"):  # rank 0 wants a grad before forwarding anything
        add_communication([[Backward(0), Forward(0)], [Forward(0), Backward(0)]], 2)


def test_schedule_errors():
    with pytest.raises(ValueError, match="known schedules: gpipe, 1f1b, interleaved, forward_only"):
        get_schedule("zero_bubble", 2, 0, 4)
    with pytest.raises(ValueError, match="multiple of pp_size=4"):
        get_schedule("interleaved", 4, 0, 6, vpp_size=2)
    with pytest.raises(ValueError, match="pp_rank"):
        get_schedule("1f1b", 2, 2, 4)


# ------------------------------------------------------------------------------------ partitioning
def test_partition_uniform_interleaved():
    assert partition_layers(8, 2) == [[(0, 4)], [(4, 8)]]
    # model stage m = chunk * pp + rank holds consecutive layers
    assert partition_layers(8, 2, vpp_size=2) == [[(0, 2), (4, 6)], [(2, 4), (6, 8)]]
    with pytest.raises(ValueError, match="not divisible"):
        partition_layers(10, 4)
    with pytest.raises(ValueError, match="known methods"):
        partition_layers(8, 2, method="magic")
    with pytest.raises(ValueError, match="one value per layer"):
        partition_layers(8, 2, method="parameters", weights=[1.0] * 7)


def _brute_force_best(weights, stages, first, last):
    n, best = len(weights), None
    for cuts in itertools.combinations(range(1, n), stages - 1):
        edges = (0, *cuts, n)
        loads = [sum(weights[a:b]) for a, b in zip(edges, edges[1:])]
        loads[0] += first
        loads[-1] += last
        best = max(loads) if best is None else min(best, max(loads))
    return best


def test_partition_parameters_is_optimal():
    import random

    rng = random.Random(0)
    for _ in range(60):
        n = rng.randint(4, 10)
        pp, vpp = rng.choice([(2, 1), (3, 1), (2, 2), (4, 1)])
        if n < pp * vpp:
            continue
        weights = [rng.randint(1, 20) for _ in range(n)]
        first, last = rng.randint(0, 30), rng.randint(0, 30)
        parts = partition_layers(n, pp, vpp, method="parameters", weights=weights, first_extra=first,
                                 last_extra=last)
        by_stage = sorted(rng_ for rank in parts for rng_ in rank)
        assert by_stage[0][0] == 0 and by_stage[-1][1] == n
        assert all(a[1] == b[0] and a[0] < a[1] for a, b in zip(by_stage, by_stage[1:]))
        loads = [sum(weights[a:b]) for a, b in by_stage]
        loads[0] += first
        loads[-1] += last
        assert max(loads) == _brute_force_best(weights, pp * vpp, first, last)
    # a heavy embedding pushes layers off the first stage
    assert partition_layers(8, 2, method="parameters", weights=[1] * 8, first_extra=4) == [[(0, 2)], [(2, 8)]]

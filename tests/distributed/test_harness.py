"""run_distributed: results in rank order, failures name the rank, hangs end at the timeout."""

import os
import time

import pytest
import torch
import torch.distributed as dist

from megatron_ext.testing import run_distributed


def _all_reduce_rank(scale):
    x = torch.tensor([float(dist.get_rank())])
    dist.all_reduce(x)
    return dist.get_rank() * scale, int(os.environ["RANK"]), dist.get_world_size(), x.item()


def test_results_in_rank_order_and_fast():
    t0 = time.perf_counter()
    out = run_distributed(_all_reduce_rank, 8, 10)
    elapsed = time.perf_counter() - t0
    assert out == [(10 * r, r, 8, float(sum(range(8)))) for r in range(8)]
    assert elapsed < 15, f"8-rank trivial all_reduce took {elapsed:.1f}s"


def test_single_rank():
    assert run_distributed(_all_reduce_rank, 1, scale=3) == [(0, 0, 1, 0.0)]


def _fail_on_rank_two():
    if dist.get_rank() == 2:
        raise ValueError("boom from the test")
    dist.barrier()  # the others block here until they are killed
    return "unreachable"


def test_error_names_failing_rank_and_kills_others():
    t0 = time.perf_counter()
    with pytest.raises(RuntimeError) as info:
        run_distributed(_fail_on_rank_two, 4, timeout=60)
    msg = str(info.value)
    assert "rank(s) [2]" in msg and "ValueError: boom from the test" in msg
    assert msg.count("Traceback (most recent call last)") == 1
    assert time.perf_counter() - t0 < 20  # no wait for the 60 s timeout


def _all_fail():
    raise AssertionError(f"same bug on rank {dist.get_rank() % 1}")


def test_error_on_every_rank_reports_all_once():
    with pytest.raises(RuntimeError) as info:
        run_distributed(_all_fail, 3, timeout=60)
    msg = str(info.value)
    assert "rank(s) [0, 1, 2]" in msg
    assert msg.count("Traceback (most recent call last)") == 1


def _hang_on_rank_one():
    if dist.get_rank() == 1:
        time.sleep(600)
    return dist.get_rank()


def test_timeout_names_hanging_rank():
    t0 = time.perf_counter()
    with pytest.raises(RuntimeError) as info:
        run_distributed(_hang_on_rank_one, 3, timeout=1.5)
    msg = str(info.value)
    assert "timed out" in msg and "rank(s) [1]" in msg
    assert time.perf_counter() - t0 < 15


def _crash_rank_zero():
    if dist.get_rank() == 0:
        os._exit(7)
    return 1


def test_dead_rank_without_result_is_reported():
    with pytest.raises(RuntimeError, match=r"rank\(s\) \[0\].*code 7"):
        run_distributed(_crash_rank_zero, 2, timeout=30)

"""ParallelState: sizes validation, Megatron rank order (checked against megatron-core), live groups."""

import pytest
import torch
import torch.distributed as dist

from megatron_ext.testing import run_distributed
from megatron_ext.topology import ParallelState, validate_sizes


def test_single_needs_no_distributed():
    ps = ParallelState.single()
    assert (ps.tp_size, ps.pp_size, ps.dp_size, ps.vpp_size, ps.world_size) == (1, 1, 1, 1, 1)
    assert ps.tp_group is None and ps.is_first_stage and ps.is_last_stage
    assert ps.next_pp_rank == ps.prev_pp_rank == 0
    assert "tp=1" in repr(ps)
    if not dist.is_initialized():
        assert ParallelState.from_sizes(1, 1) == ParallelState.single()


@pytest.mark.parametrize(
    "world,tp,pp,dp,vpp,match",
    [
        (8, 3, 1, None, None, "not divisible by tp\\*pp"),
        (8, 2, 3, None, None, "not divisible"),
        (8, 2, 2, 4, None, "set dp=2"),
        (8, 2, 1, None, 2, "vpp=2 needs pipeline"),
        (8, 0, 1, None, None, "positive integer"),
    ],
)
def test_validate_sizes_errors(world, tp, pp, dp, vpp, match):
    with pytest.raises(ValueError, match=match):
        validate_sizes(world, tp, pp, dp, vpp)


def test_validate_sizes_infers_dp():
    assert validate_sizes(16, 2, 4) == 2
    assert validate_sizes(8, 1, 1, 8) == 8


def test_from_sizes_without_distributed_is_clear():
    if dist.is_initialized():
        pytest.skip("a process group is active in this process")
    with pytest.raises(ValueError, match="init_distributed"):
        ParallelState.from_sizes(tp=2)


def _layout(tp, pp, vpp):
    ps = ParallelState.from_sizes(tp=tp, pp=pp, vpp=vpp)
    # the groups must be live and contain exactly the listed ranks
    sums = []
    for group, ranks in ((ps.tp_group, ps.tp_ranks), (ps.dp_group, ps.dp_ranks),
                         (ps.pp_group, ps.pp_ranks), (ps.mp_group, ps.mp_ranks)):
        x = torch.tensor([float(ps.rank)])
        dist.all_reduce(x, group=group)
        sums.append(x.item() == float(sum(ranks)) and dist.get_world_size(group) == len(ranks))
    return dict(rank=ps.rank, tp=ps.tp_ranks, dp=ps.dp_ranks, pp=ps.pp_ranks, mp=ps.mp_ranks,
                ranks=(ps.tp_rank, ps.dp_rank, ps.pp_rank), sizes=(ps.tp_size, ps.dp_size, ps.pp_size),
                vpp=ps.vpp_size, groups_ok=all(sums), next=ps.next_pp_rank, prev=ps.prev_pp_rank,
                first=ps.is_first_stage, last=ps.is_last_stage, emb=ps.embedding_group is not None)


@pytest.mark.parametrize("tp,pp", [(2, 2), (4, 1), (1, 4), (2, 4), (1, 1)])
def test_rank_order_matches_megatron_core(tp, pp):
    rank_gen = pytest.importorskip("megatron.core.parallel_state").RankGenerator
    world = 8
    dp = world // (tp * pp)
    ref = rank_gen(tp=tp, ep=1, dp=dp, pp=pp, cp=1, order="tp-cp-ep-dp-pp")
    ref_groups = {k: ref.get_ranks(k) for k in ("tp", "dp", "pp", "tp-pp")}
    out = run_distributed(_layout, world, tp, pp, 2 if pp > 1 else None, timeout=60)
    for r, o in enumerate(out):
        assert o["rank"] == r and o["groups_ok"]
        assert o["sizes"] == (tp, dp, pp) and o["vpp"] == (2 if pp > 1 else 1)
        for key, ref_key in (("tp", "tp"), ("dp", "dp"), ("pp", "pp"), ("mp", "tp-pp")):
            (group,) = [g for g in ref_groups[ref_key] if r in g]
            assert o[key] == group, (key, r)
        tp_rank, dp_rank, pp_rank = o["ranks"]
        assert r == pp_rank * dp * tp + dp_rank * tp + tp_rank
        assert o["tp"].index(r) == tp_rank and o["dp"].index(r) == dp_rank and o["pp"].index(r) == pp_rank
        assert o["next"] == o["pp"][(pp_rank + 1) % pp] and o["prev"] == o["pp"][(pp_rank - 1) % pp]
        assert o["first"] == (pp_rank == 0) and o["last"] == (pp_rank == pp - 1)
        assert o["emb"] == (pp > 1 and pp_rank in (0, pp - 1))


def _bad_layout():
    return ParallelState.from_sizes(tp=3)


def test_bad_layout_fails_on_every_rank_without_hanging():
    with pytest.raises(RuntimeError, match=r"rank\(s\) \[0, 1, 2, 3\].*not divisible by tp\*pp"):
        run_distributed(_bad_layout, 4, timeout=30)

"""ParallelState: the sizes, ranks and process groups of one rank in a TP x DP x PP grid.

An explicit object handed to whoever needs it (layers, schedules, optimizers) instead of Megatron's
module-level globals, so several layouts can coexist in one process (tests) and nothing hides state.

Rank order (Megatron's): tensor-parallel fastest, then data-parallel, then pipeline-parallel::

    rank = pp_rank * (dp * tp) + dp_rank * tp + tp_rank

so the ranks of one TP group are neighbours (one node, fast links) and a PP group strides the whole
world.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch.distributed as dist


def _grid_rank(tp_rank: int, dp_rank: int, pp_rank: int, tp: int, dp: int) -> int:
    return pp_rank * (dp * tp) + dp_rank * tp + tp_rank


def validate_sizes(world_size: int, tp: int, pp: int, dp: int | None = None, vpp: int | None = None) -> int:
    """Check a layout against the world size; returns dp. Raises one ValueError naming the fix."""
    for name, val in (("tp", tp), ("pp", pp), ("dp", dp), ("vpp", vpp)):
        if val is not None and (not isinstance(val, int) or val < 1):
            raise ValueError(f"parallel size {name}={val!r} must be a positive integer")
    if world_size % (tp * pp) != 0:
        raise ValueError(
            f"world size {world_size} is not divisible by tp*pp = {tp}*{pp} = {tp * pp}; "
            f"launch a multiple of {tp * pp} processes or choose tp/pp whose product divides {world_size}"
        )
    inferred = world_size // (tp * pp)
    if dp is not None and dp != inferred:
        raise ValueError(
            f"tp*pp*dp = {tp}*{pp}*{dp} = {tp * pp * dp} does not equal the world size {world_size}; "
            f"set dp={inferred} (or leave dp unset to infer it)"
        )
    if vpp is not None and vpp > 1 and pp == 1:
        raise ValueError(
            f"virtual pipeline size vpp={vpp} needs pipeline parallelism (pp > 1, got pp=1); "
            "unset vpp or raise pp"
        )
    return inferred


@dataclass
class ParallelState:
    """One rank's view of the parallel layout. Groups are None when torch.distributed is not used."""

    rank: int = 0
    world_size: int = 1
    tp_size: int = 1
    pp_size: int = 1
    dp_size: int = 1
    vpp_size: int = 1
    tp_rank: int = 0
    pp_rank: int = 0
    dp_rank: int = 0
    tp_group: Any = None
    pp_group: Any = None
    dp_group: Any = None
    mp_group: Any = None  # TP x PP: all ranks holding one model replica
    embedding_group: Any = None  # first + last PP stage (tied embeddings); None when pp == 1
    tp_ranks: list[int] = field(default_factory=lambda: [0])
    pp_ranks: list[int] = field(default_factory=lambda: [0])
    dp_ranks: list[int] = field(default_factory=lambda: [0])
    mp_ranks: list[int] = field(default_factory=lambda: [0])

    # ------------------------------------------------------------------ constructors
    @classmethod
    def single(cls) -> ParallelState:
        """All sizes 1, no groups: runs without torch.distributed being initialised."""
        return cls()

    @classmethod
    def from_sizes(
        cls, tp: int = 1, pp: int = 1, dp: int | None = None, vpp: int | None = None
    ) -> ParallelState:
        """Build every group for this layout. Must be called by all ranks (new_group is collective).

        Sizes are validated before any group is created, so a bad layout fails the same way on every
        rank instead of hanging in a half-built rendezvous.
        """
        initialised = dist.is_available() and dist.is_initialized()
        if not initialised:
            if tp * pp * (dp or 1) != 1:
                raise ValueError(
                    f"ParallelState.from_sizes(tp={tp}, pp={pp}, dp={dp}) needs torch.distributed; "
                    "call megatron_ext.launch.init_distributed() first (under torchrun/srun/mpirun)"
                )
            validate_sizes(1, tp, pp, dp, vpp)
            return cls(vpp_size=vpp or 1)
        world = dist.get_world_size()
        dp = validate_sizes(world, tp, pp, dp, vpp)
        rank = dist.get_rank()
        pp_rank, rest = divmod(rank, dp * tp)
        dp_rank, tp_rank = divmod(rest, tp)

        # Every rank creates every group in the same order (new_group is a collective call).
        mine: dict[str, tuple[Any, list[int]]] = {}

        def make(kind: str, ranks: list[int]) -> None:
            group = dist.new_group(ranks)
            if rank in ranks:
                mine[kind] = (group, ranks)

        for p in range(pp):
            for d in range(dp):
                make("tp", [_grid_rank(t, d, p, tp, dp) for t in range(tp)])
        for p in range(pp):
            for t in range(tp):
                make("dp", [_grid_rank(t, d, p, tp, dp) for d in range(dp)])
        for d in range(dp):
            for t in range(tp):
                make("pp", [_grid_rank(t, d, p, tp, dp) for p in range(pp)])
        for d in range(dp):
            make("mp", sorted(_grid_rank(t, d, p, tp, dp) for p in range(pp) for t in range(tp)))
        emb_group = None
        if pp > 1:
            for d in range(dp):
                for t in range(tp):
                    ranks = [_grid_rank(t, d, 0, tp, dp), _grid_rank(t, d, pp - 1, tp, dp)]
                    group = dist.new_group(ranks)
                    if rank in ranks:
                        emb_group = group
        return cls(
            rank=rank, world_size=world, tp_size=tp, pp_size=pp, dp_size=dp, vpp_size=vpp or 1,
            tp_rank=tp_rank, pp_rank=pp_rank, dp_rank=dp_rank,
            tp_group=mine["tp"][0], pp_group=mine["pp"][0], dp_group=mine["dp"][0],
            mp_group=mine["mp"][0], embedding_group=emb_group,
            tp_ranks=mine["tp"][1], pp_ranks=mine["pp"][1], dp_ranks=mine["dp"][1], mp_ranks=mine["mp"][1],
        )

    # ------------------------------------------------------------------ derived
    @property
    def mp_size(self) -> int:
        return self.tp_size * self.pp_size

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    @property
    def next_pp_rank(self) -> int:
        """Global rank of the next pipeline stage (wraps around, as Megatron's)."""
        return self.pp_ranks[(self.pp_rank + 1) % self.pp_size]

    @property
    def prev_pp_rank(self) -> int:
        """Global rank of the previous pipeline stage (wraps around)."""
        return self.pp_ranks[(self.pp_rank - 1) % self.pp_size]

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    def describe(self) -> str:
        """One line for the startup banner."""
        vpp = f" vpp={self.vpp_size}" if self.vpp_size > 1 else ""
        return (
            f"rank {self.rank}/{self.world_size}: tp={self.tp_size} pp={self.pp_size} dp={self.dp_size}{vpp} "
            f"| tp_rank={self.tp_rank} pp_rank={self.pp_rank} dp_rank={self.dp_rank} "
            f"| tp_ranks={self.tp_ranks} dp_ranks={self.dp_ranks} pp_ranks={self.pp_ranks}"
        )

    def __repr__(self) -> str:
        return f"ParallelState({self.describe()})"

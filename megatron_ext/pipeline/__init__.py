"""Pipeline parallelism: stage partitioning, schedules as per-rank action lists, and the engine running them."""

from .engine import run_schedule
from .partition import partition_layers, rank_and_chunk_of, stage_of
from .schedules import (
    Backward,
    Exchange,
    Forward,
    RecvActivation,
    RecvGrad,
    SendActivation,
    SendGrad,
    add_communication,
    build_all_ranks,
    forward_only,
    get_schedule,
    gpipe,
    interleaved_one_f_one_b,
    one_f_one_b,
    schedule_from_orders,
)
from .validate import check_schedule

__all__ = [
    "Backward", "Exchange", "Forward", "RecvActivation", "RecvGrad", "SendActivation", "SendGrad",
    "add_communication", "build_all_ranks", "check_schedule", "forward_only", "get_schedule", "gpipe",
    "interleaved_one_f_one_b", "one_f_one_b", "partition_layers", "rank_and_chunk_of", "run_schedule",
    "schedule_from_orders", "stage_of",
]

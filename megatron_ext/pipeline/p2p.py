"""Point-to-point transfers between pipeline ranks, batched with ``torch.distributed.batch_isend_irecv``.

Peers are GLOBAL ranks (``ps.pp_ranks[i]``). Tensors carry no tags: correctness relies on the caller
issuing, for every ordered pair of ranks, sends and receives in the same order (NCCL matches p2p per
pair in issue order; gloo matches per (peer, tag) in order, and every op here uses the default tag).
The schedule lowering (schedules.add_communication) guarantees that order; this module only moves
bytes. Works with gloo (CPU tensors) and NCCL (CUDA tensors on the current device).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

_MAX_DIMS = 8


def exchange(ops: Sequence[tuple[str, torch.Tensor, int]], group) -> None:
    """Issue ``ops`` = [("send"|"recv", tensor, global_peer), ...] as one batch, in this order, and wait.

    One batch is one NCCL group: its sends and receives progress together, so a rank may send to and
    receive from the same peer (pp=2, or interleaved wrap-around) in one call without deadlock.
    """
    if not ops:
        return
    p2p = []
    for kind, tensor, peer in ops:
        assert kind in ("send", "recv"), kind
        assert tensor.is_contiguous(), "p2p tensors must be contiguous"
        p2p.append(dist.P2POp(dist.isend if kind == "send" else dist.irecv, tensor, peer, group))
    for req in dist.batch_isend_irecv(p2p):
        req.wait()


def warmup(group, device: torch.device) -> None:
    """One collective on the pp group before any p2p.

    torch documents that when batch_isend_irecv is the first call on an NCCL group, all ranks of that
    group must take part (it creates the communicator); our batches involve only neighbours, so an
    all-reduce first makes every later subset batch legal. A no-op cost on gloo; harmless to repeat.
    """
    flag = torch.ones(1, device=device)
    dist.all_reduce(flag, group=group)


def send_recv_shapes(
    send_shape: Sequence[int] | None,
    send_peer: int | None,
    recv_peer: int | None,
    group,
    device: torch.device | str = "cpu",
) -> tuple[int, ...] | None:
    """Optional shape handshake: send ``send_shape`` to ``send_peer`` and/or receive one from ``recv_peer``.

    For pipelines whose activation shape is not known up front (the engine itself takes a fixed
    ``tensor_shape``). Shapes travel as an int64 tensor [ndim, d0, d1, ...] padded to 1+8 entries.
    Both ends must call it at the same point of their communication sequence.
    """
    ops: list[tuple[str, torch.Tensor, int]] = []
    if send_peer is not None:
        assert send_shape is not None and len(send_shape) <= _MAX_DIMS, send_shape
        buf = torch.zeros(1 + _MAX_DIMS, dtype=torch.int64, device=device)
        buf[0] = len(send_shape)
        buf[1:1 + len(send_shape)] = torch.tensor(list(send_shape), dtype=torch.int64)
        ops.append(("send", buf, send_peer))
    recv_buf = None
    if recv_peer is not None:
        recv_buf = torch.empty(1 + _MAX_DIMS, dtype=torch.int64, device=device)
        ops.append(("recv", recv_buf, recv_peer))
    exchange(ops, group)
    if recv_buf is None:
        return None
    vals = recv_buf.tolist()
    return tuple(int(v) for v in vals[1:1 + int(vals[0])])

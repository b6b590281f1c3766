"""Execute one rank's pipeline action list (see schedules.py): the only pipeline loop there is.

Bookkeeping per (microbatch, chunk): received inputs wait in ``inputs`` until their Forward, the
(input, output) pair waits in ``saved`` until its Backward, received output-grads in ``out_grads``,
input-grads in ``in_grads`` until they are sent. Everything is dropped as soon as it was used, so peak
memory follows the schedule (1F1B keeps at most pp - rank microbatches in flight per chunk), and a sent
output keeps only its autograd node, not its values (``_release_output_data``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist

from . import p2p
from .partition import stage_of
from .schedules import Action, Backward, Exchange, Forward, RecvActivation, RecvGrad, SendActivation, SendGrad

ForwardStep = Callable[[int, int, "torch.Tensor | None"], torch.Tensor]


def _check_activation(out, shape: tuple[int, ...], dtype: torch.dtype, where: str) -> None:
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != shape or out.dtype != dtype:
        got = f"{tuple(out.shape)} {out.dtype}" if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(
            f"pipeline {where}: forward_step returned {got}, but activations sent between stages must be "
            f"{shape} {dtype} (the tensor_shape/dtype given to run_schedule)"
        )


def run_schedule(
    actions: Sequence[Action],
    *,
    ps,
    chunks: Sequence[torch.nn.Module],
    forward_step: ForwardStep,
    num_microbatches: int,
    tensor_shape: Sequence[int],
    dtype: torch.dtype,
    device: torch.device | str,
    forward_only: bool = False,
    on_last_backward: Callable[[int], None] | None = None,
) -> list[torch.Tensor]:
    """Run ``actions`` (this rank's list from schedules.get_schedule) and return the last stage's losses.

    Args:
        ps: ParallelState; pp_size/pp_rank/pp_ranks/pp_group locate the neighbours.
        chunks: this rank's model chunks, one per virtual stage (len == vpp_size).
        forward_step: ``(chunk_index, microbatch_index, input_or_None) -> output``. The first model
            stage gets None (it loads its own data); the last returns a scalar loss already divided by
            the number of microbatches; the others return the activation to send on.
        tensor_shape, dtype, device: of every activation (and gradient) passed between stages.
        forward_only: evaluation, no graph is kept (use a forward_only schedule).
        on_last_backward: called with the chunk index right before that chunk's last Backward, so a
            data-parallel wrapper can enable/launch its gradient reduction (Megatron's no_sync exit).

    Returns:
        On the rank holding the last model stage: the detached per-microbatch losses in microbatch
        order; elsewhere an empty list.
    """
    pp, rank, vpp = ps.pp_size, ps.pp_rank, len(chunks)
    if vpp < 1 or (ps.vpp_size > 1 and ps.vpp_size != vpp):
        raise ValueError(f"run_schedule: got {vpp} model chunks but ParallelState.vpp_size={ps.vpp_size}; "
                         "pass one chunk per virtual pipeline stage")
    shape = tuple(int(d) for d in tensor_shape)
    device = torch.device(device)
    last_stage = pp * vpp - 1
    if forward_only and any(isinstance(a, Backward) for a in actions):
        raise ValueError("run_schedule(forward_only=True) got a schedule with Backward actions; "
                         "use get_schedule('forward_only', ...)")
    last_backward = {a.chunk: i for i, a in enumerate(actions) if isinstance(a, Backward)}
    if pp > 1 and dist.get_backend(ps.pp_group) == "nccl":
        p2p.warmup(ps.pp_group, device)

    inputs: dict[tuple[int, int], torch.Tensor] = {}  # received activations awaiting Forward
    saved: dict[tuple[int, int], tuple] = {}  # (input, output) awaiting Backward
    to_send: dict[tuple[int, int], torch.Tensor] = {}  # outputs awaiting SendActivation
    out_grads: dict[tuple[int, int], torch.Tensor] = {}  # received grads awaiting Backward
    in_grads: dict[tuple[int, int], torch.Tensor] = {}  # input grads awaiting SendGrad
    losses: dict[int, torch.Tensor] = {}

    for i, action in enumerate(actions):
        if isinstance(action, Forward):
            key = (action.microbatch, action.chunk)
            stage = stage_of(pp, rank, action.chunk)
            x = inputs.pop(key) if stage > 0 else None
            with torch.set_grad_enabled(not forward_only):
                out = forward_step(action.chunk, action.microbatch, x)
            if stage == last_stage:
                losses[action.microbatch] = out.detach() if isinstance(out, torch.Tensor) else out
            else:
                _check_activation(out, shape, dtype, f"stage {stage} (rank {rank}, chunk {action.chunk})")
                to_send[key] = out.detach().contiguous()
            if not forward_only:
                saved[key] = (x, out)
        elif isinstance(action, Backward):
            key = (action.microbatch, action.chunk)
            stage = stage_of(pp, rank, action.chunk)
            x, out = saved.pop(key)
            if on_last_backward is not None and last_backward[action.chunk] == i:
                on_last_backward(action.chunk)
            if stage == last_stage:
                torch.autograd.backward(out)  # scalar loss
            else:
                torch.autograd.backward(out, grad_tensors=out_grads.pop(key))
            if stage > 0:
                grad = x.grad if x.grad is not None else torch.zeros_like(x)  # input unused by the chunk
                in_grads[key] = grad.contiguous()
            del x, out
        else:
            assert isinstance(action, Exchange), f"unknown pipeline action {action!r}"
            sent = _run_exchange(action, ps, shape, dtype, device, forward_only, inputs, to_send, out_grads,
                                 in_grads)
            for key in sent:
                if key in saved:
                    _release_output_data(saved[key][1])

    assert not saved and not out_grads and not in_grads and not inputs and not to_send, "schedule left work undone"
    if rank == pp - 1:  # holds model stage pp*vpp - 1 (its last chunk)
        return [losses[mb] for mb in sorted(losses)]
    return []


def _release_output_data(out: torch.Tensor) -> None:
    """Free a sent stage output's values, keeping its autograd node.

    Backward only needs the output's grad_fn and shape (its gradient arrives from the next stage), yet
    holding the tensor keeps e*s*b*h bytes per micro-batch in flight. As Megatron does, swap its data for
    one element, expanded so shape checks still pass. Storage that autograd saved itself (an op that
    keeps its own output) stays alive through that saved copy, so backward stays exact."""
    out.data = torch.empty(1, dtype=out.dtype, device=out.device).expand(out.shape)


def _run_exchange(action: Exchange, ps, shape, dtype, device, forward_only, inputs, to_send, out_grads,
                  in_grads) -> list[tuple[int, int]]:
    """Run one batched exchange; returns the (microbatch, chunk) keys whose activations were sent."""
    ops, landed, sent = [], [], []
    for op in action.ops:
        key = (op.microbatch, op.chunk)
        peer = ps.pp_ranks[op.peer]
        if isinstance(op, SendActivation):
            ops.append(("send", to_send.pop(key), peer))
            sent.append(key)
        elif isinstance(op, SendGrad):
            ops.append(("send", in_grads.pop(key), peer))
        else:
            buf = torch.empty(shape, dtype=dtype, device=device)
            ops.append(("recv", buf, peer))
            landed.append((inputs if isinstance(op, RecvActivation) else out_grads, key, buf))
            assert isinstance(op, (RecvActivation, RecvGrad))
    p2p.exchange(ops, ps.pp_group)  # returns when every send and receive is complete
    for store, key, buf in landed:
        if store is inputs and not forward_only:
            buf.requires_grad_(True)
        store[key] = buf
    return sent

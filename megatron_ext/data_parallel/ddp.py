"""DataParallel: bucketed, overlapped gradient reduction over the DP group (our own, not torch DDP).

Usage per optimizer step (``k`` micro-batches)::

    ddp.zero_grad()
    for i, mb in enumerate(micro_batches):
        ddp.set_is_last_microbatch(i == k - 1)   # or: with ddp.no_sync(): ... for all but the last
        loss_fn(ddp(mb)).backward()
    ddp.finish_grad_sync()                       # grads are now averaged over DP
    optimizer.step()

During the LAST micro-batch's backward, a post-accumulate-grad hook marks each parameter ready; when
every parameter of a bucket is ready the bucket's all-reduce (or reduce-scatter, for ZeRO-1) starts
asynchronously, overlapping the rest of backward. Buckets are launched strictly in index order so that
all ranks issue the same collectives in the same order even if hooks fire in a different order.
Grads are pre-divided by dp_size and summed, i.e. averaged (gloo has no AVG op; pre-scaling also
keeps fp16 sums in range).

With ``reduce_scatter=True`` (ZeRO-1) only this rank's shard of each bucket holds the reduced grads
after ``finish_grad_sync``; the rest of the buffer keeps local, unreduced values. The
DistributedOptimizer reads only its shard.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import nn

from megatron_ext.data_parallel.grad_buffer import Bucket, GradBuffer
from megatron_ext.topology import ParallelState

DEFAULT_BUCKET_SIZE = 25_000_000  # elements; gpt-neox's zero_reduce_bucket_size maps here


def _reduce_scatter(out: torch.Tensor, inp: torch.Tensor, group, async_op: bool):
    fn = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    return fn(out, inp, group=group, async_op=async_op)


class DataParallel(nn.Module):
    """Wrap ``module`` for data parallelism over ``ps.dp_group``; forward is the module's forward.

    Args:
        module: the model (its parameters keep their identity; only ``.grad`` is redirected).
        ps: the parallel layout; with ``ps.dp_size == 1`` no collective is ever issued.
        bucket_size: elements per bucket (a bucket holds whole parameters, so it may be larger).
        reduce_scatter: ZeRO-1 mode, reduce-scatter each bucket instead of all-reducing it.
        overlap: start bucket collectives from backward hooks (else all at ``finish_grad_sync``).
        broadcast_params: copy DP rank 0's parameters to the other DP ranks at construction.
        sync_sequence_parallel: sum the grads of params tagged ``sequence_parallel`` over TP inside
            ``finish_grad_sync`` (before their DP reduction). Then do NOT also call
            ``tensor_parallel.sync_sequence_parallel_grads`` (it would sum twice).
    """

    def __init__(self, module: nn.Module, ps: ParallelState, *, bucket_size: int = DEFAULT_BUCKET_SIZE,
                 reduce_scatter: bool = False, overlap: bool = True, broadcast_params: bool = True,
                 sync_sequence_parallel: bool = True):
        super().__init__()
        self.module, self.ps = module, ps
        self.reduce_scatter, self.overlap = reduce_scatter, overlap
        self.is_last_microbatch = True
        params = [p for p in module.parameters() if p.requires_grad]
        if not params:
            raise ValueError("DataParallel: the module has no parameters that require grad")
        # Sequence-parallel params (replicated over TP, grads partial per TP rank) go to buffers launched
        # last, after finish_grad_sync has summed them over TP: the TP sum must precede the DP reduction
        # because under ZeRO the TP ranks' buffer layouts (and so their shards) differ.
        self.sync_sequence_parallel = sync_sequence_parallel and ps.tp_size > 1
        by_dtype: dict[tuple, list[nn.Parameter]] = {}
        for p in reversed(params):  # backward produces grads roughly in reverse registration order
            sp = self.sync_sequence_parallel and bool(getattr(p, "sequence_parallel", False))
            by_dtype.setdefault((sp, str(p.dtype), str(p.device)), []).append(p)
        self.buffers: list[GradBuffer] = []
        self.buckets: list[Bucket] = []
        for key in sorted(by_dtype):
            buf = GradBuffer(by_dtype[key], bucket_size, ps.dp_size, first_bucket_index=len(self.buckets))
            self.buffers.append(buf)
            self.buckets.extend(buf.buckets)
        self._sp_params = [p for key in sorted(by_dtype) if key[0] for p in by_dtype[key]]
        sp_ids = {id(p) for p in self._sp_params}
        self._first_sp_bucket = next((b.index for b in self.buckets if id(b.params[0]) in sp_ids), len(self.buckets))
        self._bucket_of: dict[int, Bucket] = {id(p): b for b in self.buckets for p in b.params}
        self._view_of: dict[int, torch.Tensor] = {}
        for buf in self.buffers:
            for p in buf.params:
                self._view_of[id(p)] = buf.grad_view(p)
        self._params = params
        self._next_launch = 0
        if broadcast_params and ps.dp_size > 1:
            self.broadcast_params()
        self.zero_grad()
        self._hooks = [p.register_post_accumulate_grad_hook(self._on_grad_ready) for p in params]

    # ------------------------------------------------------------------ module face
    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    @torch.no_grad()
    def broadcast_params(self) -> None:
        """Make every DP rank hold DP rank 0's parameters (one broadcast per buffer-sized flat copy)."""
        for buf in self.buffers:
            flat = torch.cat([p.detach().reshape(-1) for p in buf.params])
            dist.broadcast(flat, src=self.ps.dp_ranks[0], group=self.ps.dp_group)
            offset = 0
            for p in buf.params:
                p.copy_(flat[offset: offset + p.numel()].view_as(p))
                offset += p.numel()

    # ------------------------------------------------------------------ accumulation control
    def set_is_last_microbatch(self, is_last: bool) -> None:
        """True: this backward completes the window and launches reductions; False: only accumulate."""
        self.is_last_microbatch = bool(is_last)

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Backward passes inside only accumulate into the buffer (torch DDP's name)."""
        previous = self.is_last_microbatch
        self.is_last_microbatch = False
        try:
            yield
        finally:
            self.is_last_microbatch = previous

    def zero_grad(self, set_to_none: bool = False) -> None:  # noqa: ARG002 - grads always stay views
        """Zero the buffers and (re)point every ``.grad`` at its view. Call instead of setting grads to None."""
        for buf in self.buffers:
            buf.data.zero_()
        for p in self._params:
            p.grad = self._view_of[id(p)]
        self._reset_buckets()

    def _reset_buckets(self) -> None:
        for b in self.buckets:
            b.reset()
        self._next_launch = 0

    # ------------------------------------------------------------------ hooks and collectives
    def _on_grad_ready(self, p: nn.Parameter) -> None:
        view = self._view_of[id(p)]
        if p.grad is not view:
            # The optimizer set grads to None (its zero_grad default): this backward's grad is the whole
            # accumulation so far, so copy it into the buffer and point .grad back at the view.
            with torch.no_grad():
                view.copy_(p.grad)
            p.grad = view
        if not self.is_last_microbatch:
            return
        bucket = self._bucket_of[id(p)]
        bucket.ready.add(id(p))
        if self.overlap:
            self._launch_ready_in_order()

    def _launch_ready_in_order(self) -> None:
        while self._next_launch < self._first_sp_bucket and self.buckets[self._next_launch].is_complete():
            self._launch(self.buckets[self._next_launch])
            self._next_launch += 1

    def _launch(self, bucket: Bucket) -> None:
        dp = self.ps.dp_size
        if dp == 1:
            return
        data = bucket.data
        data.mul_(1.0 / dp)
        if self.reduce_scatter:
            bucket.shard_out = torch.empty(bucket.numel // dp, dtype=data.dtype, device=data.device)
            bucket.handle = _reduce_scatter(bucket.shard_out, data, self.ps.dp_group, async_op=True)
        else:
            bucket.handle = dist.all_reduce(data, group=self.ps.dp_group, async_op=True)

    @torch.no_grad()
    def finish_grad_sync(self) -> None:
        """Launch what backward did not (unused params, overlap off), wait for all, leave averaged grads."""
        for p in self._params:
            if p.grad is None:  # no grad in this window (and the optimizer dropped the view): it is zero
                view = self._view_of[id(p)]
                view.zero_()
                p.grad = view
        if self._sp_params:  # one flat TP all-reduce of all sequence-parallel grads
            grads = [p.grad for p in self._sp_params]
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat, group=self.ps.tp_group)
            offset = 0
            for g in grads:
                g.copy_(flat[offset: offset + g.numel()].view_as(g))
                offset += g.numel()
        while self._next_launch < len(self.buckets):
            self._launch(self.buckets[self._next_launch])
            self._next_launch += 1
        for bucket in self.buckets:
            if bucket.handle is not None:
                bucket.handle.wait()
            if bucket.shard_out is not None:
                lo, hi = bucket.shard_range(self.ps.dp_rank)
                bucket.buffer.data[lo:hi].copy_(bucket.shard_out)
        self._reset_buckets()

    def grad_shard_views(self):
        """Yield (param, flat_lo, flat_hi, grad_piece) for this DP rank's ZeRO shard of every bucket.

        ``grad_piece`` is a 1-D view into the buffer covering ``param.view(-1)[flat_lo:flat_hi]``.
        With dp_size 1 the shard is the whole buffer.
        """
        for bucket in self.buckets:
            lo, hi = bucket.shard_range(self.ps.dp_rank)
            for p, a, b, buf_lo in bucket.buffer.param_ranges_in(lo, hi, bucket):
                yield p, a, b, bucket.buffer.data[buf_lo: buf_lo + (b - a)]

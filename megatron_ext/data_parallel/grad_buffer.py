"""Contiguous gradient buffers, split into buckets that are reduced over data parallelism as units.

Why a flat buffer: one collective per bucket instead of one per parameter, and ZeRO-1 can shard the
reduced gradients by plain slicing. Every parameter's ``.grad`` is a view into the buffer, so autograd
accumulates micro-batches straight into it and optimizers read it without copies.

Layout of one buffer (one dtype)::

    data  [numel_padded]   = bucket 0 | bucket 1 | ...
    bucket b = [start_b, end_b): whole parameters (a parameter is never split across buckets), in the
               order given (the DDP wrapper passes them in reverse registration order, roughly the order
               backward produces them), then zero padding so that (end_b - start_b) % dp_size == 0.
    ZeRO shard of DP rank r in bucket b = [start_b + r*L_b/dp, start_b + (r+1)*L_b/dp), L_b = end_b - start_b.

A bucket closes once it holds >= ``bucket_size`` elements, so a bucket smaller than one parameter
simply means one parameter per bucket.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass(eq=False)
class Bucket:
    """A run of whole parameters reduced by one collective. Offsets are into the owning buffer's data."""

    index: int  # global launch order over all buffers of a wrapper (same on every rank)
    buffer: GradBuffer
    params: list[nn.Parameter]
    start: int
    end: int  # exclusive, padded to a multiple of dp_size
    ready: set[int] = field(default_factory=set)  # id(param) whose grads are final for this window
    handle: object = None  # async work handle while the collective is in flight
    shard_out: torch.Tensor | None = None  # reduce-scatter output until copied back

    @property
    def data(self) -> torch.Tensor:
        return self.buffer.data[self.start: self.end]

    @property
    def numel(self) -> int:
        return self.end - self.start

    def shard_range(self, dp_rank: int) -> tuple[int, int]:
        """[lo, hi) in buffer coordinates owned by ``dp_rank`` under ZeRO."""
        per = self.numel // self.buffer.dp_size
        return self.start + dp_rank * per, self.start + (dp_rank + 1) * per

    def is_complete(self) -> bool:
        return len(self.ready) == len(self.params)

    def reset(self) -> None:
        self.ready.clear()
        self.handle = None
        self.shard_out = None


class GradBuffer:
    """Flat gradient storage for parameters of one dtype, cut into buckets (see module docstring)."""

    def __init__(self, params: list[nn.Parameter], bucket_size: int, dp_size: int, first_bucket_index: int = 0):
        if not params:
            raise ValueError("GradBuffer needs at least one parameter")
        if bucket_size < 1:
            raise ValueError(f"bucket_size must be >= 1 element, got {bucket_size}")
        dtypes = {p.dtype for p in params}
        devices = {p.device for p in params}
        assert len(dtypes) == 1 and len(devices) == 1, f"one dtype/device per buffer, got {dtypes} {devices}"
        self.dtype, self.device, self.dp_size = params[0].dtype, params[0].device, dp_size
        self.param_range: dict[int, tuple[int, int]] = {}  # id(param) -> [start, end) in data
        self.buckets: list[Bucket] = []
        offset, bucket_start, members = 0, 0, []
        for i, p in enumerate(params):
            self.param_range[id(p)] = (offset, offset + p.numel())
            offset += p.numel()
            members.append(p)
            if offset - bucket_start >= bucket_size or i == len(params) - 1:
                end = bucket_start + _round_up(offset - bucket_start, dp_size)
                self.buckets.append(Bucket(first_bucket_index + len(self.buckets), self, members, bucket_start, end))
                offset = bucket_start = end
                members = []
        self.numel = offset
        self.data = torch.zeros(self.numel, dtype=self.dtype, device=self.device)
        self.params = params

    def grad_view(self, p: nn.Parameter) -> torch.Tensor:
        start, end = self.param_range[id(p)]
        return self.data[start:end].view(p.shape)

    def param_ranges_in(self, lo: int, hi: int, bucket: Bucket):
        """Yield (param, p_lo, p_hi, buf_lo) for the part of each bucket param inside [lo, hi).

        ``p_lo:p_hi`` indexes the flattened parameter, ``buf_lo`` is where that piece starts in data.
        """
        for p in bucket.params:
            start, end = self.param_range[id(p)]
            a, b = max(start, lo), min(end, hi)
            if a < b:
                yield p, a - start, b - start, a


def _round_up(n: int, k: int) -> int:
    return (n + k - 1) // k * k

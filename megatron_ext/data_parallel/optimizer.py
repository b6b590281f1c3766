"""ZeRO-1 DistributedOptimizer, and the global grad-norm clipping it shares with plain DP.

Shard layout (what ``state_dict`` holds per rank and ``gather_full_state`` undoes): the DataParallel
wrapper lays the grads of each dtype out in one flat buffer cut into buckets, each padded to a multiple
of dp_size (see ``grad_buffer``). DP rank r owns the contiguous slice ``[r*L/dp, (r+1)*L/dp)`` of every
bucket of length L. For each parameter that overlaps that slice the optimizer keeps one fp32 master
tensor, 1-D, equal to ``param.view(-1)[lo:hi]``; these "pieces" are ordered by (bucket, offset) and the
inner torch optimizer is built over them, so its state is sharded the same way. With one bucket this
is exactly "each rank owns a contiguous 1/dp slice of the flattened parameters".

Step: DataParallel reduce-scatters (or all-reduces) the grads; each rank copies its shard's grads to
its masters, checks overflow / unscales / clips (the norm sums the shards over DP), steps, casts its
updated masters to the model dtype and all-gathers each bucket so every DP rank holds the full params.
Element-wise optimizers (SGD, Adam, AdamW, ...) therefore give the same numbers as unsharded training.
Optimizers that need whole tensors (LAMB's trust ratio, Adafactor's factored moments) do not.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_ext.data_parallel.clip import clip_grad_norm, counts_toward_norm, global_grad_norm
from megatron_ext.data_parallel.ddp import DataParallel
from megatron_ext.data_parallel.grad_buffer import Bucket
from megatron_ext.data_parallel.precision import MasterParamOptimizer, MasterPiece

__all__ = ["DistributedOptimizer", "clip_grad_norm", "global_grad_norm"]


def _all_gather(out: torch.Tensor, inp: torch.Tensor, group, async_op: bool):
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    return fn(out, inp, group=group, async_op=async_op)


class DistributedOptimizer(MasterParamOptimizer):
    """ZeRO-1: fp32 masters and optimizer state sharded over DP (layout in the module docstring).

    Args:
        ddp: the DataParallel-wrapped model (ideally built with ``reduce_scatter=True``).
        optimizer_cls: any torch optimizer class, built over this rank's master pieces.
        param_groups: torch-style groups over the model's parameters (default: one group of all).
        loss_scaler, clip_grad, overflow_group: as MixedPrecisionOptimizer.
        **optim_kwargs: passed to ``optimizer_cls`` (lr, betas, weight_decay, ...).

    Call ``ddp.finish_grad_sync()`` before ``step()``; ``zero_grad()`` zeroes the DDP buffers.
    """

    def __init__(self, ddp: DataParallel, optimizer_cls: type[torch.optim.Optimizer], *, param_groups=None,
                 loss_scaler=None, clip_grad: float = 0.0, overflow_group=None, **optim_kwargs):
        ps = ddp.ps
        super().__init__(ps, loss_scaler=loss_scaler, clip_grad=clip_grad, overflow_group=overflow_group,
                         dp_sharded=ps.dp_size > 1)
        self.ddp = ddp
        self.pieces, self._grad_views, self._bucket_pieces = [], {}, {}
        for bucket in ddp.buckets:  # pieces ordered by (bucket, offset): the shard layout
            lo, hi = bucket.shard_range(ps.dp_rank)
            self._bucket_pieces[bucket.index] = []
            for p, a, b, buf_lo in bucket.buffer.param_ranges_in(lo, hi, bucket):
                piece = MasterPiece(p, p.detach().reshape(-1)[a:b].float().clone(), a, b, counts_toward_norm(p, ps))
                self.pieces.append(piece)
                self._grad_views[id(piece)] = bucket.buffer.data[buf_lo: buf_lo + (b - a)]
                self._bucket_pieces[bucket.index].append((piece, buf_lo))
        pieces_of: dict[int, list[MasterPiece]] = {}
        for piece in self.pieces:
            pieces_of.setdefault(id(piece.param), []).append(piece)
        groups = param_groups if param_groups is not None else [{"params": list(ddp.module.parameters())}]
        built = self._build_groups(groups, pieces_of)
        covered = sum(len(g["params"]) for g in built)
        if covered != len(self.pieces):
            raise ValueError(f"DistributedOptimizer: param_groups cover {covered} of this rank's {len(self.pieces)} "
                             "parameter shards; every trainable parameter must be in exactly one group")
        self.optimizer = optimizer_cls(built, **optim_kwargs)

    def _grad_source(self, piece: MasterPiece) -> torch.Tensor:
        return self._grad_views[id(piece)]

    def zero_grad(self, set_to_none: bool = True) -> None:  # noqa: ARG002 - grads live in the DDP buffer
        self.ddp.zero_grad()

    @torch.no_grad()
    def _copy_masters_to_model(self) -> None:
        ps = self.ps
        gathers: list[tuple[Bucket, torch.Tensor, object]] = []
        for bucket in self.ddp.buckets:
            lo, hi = bucket.shard_range(ps.dp_rank)
            buf = bucket.buffer
            shard = torch.zeros(hi - lo, dtype=buf.dtype, device=buf.device)
            for piece, off in self._bucket_pieces[bucket.index]:
                shard[off - lo: off - lo + piece.master.numel()].copy_(piece.master)
            if ps.dp_size == 1:
                gathers.append((bucket, shard, None))
                continue
            full = torch.empty(bucket.numel, dtype=buf.dtype, device=buf.device)
            gathers.append((bucket, full, _all_gather(full, shard, ps.dp_group, async_op=True)))
        for bucket, full, handle in gathers:
            if handle is not None:
                handle.wait()
            for p in bucket.params:
                start, end = bucket.buffer.param_range[id(p)]
                p.data.view(-1).copy_(full[start - bucket.start: end - bucket.start])

    # ------------------------------------------------------------------ full (unsharded) state
    @torch.no_grad()
    def gather_full_state(self) -> dict[str, dict[str, torch.Tensor]]:
        """All-gather masters and per-element optimizer state into full tensors, keyed by param name.

        Returns ``{name: {"master": fp32 [param shape], <state key>: [param shape] or scalar}}`` on every
        DP rank (a collective over the DP group). Scalar state (e.g. Adam's "step") is taken as is.
        """
        ps = self.ps
        names = {id(p): n for n, p in self.ddp.module.named_parameters()}
        keys: set[str] = set()
        scalars: dict[str, dict] = {}  # name -> {key: 0-dim state (Adam's step)}
        for piece in self.pieces:
            for k, v in self.optimizer.state.get(piece.master, {}).items():
                if torch.is_tensor(v) and v.dim() > 0:
                    keys.add(k)
                else:
                    scalars.setdefault(names[id(piece.param)], {})[k] = v.item() if torch.is_tensor(v) else v
        if ps.dp_size > 1:
            everyone: list = [None] * ps.dp_size
            dist.all_gather_object(everyone, (sorted(keys), scalars), group=ps.dp_group)
            for their_keys, their_scalars in everyone:
                keys.update(their_keys)
                for name, entries in their_scalars.items():
                    scalars.setdefault(name, {}).update(entries)
        out: dict[str, dict] = {names[id(p)]: dict(scalars.get(names[id(p)], {}))
                                for b in self.ddp.buckets for p in b.params}
        for key in ["master", *sorted(keys)]:
            for bucket in self.ddp.buckets:
                lo, hi = bucket.shard_range(ps.dp_rank)
                shard = torch.zeros(hi - lo, dtype=torch.float32, device=bucket.buffer.device)
                for piece, off in self._bucket_pieces[bucket.index]:
                    value = piece.master if key == "master" else self.optimizer.state.get(piece.master, {}).get(key)
                    if value is not None:
                        shard[off - lo: off - lo + value.numel()].copy_(value.reshape(-1))
                full = shard
                if ps.dp_size > 1:
                    full = torch.empty(bucket.numel, dtype=torch.float32, device=shard.device)
                    _all_gather(full, shard, ps.dp_group, async_op=False)
                for p in bucket.params:
                    start, end = bucket.buffer.param_range[id(p)]
                    out[names[id(p)]][key] = full[start - bucket.start: end - bucket.start].view(p.shape).clone()
        return out

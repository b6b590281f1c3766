"""One rank's share of a 3D-parallel model: its pipeline chunks, data-parallel gradient reduction,
optimizer (plain, mixed precision, or ZeRO-1) and the pipeline schedule that runs a global batch.

The same code runs one process (every size 1: no collective is issued) and any TP x PP x DP layout.
Data: every rank of a pipeline reads the same micro-batches from the same memory-mapped dataset (the
first stage uses the tokens, the last the labels); DP ranks read disjoint slices. That costs a little
redundant I/O but no broadcast, and keeps a run's sample order independent of its layout.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_ext.data_parallel import DataParallel, DistributedOptimizer, MixedPrecisionOptimizer, clip_grad_norm
from megatron_ext.data_parallel.precision import make_loss_scaler
from megatron_ext.pipeline import get_schedule, run_schedule
from megatron_ext.tensor_parallel import seed_all
from neox.checkpoint.reshard import stage_layer_ranges
from neox.config import ConfigError, NeoXConfig
from neox.models import ParallelOptions
from neox.models.registry import build_model
from neox.training.optim import optimizer_spec, param_groups

Batch = dict[str, torch.Tensor]  # tokens / labels / loss_mask, each [B, T]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class OptimStep:
    skipped: bool
    grad_norm: float
    loss_scale: float | None = None


class PlainOptimizer:
    """fp32 without ZeRO: a torch optimizer plus the global (TP x PP x DP aware) gradient clipping."""

    def __init__(self, optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter], ps, clip: float):
        self.optimizer, self.params, self.ps, self.clip = optimizer, params, ps, clip

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    def step(self) -> OptimStep:
        norm = clip_grad_norm([p for p in self.params if p.grad is not None], self.clip or float("inf"), self.ps)
        if not torch.isfinite(torch.tensor(norm)):
            return OptimStep(True, norm)
        self.optimizer.step()
        return OptimStep(False, norm)

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=False)

    def state_dict(self):
        return self.optimizer.state_dict()

    def load_state_dict(self, state) -> None:
        self.optimizer.load_state_dict(state)


def pipeline_layout(cfg: NeoXConfig, ps) -> list[tuple[int, int]]:
    """This rank's (start, stop) layer range per virtual chunk. One definition serves the engine, the
    resharder and (for the "parameters" method) the planner, so they always agree."""
    return stage_layer_ranges(cfg, ps.tp_size, ps.pp_size, ps.vpp_size)[ps.pp_rank]


class FSDPOptimizer(PlainOptimizer):
    """ZeRO-2/3 through FSDP2: parameters are DTensors, torch's clipping understands them."""

    def step(self) -> OptimStep:
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.clip or float("inf"))
        norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        if not torch.isfinite(torch.tensor(norm)):
            return OptimStep(True, norm)
        self.optimizer.step()
        return OptimStep(False, norm)


class Engine:
    """Chunks + DP + optimizer + schedule for one rank. ``train_batch`` runs one optimizer step."""

    def __init__(self, cfg: NeoXConfig, ps, *, init_seed: int):
        self.cfg, self.ps = cfg, ps
        p, o = cfg.parallel, cfg.optimizer
        self.dtype = DTYPES[p.precision]
        self.tracker = seed_all(ps, init_seed)
        options = ParallelOptions.from_config(p)
        ranges = pipeline_layout(cfg, ps)
        n_chunks = len(ranges)
        self.chunks = torch.nn.ModuleList()
        for c, layer_range in enumerate(ranges):
            first = ps.pp_rank == 0 and c == 0
            last = ps.pp_rank == ps.pp_size - 1 and c == n_chunks - 1
            chunk = build_model(cfg.model, ps, pre_process=first, post_process=last, layer_range=layer_range,
                                init_seed=init_seed, options=options, rng_tracker=self.tracker)
            self.chunks.append(chunk.to(self.dtype))
        self.shared_embedding = [q for ch in self.chunks for q in ch.shared_embedding_params()]
        self.sequence_parallel = options.sequence_parallel and ps.tp_size > 1
        self.scaler = None
        if p.precision == "fp16":
            self.scaler = make_loss_scaler(p.loss_scale, p.initial_scale_power, p.loss_scale_window,
                                           p.hysteresis, p.min_loss_scale)
        on_cuda = next(self.chunks.parameters()).is_cuda
        cls, kwargs = optimizer_spec(o.optimizer_type, lr=o.lr or 0.0, betas=o.betas, eps=o.eps,
                                     momentum=o.momentum, on_cuda=on_cuda)
        self.fsdp = p.zero_stage >= 2 and ps.dp_size > 1
        if self.fsdp:  # ZeRO-2/3: PyTorch FSDP2 shards grads (and params) and averages them over DP
            if self.dtype != torch.float32:
                raise ConfigError("zero_stage 2/3 (FSDP) runs in fp32 here; use zero_stage 1 for fp16/bf16")
            from megatron_ext.data_parallel.fsdp import shard_model

            shard_model(self.chunks[0], ps, p.zero_stage, wrap=list(self.chunks[0].layers.values()))
            self.ddp, self.overlap = None, False
            groups = param_groups(self.chunks.named_parameters(), o.weight_decay)
            self.optimizer = FSDPOptimizer(cls(groups, **kwargs), list(self.chunks.parameters()), ps, o.clip_grad)
            return
        # Overlapping DP reduction with backward needs each chunk's last backward to be its final use;
        # with several chunks per rank, or tied-embedding grads still to be summed, reduce at the end.
        self.overlap = n_chunks == 1 and not self.shared_embedding
        zero = p.zero_stage >= 1 and ps.dp_size > 1
        self.ddp = DataParallel(self.chunks, ps, bucket_size=p.zero_reduce_bucket_size, reduce_scatter=zero,
                                overlap=self.overlap)
        groups = param_groups(self.chunks.named_parameters(), o.weight_decay)
        if zero:
            self.optimizer = DistributedOptimizer(self.ddp, cls, param_groups=groups, loss_scaler=self.scaler,
                                                  clip_grad=o.clip_grad, **kwargs)
        elif self.dtype != torch.float32:
            self.optimizer = MixedPrecisionOptimizer(groups, cls, ps, loss_scaler=self.scaler,
                                                     clip_grad=o.clip_grad, **kwargs)
        else:
            self.optimizer = PlainOptimizer(cls(groups, **kwargs), list(self.chunks.parameters()), ps, o.clip_grad)

    # ---- helpers -----------------------------------------------------------------------------
    @property
    def is_last_stage(self) -> bool:
        return self.ps.pp_rank == self.ps.pp_size - 1

    def model_state_dict(self) -> dict[str, torch.Tensor]:
        """This rank's parameters under their global names (chunks hold disjoint layer ranges);
        FSDP-sharded tensors are gathered whole."""
        out = {}
        for chunk in self.chunks:
            for k, v in chunk.state_dict().items():
                out[k] = v.full_tensor() if hasattr(v, "full_tensor") else v
        return out

    def named_parameters(self):
        for chunk in self.chunks:
            yield from chunk.named_parameters()

    def _schedule(self, name: str, num_microbatches: int):
        ps = self.ps
        try:
            return get_schedule(name, ps.pp_size, ps.pp_rank, num_microbatches, ps.vpp_size)
        except ValueError as e:
            raise ConfigError(f"{e} (gradient_accumulation_steps is the number of micro-batches)") from e

    def _activation_shape(self, batch: Batch) -> tuple[int, ...]:
        b, t = batch["tokens"].shape
        if self.sequence_parallel:
            t //= self.ps.tp_size
        return (b, t, self.cfg.model.hidden_size)

    def _run(self, batches: Sequence[Batch], *, forward_only: bool) -> float:
        """Run the schedule over ``batches``; returns the mean loss, identical on every rank."""
        m = len(batches)
        scale = self.scaler.scale if (self.scaler is not None and not forward_only) else 1.0

        def forward_step(chunk_index: int, mb: int, x):
            chunk = self.chunks[chunk_index]
            batch = batches[mb]
            inp = batch["tokens"] if chunk.pre_process else x
            if not chunk.post_process:
                return chunk(inp)
            if hasattr(chunk, "forward_loss"):  # fused output layer + cross entropy: no full logits
                loss = chunk.forward_loss(inp, batch["labels"], batch.get("loss_mask"))
            else:
                loss = chunk.loss(chunk(inp), batch["labels"], batch.get("loss_mask"))
            return loss.float() * (scale / m)  # fp32: a large fp16 loss scale must not overflow here

        def on_last_backward(chunk_index: int) -> None:
            if self.overlap:
                self.ddp.set_is_last_microbatch(True)

        name = "forward_only" if forward_only else self.cfg.parallel.pipeline_schedule
        actions = self._schedule(name, m)
        if not forward_only and self.ddp is not None:
            self.ddp.set_is_last_microbatch(not self.overlap)
        losses = run_schedule(actions, ps=self.ps, chunks=list(self.chunks), forward_step=forward_step,
                              num_microbatches=m, tensor_shape=self._activation_shape(batches[0]),
                              dtype=self.dtype, device=next(self.chunks.parameters()).device,
                              forward_only=forward_only, on_last_backward=on_last_backward)
        local = torch.stack(losses).double().sum() / scale if losses else torch.zeros((), dtype=torch.float64)
        return self._average_loss(local)

    def _average_loss(self, local: torch.Tensor) -> float:
        """The last stage's loss, averaged over DP, made known to every rank (rank 0 logs it)."""
        ps = self.ps
        if ps.world_size == 1:
            return float(local)
        t = local.reshape(1).clone()
        if ps.pp_size > 1:
            if not self.is_last_stage:
                t.zero_()
            dist.all_reduce(t, group=ps.pp_group)
        if ps.dp_size > 1:
            dist.all_reduce(t, group=ps.dp_group)
            t /= ps.dp_size
        return float(t)

    # ---- one optimizer step ------------------------------------------------------------------
    def train_batch(self, batches: Sequence[Batch]) -> tuple[float, OptimStep]:
        """Forward and backward over the micro-batches, reduce gradients, step. Returns (loss, step)."""
        for chunk in self.chunks:
            chunk.train()
        self.optimizer.zero_grad()
        if self.ddp is not None:
            self.ddp.zero_grad()
        loss = self._run(batches, forward_only=False)
        if self.shared_embedding and self.ps.embedding_group is not None:
            for q in self.shared_embedding:  # tied embedding copies on the first and last stage
                dist.all_reduce(q.grad, group=self.ps.embedding_group)
        if self.ddp is not None:
            self.ddp.finish_grad_sync()
        if not torch.isfinite(torch.tensor(loss)) and self.scaler is None:
            return loss, OptimStep(True, float("nan"))  # fp16 instead lets the scaler see the overflow
        res = self.optimizer.step()
        return loss, OptimStep(res.skipped, float(res.grad_norm),
                               getattr(res, "loss_scale", None) if self.scaler else None)

    @torch.no_grad()
    def eval_batch(self, batches: Sequence[Batch]) -> float:
        for chunk in self.chunks:
            chunk.eval()
        return self._run(batches, forward_only=True)

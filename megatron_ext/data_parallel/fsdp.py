"""ZeRO stages 2 and 3 through PyTorch FSDP2 (``torch.distributed.fsdp.fully_shard``).

Stage 2 keeps the full parameters gathered between forward and backward (``reshard_after_forward=False``;
grads and optimizer state sharded), stage 3 frees them after forward and gathers again for backward
(``reshard_after_forward=True``; parameters sharded too). Only pure data parallelism is supported for
now (tp = pp = 1): FSDP shards along dim 0 of each parameter, which would conflict with our TP slices
and with the pipeline schedule's own parameter handling.

After ``shard_model`` the parameters are DTensors: build the optimizer afterwards
(``torch.optim.AdamW(model.parameters())`` works as is) and clip with
``torch.nn.utils.clip_grad_norm_``, which understands DTensors. Gradients are averaged over DP.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from megatron_ext.topology import ParallelState


def _device_type(model: nn.Module) -> str:
    p = next(model.parameters(), None)
    return p.device.type if p is not None else "cpu"


def shard_model(model: nn.Module, ps: ParallelState, stage: int, *,
                wrap: Iterable[nn.Module] | None = None) -> nn.Module:
    """Apply FSDP2 to ``model`` in place (and return it) for ZeRO ``stage`` 2 or 3 over the DP ranks.

    Args:
        model: the model; its parameters must already be on the target device.
        ps: the layout; must have tp_size == pp_size == 1.
        stage: 2 or 3.
        wrap: submodules that become their own FSDP units (communication granularity), e.g. the
            transformer layers. Default: ``model.layers`` entries if present, else the direct children
            that hold parameters. The root is always wrapped last.
    """
    if stage not in (2, 3):
        raise ValueError(f"shard_model: ZeRO stage must be 2 or 3 (got {stage}); stage 1 is DistributedOptimizer")
    if ps.tp_size != 1 or ps.pp_size != 1:
        raise ValueError(
            f"shard_model (ZeRO-{stage} via FSDP2) needs tp=1 and pp=1, got tp={ps.tp_size} pp={ps.pp_size}; "
            "use zero_optimization.stage 1 (DistributedOptimizer) with tensor/pipeline parallelism"
        )
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(_device_type(model), (ps.dp_size,), mesh_dim_names=("dp",))
    reshard = stage == 3
    if wrap is None:
        layers = getattr(model, "layers", None)
        wrap = list(layers) if isinstance(layers, nn.ModuleList) else [
            m for m in model.children() if next(m.parameters(), None) is not None]
    for module in wrap:
        fully_shard(module, mesh=mesh, reshard_after_forward=reshard)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard)
    return model

"""Save and restore everything a run needs to continue exactly: model shards, optimizer, RNG, position.

Each rank writes its own model shard (``model_tpXX_ppYY.safetensors``, written by DP rank 0 only) and
its own optimizer/RNG file; rank 0 writes the manifest and makes the checkpoint visible atomically
(see ``neox.checkpoint.io``). Optimizer state is read back with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from neox.checkpoint.io import (
    CheckpointError,
    read_manifest,
    resolve_step_dir,
    shard_file_name,
    tensor_entry,
    write_checkpoint_dir,
    write_manifest,
)
from neox.config import NeoXConfig


def _barrier(ps) -> None:
    if ps is not None and ps.world_size > 1:
        dist.barrier()


def _modules(model) -> list[torch.nn.Module]:
    return list(model) if isinstance(model, (list, tuple, torch.nn.ModuleList)) else [model]


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t  # FSDP2 DTensor -> whole tensor


def is_shared_copy(module: torch.nn.Module, param) -> bool:
    """A tied-embedding copy on a stage that is not the first: saved once, by the first stage."""
    return bool(getattr(param, "shared_embedding", False)) and not getattr(module, "pre_process", True)


def shard_state(model) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """(tensors this rank saves, their manifest entries) over all of its model chunks."""
    tensors, partition = {}, {}
    for module in _modules(model):
        params = dict(module.named_parameters())
        for name, t in module.state_dict().items():
            p = params.get(name)
            if p is not None and is_shared_copy(module, p):
                continue
            assert name not in tensors, f"two model chunks on one rank both hold {name!r}"
            tensors[name] = _full(t).detach().contiguous().cpu()
            partition[name] = getattr(p, "tp_partition_dim", None)
    return tensors, partition


def model_tensor_entries(model, tp_size: int) -> dict[str, dict]:
    """Manifest entries (global shape, partition dim) for this rank's parameters."""
    tensors, partition = shard_state(model)
    entries = {}
    for name, t in tensors.items():
        dim = partition[name]
        shape = list(t.shape)
        if dim is not None:
            shape[dim] *= tp_size
        entries[name] = tensor_entry(t, dim, shape)
    return entries


def rng_state() -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: Mapping[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _gather_entries(entries: dict, ps) -> dict:
    if ps is None or ps.world_size == 1:
        return entries
    out: list = [None] * ps.world_size
    dist.all_gather_object(out, entries)
    merged: dict = {}
    for e in out:
        merged.update(e)
    return merged


def save_checkpoint(run_dir, iteration: int, *, model, optimizer, config: NeoXConfig, ps=None,
                    trainer_state: Mapping | None = None, rng_tracker=None, save_rng: bool = True) -> Path:
    """Write ``run_dir/global_step{iteration}`` from every rank (collective when distributed).

    ``model`` is a module or this rank's list of pipeline chunks (global parameter names);
    ``rng_tracker`` (per-TP-rank dropout streams) is saved with the default RNG state.
    """
    tp, pp, dp = (ps.tp_size, ps.pp_size, ps.dp_size) if ps is not None else (1, 1, 1)
    tp_rank, pp_rank, dp_rank = (ps.tp_rank, ps.pp_rank, ps.dp_rank) if ps is not None else (0, 0, 0)
    rank = ps.rank if ps is not None else 0
    entries = _gather_entries(model_tensor_entries(model, tp), ps)

    def fill_rank(tmp: Path) -> None:
        if dp_rank == 0:
            sd, _ = shard_state(model)
            save_file(sd, str(tmp / shard_file_name(tp_rank, pp_rank)), metadata={"format": "pt"})
        extra = tmp / "extra"
        extra.mkdir(exist_ok=True)
        if optimizer is not None:
            torch.save(optimizer.state_dict(), extra / f"optim_rank{rank:05d}.pt")
        if save_rng:
            rng = rng_state()
            if rng_tracker is not None:
                rng.update({f"tracker.{k}": v for k, v in rng_tracker.get_states().items()})
            save_file(rng, str(extra / f"rng_rank{rank:05d}.safetensors"))

    def fill(tmp: Path) -> None:
        fill_rank(tmp)
        write_manifest(tmp, iteration=iteration, config=config, layout={"tp": tp, "pp": pp, "dp": dp},
                       tensors=entries, extra={"trainer_state": dict(trainer_state or {})})

    if ps is None or ps.world_size == 1:
        return write_checkpoint_dir(Path(run_dir), iteration, fill)
    # distributed: rank 0 makes a shared temporary dir, every rank fills it, rank 0 publishes it
    return _save_distributed(Path(run_dir), iteration, fill_rank, fill, ps)


def _save_distributed(run_dir: Path, iteration: int, fill_rank, fill, ps) -> Path:
    box = [None]
    if ps.rank == 0:
        def fill_rank0(tmp: Path) -> None:
            box[0] = str(tmp)
            dist.broadcast_object_list(box, src=0)
            fill(tmp)
            dist.barrier()  # everyone else has written their files

        path = write_checkpoint_dir(run_dir, iteration, fill_rank0)
        dist.barrier()
        return path
    dist.broadcast_object_list(box, src=0)
    fill_rank(Path(box[0]))
    dist.barrier()
    dist.barrier()
    return run_dir / f"global_step{iteration}"


def load_checkpoint(path, *, model, optimizer=None, ps=None, step: int | None = None,
                    load_rng: bool = True, rng_tracker=None) -> dict:
    """Restore a checkpoint written in the same layout; returns the manifest's trainer_state."""
    step_dir = resolve_step_dir(path, step)
    manifest = read_manifest(step_dir)
    tp, pp, dp = (ps.tp_size, ps.pp_size, ps.dp_size) if ps is not None else (1, 1, 1)
    layout = manifest["layout"]
    if (layout.get("tp", 1), layout.get("pp", 1)) != (tp, pp):
        raise CheckpointError(
            f"checkpoint {step_dir} was saved with tp={layout.get('tp')} pp={layout.get('pp')}, this run "
            f"uses tp={tp} pp={pp}; reshard it first: python tools/reshard.py --input {step_dir} "
            f"--output {step_dir}_tp{tp}_pp{pp} --tp {tp} --pp {pp}"
        )
    tp_rank, pp_rank = (ps.tp_rank, ps.pp_rank) if ps is not None else (0, 0)
    rank = ps.rank if ps is not None else 0
    sd = load_file(str(step_dir / shard_file_name(tp_rank, pp_rank)))
    needed: set[str] = set()
    for module in _modules(model):
        own = module.state_dict()
        params = dict(module.named_parameters())
        for name, t in own.items():
            src = sd
            if name not in sd and params.get(name) is not None and is_shared_copy(module, params[name]):
                src = load_file(str(step_dir / shard_file_name(tp_rank, 0)))  # the first stage saved it
            if name not in src:
                raise CheckpointError(f"checkpoint {step_dir} has no tensor {name!r} that this model needs")
            if src[name].shape != _full(t).shape:
                raise CheckpointError(
                    f"tensor {name!r}: checkpoint shape {list(src[name].shape)} != model shape "
                    f"{list(_full(t).shape)}; the checkpoint is of another model shape"
                )
            needed.add(name)
            with torch.no_grad():
                if hasattr(t, "full_tensor"):  # FSDP2: load our shard of the whole tensor
                    from torch.distributed.tensor import distribute_tensor

                    t.copy_(distribute_tensor(src[name].to(t.dtype), t.device_mesh, t.placements))
                else:
                    t.copy_(src[name])
    unexpected = sorted(set(sd) - needed)
    if unexpected:
        raise CheckpointError(f"checkpoint {step_dir} holds tensors this model lacks: {unexpected[:5]}")
    extra = step_dir / "extra"
    if optimizer is not None:
        f = extra / f"optim_rank{rank:05d}.pt"
        if not f.is_file():
            raise CheckpointError(f"checkpoint {step_dir} has no optimizer state for rank {rank} ({f.name})")
        optimizer.load_state_dict(torch.load(f, weights_only=True, map_location="cpu"))
    if load_rng:
        f = extra / f"rng_rank{rank:05d}.safetensors"
        if f.is_file():
            rng = load_file(str(f))
            set_rng_state(rng)
            tracked = {k.removeprefix("tracker."): v for k, v in rng.items() if k.startswith("tracker.")}
            if rng_tracker is not None and tracked:
                rng_tracker.set_states(tracked)
    return dict(manifest.get("trainer_state", {}), iteration=manifest["iteration"])


def describe(step_dir) -> str:
    m = read_manifest(resolve_step_dir(step_dir))
    return json.dumps({"iteration": m["iteration"], "layout": m["layout"]})

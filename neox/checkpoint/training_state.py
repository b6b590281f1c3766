"""Save and restore everything a run needs to continue exactly: model shards, optimizer, RNG, position.

Each rank writes its own model shard (``model_tpXX_ppYY.safetensors``, written by DP rank 0 only) and
its own optimizer/RNG file; rank 0 writes the manifest and makes the checkpoint visible atomically
(see ``neox.checkpoint.io``). Optimizer state is read back with ``torch.load(weights_only=True)``.

Optimizer state comes in two on-disk forms:

* native (what training writes): ``extra/optim_rankNNNNN.pt``, this rank's ``optimizer.state_dict()``,
  plus ``extra/optim_index_rankNNNNN.json`` saying which parameter (global name) and which flat range
  ``[lo, hi)`` of its TP-local tensor each optimizer slot holds. Fast and exact, but only valid for the
  same TP x PP x DP layout and optimizer kind (plain / fp32 masters / ZeRO-1 / FSDP). Under FSDP
  (ZeRO-2/3) the file holds this rank's dim-0 shards as plain tensors (``DTensor.to_local()``), each
  slot's ``[lo, hi)`` being the flat range of the whole tensor that the shard covers.
* universal (what ``tools/reshard.py`` writes): ``extra/optim_tpXX_ppYY.safetensors`` holding, for every
  parameter of that model shard, its per-element state as whole TP-local tensors (``NAME.exp_avg``,
  ``NAME.exp_avg_sq``, ``NAME.master``...) and ``extra/optim_universal.json`` with the scalar state
  (Adam's ``step``) and the loss scaler. Any DP size and optimizer kind loads it: each rank slices the
  pieces it owns (the whole tensor without ZeRO, its ZeRO-1 piece, or its FSDP dim-0 shard).
"""

from __future__ import annotations

import contextlib
import json
import math
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


def model_tensor_entries(model, tp_size: int, state: tuple[dict, dict] | None = None) -> dict[str, dict]:
    """Manifest entries (global shape, partition dim) for this rank's parameters (``state``: the
    ``shard_state(model)`` already taken, else it is taken here)."""
    tensors, partition = state if state is not None else shard_state(model)
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
    # every rank takes the model state: under FSDP each tensor is gathered whole, a collective
    state = shard_state(model)
    entries = _gather_entries(model_tensor_entries(model, tp, state), ps)
    sd = state[0] if dp_rank == 0 else None  # only DP rank 0 writes the model shard
    del state
    index = None
    if optimizer is not None:
        index = optimizer_index(optimizer, model)
        index.update(tp_rank=tp_rank, pp_rank=pp_rank, dp_rank=dp_rank, layout={"tp": tp, "pp": pp, "dp": dp})

    def fill_rank(tmp: Path) -> None:
        if sd is not None:
            save_file(sd, str(tmp / shard_file_name(tp_rank, pp_rank)), metadata={"format": "pt"})
        extra = tmp / "extra"
        extra.mkdir(exist_ok=True)
        if optimizer is not None:
            torch.save(native_optimizer_state(optimizer), extra / f"optim_rank{rank:05d}.pt")
            (extra / optim_index_file_name(rank)).write_text(json.dumps(index))
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
    if optimizer is not None:
        load_optimizer_state(step_dir, manifest, optimizer, model, ps)
    if load_rng:
        f = step_dir / "extra" / f"rng_rank{rank:05d}.safetensors"
        if f.is_file():
            rng = load_file(str(f))
            set_rng_state(rng)
            tracked = {k.removeprefix("tracker."): v for k, v in rng.items() if k.startswith("tracker.")}
            if rng_tracker is not None and tracked:
                rng_tracker.set_states(tracked)
    return dict(manifest.get("trainer_state", {}), iteration=manifest["iteration"])



# ---------------------------------------------------------------------------------- optimizer state
UNIVERSAL_META = "optim_universal.json"
UNIVERSAL_FORMAT = "neox-universal-optimizer"


def optim_file_name(rank: int) -> str:
    return f"optim_rank{rank:05d}.pt"


def optim_index_file_name(rank: int) -> str:
    return f"optim_index_rank{rank:05d}.json"


def universal_optim_file_name(tp_rank: int, pp_rank: int) -> str:
    return f"optim_tp{tp_rank:02d}_pp{pp_rank:02d}.safetensors"


def _param_names(model) -> dict[int, str]:
    return {id(p): n for m in _modules(model) for n, p in m.named_parameters()}


def _inner(optimizer) -> torch.optim.Optimizer:
    return optimizer if isinstance(optimizer, torch.optim.Optimizer) else optimizer.optimizer


def _has_masters(optimizer) -> bool:
    return hasattr(optimizer, "pieces")  # MixedPrecisionOptimizer / DistributedOptimizer (ZeRO-1)


def _is_fsdp(param) -> bool:
    return hasattr(param, "full_tensor") and hasattr(param, "to_local")  # an FSDP2 DTensor parameter


def fsdp_shard(param) -> tuple[int, int, list[int]]:
    """(lo, hi, local shape) of this rank's FSDP2 shard of ``param``: its flat range of the whole tensor.

    FSDP2 splits dim 0 as ``torch.chunk`` does: ``ceil(n / dp)`` rows per rank, so the last ranks
    hold fewer rows or none (n=5, dp=4: 2, 2, 1, 0). A block of whole rows of a contiguous tensor is
    one flat range, the same vocabulary as a ZeRO-1 piece."""
    from torch.distributed.tensor import Shard

    mesh, placements = param.device_mesh, tuple(param.placements)
    assert mesh.ndim == 1 and placements == (Shard(0),), f"FSDP param placed as {placements}, expected (Shard(0),)"
    dp, rank = mesh.size(), mesh.get_local_rank()
    n, row = param.shape[0], math.prod(param.shape[1:])
    per = -(-n // dp)
    start = min(rank * per, n)
    stop = min(start + per, n)
    local = [stop - start, *param.shape[1:]]
    assert list(param.to_local().shape) == local, f"FSDP shard {list(param.to_local().shape)} != computed {local}"
    return start * row, stop * row, local


def _as_fsdp_shard(local: torch.Tensor, param) -> torch.Tensor:
    """A plain local shard -> a DTensor placed like ``param`` (uneven shards: global shape given)."""
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(local.to(param.device), param.device_mesh, param.placements, run_check=False,
                              shape=param.shape, stride=param.stride())


def _slots(optimizer) -> list[tuple[torch.nn.Parameter, int, int]]:
    """(model param, lo, hi) of every slot of the inner torch optimizer, in its state_dict index order.

    A slot is the flat range ``[lo, hi)`` of the param's TP-local tensor that the slot's state covers:
    the whole param, its ZeRO-1 piece (the fp32 master of ``param.view(-1)[lo:hi]``), or its FSDP
    dim-0 shard (``fsdp_shard``)."""
    inner = _inner(optimizer)
    if _has_masters(optimizer):
        piece_of = {id(pc.master): pc for pc in optimizer.pieces}
        return [(piece_of[id(m)].param, piece_of[id(m)].lo, piece_of[id(m)].hi)
                for g in inner.param_groups for m in g["params"]]
    return [(p, *fsdp_shard(p)[:2]) if _is_fsdp(p) else (p, 0, p.numel())
            for g in inner.param_groups for p in g["params"]]


def native_optimizer_state(optimizer) -> dict:
    """What training saves: ``optimizer.state_dict()``, FSDP DTensor state as this rank's plain shards
    (so the file is read without torch.distributed, by ``tools/reshard.py`` too)."""
    sd = optimizer.state_dict()
    if _has_masters(optimizer):
        return sd
    state = {i: {k: v.to_local() if _is_fsdp(v) else v for k, v in s.items()} for i, s in sd["state"].items()}
    return {**sd, "state": state}


def _native_fsdp_to_dtensors(sd: dict, optimizer, where: Path) -> dict:
    """Inverse of ``native_optimizer_state`` for an FSDP optimizer of the same layout."""
    slots = _slots(optimizer)
    state = {}
    for i, s in sd["state"].items():
        p = slots[int(i)][0]
        entry = {}
        for k, v in s.items():
            if _is_fsdp(p) and torch.is_tensor(v) and v.dim() > 0 and not _is_fsdp(v):
                if list(v.shape) != fsdp_shard(p)[2]:
                    raise CheckpointError(f"optimizer state {k!r} of slot {i} in {where} has shape {list(v.shape)}, "
                                          f"this rank's FSDP shard {fsdp_shard(p)[2]}; the layout differs")
                v = _as_fsdp_shard(v, p)
            entry[k] = v
        state[i] = entry
    return {**sd, "state": state}


def optimizer_index(optimizer, model) -> dict:
    """What each slot of this rank's native optimizer state holds (saved beside it as JSON), so that
    tools/reshard.py can read native state of any layout without rebuilding the optimizer."""
    names = _param_names(model)
    fsdp = any(_is_fsdp(p) for p, _, _ in _slots(optimizer)) if not _has_masters(optimizer) else False
    index = {"class": type(optimizer).__qualname__, "fsdp": fsdp,
             "slots": [[names[id(p)], lo, hi] for p, lo, hi in _slots(optimizer)]}
    if _has_masters(optimizer):
        index["masters"] = [[names[id(pc.param)], pc.lo, pc.hi] for pc in optimizer.pieces]
    return index


def _reshard_command(step_dir: Path, tp: int, pp: int, dp: int) -> str:
    return (f"python tools/reshard.py --input {step_dir} --output {step_dir}_tp{tp}_pp{pp}_dp{dp} "
            f"--tp {tp} --pp {pp} --dp {dp}")


def load_optimizer_state(step_dir: Path, manifest: Mapping, optimizer, model, ps=None) -> None:
    """Restore ``optimizer`` from universal state when present, else from this rank's native file
    (refused, with the reshard command, when it was written for another DP size or optimizer kind)."""
    extra = step_dir / "extra"
    tp, pp, dp = (ps.tp_size, ps.pp_size, ps.dp_size) if ps is not None else (1, 1, 1)
    rank = ps.rank if ps is not None else 0
    if (extra / UNIVERSAL_META).is_file():
        load_universal_optimizer(step_dir, optimizer, model, ps)
        return
    f = extra / optim_file_name(rank)
    if not (extra / optim_file_name(0)).is_file():
        raise CheckpointError(f"checkpoint {step_dir} holds no optimizer state (saved without it); "
                              "load the weights only (optimizer=None)")
    saved_dp = int(manifest["layout"].get("dp", 1))
    problem = None
    index_f = extra / optim_index_file_name(rank)
    if saved_dp != dp:
        problem = f"data-parallel size {saved_dp} (this run: {dp})"
    elif index_f.is_file():
        saved_class = json.loads(index_f.read_text())["class"]
        if saved_class != type(optimizer).__qualname__:
            problem = f"optimizer {saved_class} (this run: {type(optimizer).__qualname__}; ZeRO or precision differ)"
    if problem is not None:
        raise CheckpointError(
            f"the optimizer state in {step_dir} was saved for {problem}; convert it to a layout-independent "
            f"form first: {_reshard_command(step_dir, tp, pp, dp)}"
        )
    if not f.is_file():
        raise CheckpointError(f"checkpoint {step_dir} has no optimizer state for rank {rank} ({f.name})")
    sd = torch.load(f, weights_only=True, map_location="cpu")
    if not _has_masters(optimizer) and any(_is_fsdp(p) for p, _, _ in _slots(optimizer)):
        sd = _native_fsdp_to_dtensors(sd, optimizer, f)
    optimizer.load_state_dict(sd)


def scalar_to_json(value) -> dict:
    if torch.is_tensor(value):
        return {"value": value.item(), "tensor": True, "dtype": str(value.dtype).removeprefix("torch.")}
    return {"value": value, "tensor": False}


def scalar_from_json(entry: Mapping):
    return torch.tensor(entry["value"], dtype=getattr(torch, entry["dtype"])) if entry["tensor"] else entry["value"]


@torch.no_grad()
def load_universal_optimizer(step_dir: Path, optimizer, model, ps=None) -> None:
    """Fill ``optimizer`` (plain torch, fp32 masters, ZeRO-1 or FSDP ZeRO-2/3, of any DP size) from
    universal state.

    Every slot takes its ``[lo, hi)`` range of the TP-local tensors stored for its parameter (under
    FSDP: this rank's dim-0 shard, wrapped as a DTensor placed like the parameter); the
    hyperparameters (lr, betas, weight decay) stay those of this run's optimizer, the learning rate
    being set by the schedule each step anyway. A tied embedding copy on the last pipeline stage
    reads the first stage's state (the copies are equal: same init, same summed grads).
    """
    from safetensors import safe_open

    extra = Path(step_dir) / "extra"
    meta = json.loads((extra / UNIVERSAL_META).read_text())
    if meta.get("format") != UNIVERSAL_FORMAT:
        raise CheckpointError(f"{extra / UNIVERSAL_META} is not neox universal optimizer state")
    tp_rank, pp_rank = (ps.tp_rank, ps.pp_rank) if ps is not None else (0, 0)
    names = _param_names(model)
    shared = {id(p) for m in _modules(model) for p in m.parameters() if is_shared_copy(m, p)}
    slots = _slots(optimizer)
    with contextlib.ExitStack() as stack:
        handles: dict[int, tuple] = {}

        def stored(param, key: str) -> torch.Tensor | None:
            """The TP-local tensor of ``key`` for ``param``, flattened, or None when not stored."""
            name = names[id(param)]
            if key not in meta["keys"].get(name, ()):
                return None
            pp = 0 if id(param) in shared else pp_rank
            if pp not in handles:
                f = extra / universal_optim_file_name(tp_rank, pp)
                if not f.is_file():
                    raise CheckpointError(f"checkpoint {step_dir} lacks optimizer shard {f.name}")
                h = stack.enter_context(safe_open(str(f), framework="pt"))
                handles[pp] = (h, set(h.keys()))
            h, keys = handles[pp]
            if f"{name}.{key}" not in keys:
                raise CheckpointError(f"optimizer shard of {step_dir} lacks {name}.{key}")
            t = h.get_tensor(f"{name}.{key}").reshape(-1)
            if t.numel() != param.numel():
                raise CheckpointError(f"optimizer state {name}.{key} in {step_dir} has {t.numel()} elements, the "
                                      f"parameter {param.numel()}; the checkpoint is of another layout or model")
            return t

        state: dict[int, dict] = {}
        for i, (p, lo, hi) in enumerate(slots):
            entry = {}
            for key in meta["keys"].get(names[id(p)], ()):
                if key != "master":
                    t = stored(p, key)[lo:hi]
                    if _has_masters(optimizer):
                        entry[key] = t.clone()
                    elif _is_fsdp(p):
                        entry[key] = _as_fsdp_shard(t.view(fsdp_shard(p)[2]).clone(), p)
                    else:
                        entry[key] = t.view(p.shape).clone()
            for key, value in meta["scalars"].get(names[id(p)], {}).items():
                entry[key] = scalar_from_json(value)
            if entry:
                state[i] = entry
        inner_sd = {"state": state, "param_groups": _inner(optimizer).state_dict()["param_groups"]}
        if not _has_masters(optimizer):
            optimizer.load_state_dict(inner_sd)
            return
        masters = []
        for pc in optimizer.pieces:
            t = stored(pc.param, "master")
            if t is None:  # saved without fp32 masters (plain fp32 training): the weights are the masters
                t = _full(pc.param).detach().float().reshape(-1)
            masters.append(t[pc.lo: pc.hi].clone())
        optimizer.load_state_dict({"optimizer": inner_sd, "masters": masters, "loss_scaler": meta.get("loss_scaler")})


def describe(step_dir) -> str:
    m = read_manifest(resolve_step_dir(step_dir))
    return json.dumps({"iteration": m["iteration"], "layout": m["layout"]})

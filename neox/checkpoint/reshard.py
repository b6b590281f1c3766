"""Convert a neox checkpoint to another TP / PP / DP layout, one tensor at a time.

Model tensors: every parameter has one global tensor (TP shards concatenated along its partition dim);
a target shard is a slice of it. Vocabulary tensors (``embed.weight``, ``lm_head.weight``) are padded
to ``padded_vocab_size(tp)`` rows, which depends on TP: rows below ``min(old, new)`` padded size are
copied, new padding rows are zero (padding rows never reach a logit or the loss). Pipeline stages
only regroup tensors: layer names keep their global index, so the target stage of ``layers.{i}.*``
is the stage whose layer range holds ``i`` (the split of ``neox.training.engine.pipeline_layout``),
``embed.*`` goes to the first stage and everything else (final norm, head) to the last.

Optimizer state is written in the layout-independent "universal" form of
``neox.checkpoint.training_state`` (whole TP-local tensors per parameter and state key), which any DP
size loads, without ZeRO, with ZeRO-1 or with FSDP (ZeRO-2/3). The source may be native (per-rank
files plus their slot index) or universal. Native pieces, whatever wrote them, are flat ranges of the
TP-local tensor: a ZeRO-1 piece, or an FSDP rank's dim-0 shard (``torch.chunk`` rows, the last ranks
holding fewer or none); a parameter is reassembled from its pieces, which must cover it exactly.

Memory: every output file is written by a streaming safetensors writer (header first, then each
tensor as it is produced), and all TP shards of one pipeline stage are written side by side, so each
global tensor is assembled once. The peak is about one global tensor plus its slices (x2-3 the largest
tensor), independent of the model size; sources are memory-mapped (safetensors, ``torch.load(mmap=True)``).

RNG state is per rank and not carried over: a resharded run starts its dropout streams from the
config seed (as a fresh run would), so with dropout > 0 the continuation is statistically, not
bitwise, the same. Data position (``consumed_samples``) and iteration (hence the LR step) carry over;
keep the global batch size (micro batch x accumulation x DP) when DP changes.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import torch
from safetensors import safe_open

from megatron_ext.pipeline import partition_layers
from neox.checkpoint.io import (
    CheckpointError,
    read_manifest,
    resolve_step_dir,
    shard_file_name,
    tensor_entry,
    write_checkpoint_dir,
    write_manifest,
)
from neox.checkpoint.training_state import (
    UNIVERSAL_FORMAT,
    UNIVERSAL_META,
    optim_file_name,
    optim_index_file_name,
    scalar_to_json,
    universal_optim_file_name,
)
from neox.config import ConfigError, NeoXConfig

#: tensors whose rows are the (TP-padded) vocabulary
VOCAB_TENSORS = ("embed.weight", "lm_head.weight")
_ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
              torch.bool: "BOOL"}


# ------------------------------------------------------------------------------------ layout
def stage_layer_ranges(cfg: NeoXConfig, tp: int, pp: int, vpp: int | None = None) -> list[list[tuple[int, int]]]:
    """``result[pp_rank]`` = that rank's (start, stop) layer range per virtual chunk, as the engine
    splits them (``neox.training.engine.pipeline_layout``; a test keeps the two equal)."""
    m, vpp = cfg.model, vpp or 1
    if cfg.parallel.pipe_partition_method == "parameters" and vpp == 1:
        from neox.config.plan import stage_layer_counts

        counts, start, out = stage_layer_counts(m, pp, "parameters", tp), 0, []
        for c in counts:
            out.append([(start, start + c)])
            start += c
        return out
    try:
        return partition_layers(m.num_layers, pp, vpp)
    except ValueError as e:
        raise ConfigError(str(e)) from e


_LAYER_NAME = re.compile(r"^(?:layers|blocks)\.(\d+)\.")  # a layer's tensors carry its GLOBAL index


def stage_of_name(name: str, ranges: list[list[tuple[int, int]]]) -> int:
    """The pipeline stage whose shard file holds ``name`` (a tied embedding: the first stage)."""
    m = _LAYER_NAME.match(name)
    if m:
        i = int(m.group(1))
        return next(r for r, chunks in enumerate(ranges) if any(a <= i < b for a, b in chunks))
    return 0 if name.startswith("embed") else len(ranges) - 1


def layout_config(config: Mapping, tp: int, pp: int, vpp: int | None) -> NeoXConfig:
    d = dict(config)
    d.update(model_parallel_size=tp, pipe_parallel_size=pp, num_virtual_pipeline_stages=vpp)
    return NeoXConfig.from_dict(d)


# ------------------------------------------------------------------------------ tensor math
def repad_vocab(t: torch.Tensor, rows: int) -> torch.Tensor:
    """[V_old, ...] -> [rows, ...]: rows kept up to min(V_old, rows), zero rows appended."""
    if t.shape[0] >= rows:
        return t[:rows]
    return torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])])


def tp_slice(t: torch.Tensor, dim: int | None, tp: int, rank: int) -> torch.Tensor:
    if dim is None or tp == 1:
        return t
    n = t.shape[dim]
    if n % tp:
        raise CheckpointError(f"a tensor of size {n} along its partition dim {dim} does not split into tp={tp}")
    return t.narrow(dim, rank * (n // tp), n // tp)


# --------------------------------------------------------------------------- streaming writer
class StreamingSafetensorsWriter:
    """Write a safetensors file whose header (names, dtypes, shapes) is known up front, tensor by
    tensor, so the file is never held in memory. ``add`` must follow the order given to the header."""

    def __init__(self, path: Path, specs: Iterable[tuple[str, torch.dtype, list[int]]],
                 metadata: Mapping[str, str] | None = None):
        self.specs = list(specs)
        header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
        offset = 0
        for name, dtype, shape in self.specs:
            nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            header[name] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.f = open(path, "wb")  # noqa: SIM115 - closed in close()
        self.f.write(len(raw).to_bytes(8, "little") + raw)
        self.next = 0

    def add(self, name: str, t: torch.Tensor) -> None:
        want, dtype, shape = self.specs[self.next]
        if (name, t.dtype, list(t.shape)) != (want, dtype, list(shape)):
            raise AssertionError(f"writer expected {want} {dtype} {shape}, got {name} {t.dtype} {list(t.shape)}")
        if t.numel():
            self.f.write(memoryview(t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()))
        self.next += 1

    def close(self) -> None:
        assert self.next == len(self.specs), f"wrote {self.next} of {len(self.specs)} tensors"
        self.f.flush()
        self.f.close()


# ------------------------------------------------------------------------------------ source
class SourceCheckpoint:
    """Reads one global tensor (model weight or optimizer state) at a time from any layout."""

    def __init__(self, step_dir: Path):
        self.step_dir = step_dir
        self.manifest = read_manifest(step_dir)
        layout = self.manifest["layout"]
        self.tp, self.pp, self.dp = int(layout.get("tp", 1)), int(layout.get("pp", 1)), int(layout.get("dp", 1))
        self.tensors: dict[str, dict] = self.manifest["tensors"]
        self.config = NeoXConfig.from_dict(self.manifest["config"])
        self.stage: dict[str, int] = {}  # name -> pp stage of the file that holds it
        for pp in range(self.pp):
            f = step_dir / shard_file_name(0, pp)
            if not f.is_file():
                raise CheckpointError(f"checkpoint {step_dir} is missing shard {f.name} "
                                      f"(layout tp={self.tp} pp={self.pp})")
            with safe_open(str(f), framework="pt") as h:
                for k in h.keys():
                    self.stage.setdefault(k, pp)
        missing = sorted(set(self.tensors) - set(self.stage))
        if missing:
            raise CheckpointError(f"checkpoint {step_dir} lists tensors that no shard holds: {missing[:5]}")
        extra = step_dir / "extra"
        self.universal = (extra / UNIVERSAL_META).is_file()
        self.optim_meta: dict = {"keys": {}, "scalars": {}, "loss_scaler": None}
        self._native: dict[int, dict] = {}
        self._pieces: dict[str, list[tuple[int, int, int, int, int]]] = {}  # name -> (rank, tp, kind, i, lo, hi)
        if self.universal:
            self.optim_meta = json.loads((extra / UNIVERSAL_META).read_text())
        elif (extra / optim_file_name(0)).is_file():
            self._index_native(extra)

    @property
    def has_optimizer(self) -> bool:
        return self.universal or bool(self._pieces)

    # -- native optimizer files: map every stored piece to (name, flat range) through the slot index
    def _index_native(self, extra: Path) -> None:
        world = self.tp * self.pp * self.dp
        for rank in range(world):
            idx_f, opt_f = extra / optim_index_file_name(rank), extra / optim_file_name(rank)
            if not idx_f.is_file() or not opt_f.is_file():
                raise CheckpointError(
                    f"checkpoint {self.step_dir} has no {idx_f.name if not idx_f.is_file() else opt_f.name}: its "
                    "optimizer state cannot be resharded (written by an older neox?); reshard with --weights-only"
                )
            index = json.loads(idx_f.read_text())
            sd = torch.load(opt_f, map_location="cpu", weights_only=True, mmap=True)
            self._native[rank] = sd
            masters = "masters" in index
            inner = sd["optimizer"] if masters else sd
            tp_rank, pp_rank = index["tp_rank"], index["pp_rank"]
            if rank == 0 and masters:
                self.optim_meta["loss_scaler"] = sd.get("loss_scaler")
            for i, (name, lo, hi) in enumerate(index["slots"]):
                if self.stage.get(name) != pp_rank:
                    continue  # a tied embedding copy on the last stage: the first stage's state is read
                self._pieces.setdefault(name, []).append((rank, tp_rank, 0, i, lo, hi))
                for key, v in inner["state"].get(i, {}).items():
                    if torch.is_tensor(v) and v.dim() > 0:
                        keys = self.optim_meta["keys"].setdefault(name, [])
                        if key not in keys:
                            keys.append(key)
                    else:
                        self.optim_meta["scalars"].setdefault(name, {})[key] = scalar_to_json(v)
            for j, (name, lo, hi) in enumerate(index.get("masters", [])):
                if self.stage.get(name) == pp_rank:
                    self._pieces.setdefault(name, []).append((rank, tp_rank, 1, j, lo, hi))
                    keys = self.optim_meta["keys"].setdefault(name, [])
                    if "master" not in keys:
                        keys.append("master")

    def _native_piece(self, rank: int, kind: int, i: int, key: str) -> torch.Tensor | None:
        sd = self._native[rank]
        if kind == 1:
            return sd["masters"][i] if key == "master" else None
        inner = sd["optimizer"] if "masters" in sd else sd
        return inner["state"].get(i, {}).get(key) if key != "master" else None

    def _assemble_native(self, name: str, key: str) -> torch.Tensor:
        entry = self.tensors[name]
        shape, dim = list(entry["shape"]), entry["partition_dim"]
        local = list(shape)
        if dim is not None:
            local[dim] //= self.tp
        flats: dict[int, torch.Tensor] = {}
        covered: dict[int, int] = {}
        for rank, tp_rank, kind, i, lo, hi in self._pieces[name]:
            if dim is None and tp_rank != 0:
                continue  # replicated over TP: every TP rank holds the same state
            v = self._native_piece(rank, kind, i, key)
            if v is None:
                continue
            flat = flats.setdefault(tp_rank, torch.zeros(math.prod(local), dtype=torch.float32))
            flat[lo:hi] = v.reshape(-1)
            covered[tp_rank] = covered.get(tp_rank, 0) + (hi - lo)
        ranks = [0] if dim is None else list(range(self.tp))
        for r in ranks:
            if covered.get(r) != math.prod(local):
                raise CheckpointError(f"optimizer state {key!r} of {name!r} in {self.step_dir} covers "
                                      f"{covered.get(r, 0)} of {math.prod(local)} elements on TP rank {r}")
        parts = [flats[r].view(local) for r in ranks]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)

    # -- reading
    def _read_sharded(self, file_name: Callable[[int, int], str], name: str, key: str) -> torch.Tensor:
        entry = self.tensors[name]
        dim, pp = entry["partition_dim"], self.stage[name]
        ranks = [0] if dim is None else list(range(self.tp))
        parts = []
        for r in ranks:
            with safe_open(str(self.step_dir / file_name(r, pp)), framework="pt") as h:
                parts.append(h.get_tensor(key))
        t = parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)
        if list(t.shape) != list(entry["shape"]):
            raise CheckpointError(f"{key!r} in {self.step_dir} has shape {list(t.shape)}, "
                                  f"manifest says {entry['shape']}")
        return t

    def model_tensor(self, name: str) -> torch.Tensor:
        return self._read_sharded(shard_file_name, name, name)

    def optim_tensor(self, name: str, key: str) -> torch.Tensor:
        if self.universal:
            return self._read_sharded(lambda r, p: "extra/" + universal_optim_file_name(r, p), name, f"{name}.{key}")
        return self._assemble_native(name, key)


# --------------------------------------------------------------------------------- resharding
def _target_tensor(t: torch.Tensor, name: str, vocab_rows: int) -> torch.Tensor:
    return repad_vocab(t, vocab_rows) if name in VOCAB_TENSORS else t


def _global_shape(name: str, shape: list[int], vocab_rows: int) -> list[int]:
    return [vocab_rows, *shape[1:]] if name in VOCAB_TENSORS else list(shape)


def write_stage_files(out_dir: Path, file_name: Callable[[int], str], tp: int,
                      items: list[tuple[str, str, int | None, torch.dtype, list[int]]],
                      produce: Callable[[str, str], torch.Tensor]) -> None:
    """Write the ``tp`` files of one pipeline stage side by side.

    items: (tensor name in the file, parameter name, partition dim, dtype, target global shape);
    ``produce(key, name)`` returns the target global tensor (vocab already re-padded).
    """
    writers = []
    for r in range(tp):
        specs = []
        for key, _name, dim, dtype, shape in items:
            local = list(shape)
            if dim is not None:
                local[dim] //= tp
            specs.append((key, dtype, local))
        writers.append(StreamingSafetensorsWriter(out_dir / file_name(r), specs))
    try:
        for key, name, dim, _dtype, _shape in items:
            t = produce(key, name)
            for r, w in enumerate(writers):
                w.add(key, tp_slice(t, dim, tp, r))
            del t
        for w in writers:
            w.close()
    except BaseException:
        for w in writers:
            w.f.close()
        raise


def reshard_checkpoint(src_path, out_run_dir, *, tp: int, pp: int, dp: int | None = None, vpp: int | None = None,
                       weights_only: bool = False, step: int | None = None) -> Path:
    """Write the checkpoint at ``src_path`` (run or step dir) as ``out_run_dir/global_stepN`` in the
    TP x PP (x DP) layout; returns the new step dir. See the module docstring for what carries over.

    dp: recorded in the manifest (default: the source's); the universal optimizer state loads at any DP.
    vpp: virtual pipeline chunks of the target (1: none; default: the source's when it still divides
    the layers). weights_only: drop the optimizer state (a run loading it must then use
    ``load_checkpoint(..., optimizer=None)`` / ``finetune``).
    """
    step_dir = resolve_step_dir(src_path, step)
    if Path(out_run_dir).resolve() in (step_dir.resolve(), step_dir.parent.resolve()):
        raise ValueError(f"reshard: --output {out_run_dir} would overwrite the input checkpoint; "
                         "choose a new run directory")
    src = SourceCheckpoint(step_dir)
    dp = dp or src.dp
    for k, v in (("tp", tp), ("pp", pp), ("dp", dp)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"reshard: --{k} must be a positive integer, got {v!r}")
    if vpp is None:  # keep an interleaved split when it still fits the new PP size
        old = src.config.parallel.num_virtual_pipeline_stages or 1
        vpp = old if old > 1 and pp > 1 and src.config.model.num_layers % (pp * old) == 0 else None
    vpp = None if vpp == 1 else vpp
    cfg = layout_config(src.manifest["config"], tp, pp, vpp)
    m = cfg.model
    if m.vocab_size is None:
        raise CheckpointError(f"checkpoint {step_dir} has no vocab_size in its config; cannot re-pad the vocabulary")
    if m.hidden_size % tp or m.num_attention_heads % tp or m.ffn_size % tp:
        raise ValueError(f"reshard: tp={tp} does not divide hidden_size {m.hidden_size}, heads "
                         f"{m.num_attention_heads} or ffn size {m.ffn_size}; choose another --tp")
    ranges = stage_layer_ranges(cfg, tp, pp, vpp)
    vocab_rows = m.padded_vocab_size(tp)
    names = list(src.tensors)
    entries = {n: tensor_entry(torch.empty(0, dtype=getattr(torch, e["dtype"])), e["partition_dim"],
                               _global_shape(n, e["shape"], vocab_rows)) for n, e in src.tensors.items()}
    with_optim = src.has_optimizer and not weights_only

    def fill(tmp: Path) -> None:
        (tmp / "extra").mkdir()
        for stage in range(pp):
            here = [n for n in names if stage_of_name(n, ranges) == stage]
            items = [(n, n, entries[n]["partition_dim"], getattr(torch, entries[n]["dtype"]), entries[n]["shape"])
                     for n in here]
            write_stage_files(tmp, lambda r, s=stage: shard_file_name(r, s), tp, items,
                              lambda _key, n: _target_tensor(src.model_tensor(n), n, vocab_rows))
            if with_optim:
                items = [(f"{n}.{k}", n, entries[n]["partition_dim"], torch.float32, entries[n]["shape"])
                         for n in here for k in src.optim_meta["keys"].get(n, ())]
                write_stage_files(tmp / "extra", lambda r, s=stage: universal_optim_file_name(r, s), tp, items,
                                  lambda key, n: _target_tensor(src.optim_tensor(n, key[len(n) + 1:]).float(), n,
                                                                vocab_rows))
        if with_optim:
            meta = {"format": UNIVERSAL_FORMAT, "version": 1, "keys": src.optim_meta["keys"],
                    "scalars": src.optim_meta["scalars"], "loss_scaler": src.optim_meta.get("loss_scaler")}
            (tmp / "extra" / UNIVERSAL_META).write_text(json.dumps(meta, indent=1))
        write_manifest(tmp, iteration=src.manifest["iteration"], config=cfg, layout={"tp": tp, "pp": pp, "dp": dp},
                       tensors=entries, extra={
                           "trainer_state": dict(src.manifest.get("trainer_state", {})),
                           "resharded_from": {"path": str(step_dir), "layout": src.manifest["layout"],
                                              "optimizer": with_optim},
                       })

    out_run_dir = Path(out_run_dir)
    out = write_checkpoint_dir(out_run_dir, src.manifest["iteration"], fill)
    copy_side_files(step_dir, out_run_dir, cfg)
    return out


def copy_side_files(step_dir: Path, out_run_dir: Path, cfg: NeoXConfig) -> None:
    """Tokenizer and original HF config beside the source checkpoint travel with it."""
    from neox.checkpoint.hf_gpt_neox import HF_SIDE_FILES

    wanted = {*HF_SIDE_FILES, "hf_config.json"}
    for f in (cfg.data.vocab_file, cfg.data.merge_file):
        if f:
            wanted.add(Path(f).name)
    for d in (step_dir.parent, step_dir):
        for name in wanted:
            if (d / name).is_file() and not (out_run_dir / name).exists():
                shutil.copy2(d / name, out_run_dir / name)


def save_model_in_layout(run_dir, state_dict_full: Mapping[str, torch.Tensor], config: NeoXConfig, *, tp: int,
                         pp: int, partition_dims: Mapping[str, int | None], iteration: int = 0,
                         vpp: int | None = None) -> Path:
    """Save a whole model (vocab rows padded for any TP, or not at all) as a TP x PP checkpoint that
    the engine loads directly in that layout (``load_checkpoint``)."""
    cfg = layout_config(config.to_dict(), tp, pp, vpp)
    ranges = stage_layer_ranges(cfg, tp, pp, vpp)
    vocab_rows = cfg.model.padded_vocab_size(tp)
    tensors = {n: _target_tensor(t.detach().cpu(), n, vocab_rows) for n, t in state_dict_full.items()}
    entries = {n: tensor_entry(t, partition_dims.get(n)) for n, t in tensors.items()}

    def fill(tmp: Path) -> None:
        for stage in range(pp):
            items = [(n, n, entries[n]["partition_dim"], t.dtype, list(t.shape))
                     for n, t in tensors.items() if stage_of_name(n, ranges) == stage]
            write_stage_files(tmp, lambda r, s=stage: shard_file_name(r, s), tp, items,
                              lambda _key, n: tensors[n])
        write_manifest(tmp, iteration=iteration, config=cfg, layout={"tp": tp, "pp": pp, "dp": 1}, tensors=entries)

    return write_checkpoint_dir(Path(run_dir), iteration, fill)

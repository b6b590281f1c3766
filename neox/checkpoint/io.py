"""Checkpoint files on disk: safetensors shards plus a JSON manifest, written atomically.

Layout of a run directory::

    RUN_DIR/latest                            "global_step100" (written last, atomically)
    RUN_DIR/global_step100/manifest.json      config, layout, iteration, every tensor's global shape
    RUN_DIR/global_step100/model_tp00_pp00.safetensors   one file per (tp, pp) shard
    RUN_DIR/global_step100/extra/...          optimizer / RNG / data position (training state)

A checkpoint directory only ever appears under its final name once every file in it is written and
fsynced, and `latest` is replaced only after that, so a crash at any moment leaves `latest` pointing
at a complete checkpoint. Loading never unpickles arbitrary objects: tensors come from safetensors,
metadata from JSON, and optional training state through ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from neox.config import NeoXConfig

FORMAT = "neox"
VERSION = 1
MANIFEST = "manifest.json"
LATEST = "latest"
_STEP_RE = re.compile(r"^global_step(\d+)$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read as asked: missing, incomplete, or of another shape/layout."""


def step_dir_name(iteration: int) -> str:
    return f"global_step{int(iteration)}"


def shard_file_name(tp_rank: int, pp_rank: int) -> str:
    return f"model_tp{tp_rank:02d}_pp{pp_rank:02d}.safetensors"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    for root, _dirs, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(Path(root))


def write_text_atomic(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` so that readers see the old or the new content, never a mix."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_checkpoint_dir(run_dir: Path, iteration: int, fill: Callable[[Path], None]) -> Path:
    """Create ``run_dir/global_stepN`` atomically: ``fill(tmp_dir)`` writes the files, then rename.

    An existing checkpoint of the same step is replaced only after the new one is complete.
    Errors while writing (a full disk, a crash in ``fill``) leave earlier checkpoints and
    ``latest`` untouched and remove the partial temporary directory.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    final = run_dir / step_dir_name(iteration)
    tmp = Path(tempfile.mkdtemp(dir=run_dir, prefix=f".tmp_{final.name}_"))
    try:
        fill(tmp)
        _fsync_tree(tmp)
        if final.exists():
            old = run_dir / f".old_{final.name}_{os.getpid()}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(run_dir)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(
            f"could not write checkpoint {final}: {e}. Earlier checkpoints and '{LATEST}' are untouched; "
            "free disk space (or choose another 'save' directory) and try again."
        ) from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    write_text_atomic(run_dir / LATEST, final.name + "\n")
    return final


def tensor_entry(tensor: torch.Tensor, partition_dim: int | None, global_shape=None) -> dict:
    return {
        "shape": list(global_shape if global_shape is not None else tensor.shape),
        "dtype": str(tensor.dtype).removeprefix("torch."),
        "partition_dim": partition_dim,
    }


def write_manifest(step_dir: Path, *, iteration: int, config: NeoXConfig | Mapping, layout: Mapping,
                   tensors: Mapping[str, dict], extra: Mapping | None = None) -> None:
    cfg = config.to_dict() if isinstance(config, NeoXConfig) else dict(config)
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "iteration": int(iteration),
        "config": cfg,
        "layout": dict(layout),
        "tensors": dict(tensors),
    }
    if extra:
        manifest.update(extra)
    with open(step_dir / MANIFEST, "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=False)
        f.write("\n")


def save_model_checkpoint(run_dir, state_dict_full: Mapping[str, torch.Tensor], config: NeoXConfig,
                          iteration: int = 0,
                          partition_dims: Mapping[str, int | None] | None = None) -> Path:
    """Save a whole (TP = PP = 1) model as a neox checkpoint; returns the ``global_stepN`` dir."""
    partition_dims = partition_dims or {}
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict_full.items()}

    def fill(tmp: Path) -> None:
        save_file(tensors, str(tmp / shard_file_name(0, 0)), metadata={"format": "pt"})
        write_manifest(
            tmp, iteration=iteration, config=config, layout={"tp": 1, "pp": 1, "dp": 1},
            tensors={k: tensor_entry(v, partition_dims.get(k)) for k, v in tensors.items()},
        )

    return write_checkpoint_dir(Path(run_dir), iteration, fill)


def resolve_step_dir(path, step: int | None = None) -> Path:
    """A run dir (follows ``latest``, or ``step``) or a ``global_stepN`` dir -> the step dir."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint path {path} does not exist")
    if (path / MANIFEST).is_file():
        return path
    if step is not None:
        cand = path / step_dir_name(step)
    elif (path / LATEST).is_file():
        cand = path / (path / LATEST).read_text().strip()
    else:
        steps = sorted((int(m.group(1)), p) for p in path.iterdir() if (m := _STEP_RE.match(p.name)))
        if not steps:
            raise CheckpointError(
                f"{path} is not a neox checkpoint: no {MANIFEST}, no '{LATEST}' file and no global_stepN dirs"
            )
        cand = steps[-1][1]
    if not (cand / MANIFEST).is_file():
        raise CheckpointError(f"checkpoint {cand} is incomplete or missing ({MANIFEST} not found)")
    return cand


def read_manifest(step_dir) -> dict:
    step_dir = Path(step_dir)
    try:
        manifest = json.loads((step_dir / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {step_dir / MANIFEST}: {e}") from e
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"{step_dir} is not a neox checkpoint (format={manifest.get('format')!r})")
    if manifest.get("version", 0) > VERSION:
        raise CheckpointError(
            f"{step_dir} was written by a newer neox (checkpoint version {manifest['version']}); upgrade neox"
        )
    return manifest


def load_model_checkpoint(path, step: int | None = None) -> tuple[NeoXConfig, dict[str, torch.Tensor]]:
    """Read a checkpoint of any TP/PP layout into one full state dict (shards concatenated)."""
    step_dir = resolve_step_dir(path, step)
    manifest = read_manifest(step_dir)
    layout = manifest["layout"]
    tp, pp = int(layout.get("tp", 1)), int(layout.get("pp", 1))
    shards: dict[str, list[tuple[int, torch.Tensor]]] = {}
    for pp_rank in range(pp):
        for tp_rank in range(tp):
            f = step_dir / shard_file_name(tp_rank, pp_rank)
            if not f.is_file():
                raise CheckpointError(f"checkpoint {step_dir} is missing shard {f.name} (layout tp={tp} pp={pp})")
            for name, t in load_file(str(f)).items():
                shards.setdefault(name, []).append((tp_rank, t))
    full: dict[str, torch.Tensor] = {}
    for name, entry in manifest["tensors"].items():
        parts = shards.pop(name, None)
        if not parts:
            raise CheckpointError(f"checkpoint {step_dir} lists tensor {name!r} but no shard holds it")
        dim = entry.get("partition_dim")
        parts.sort(key=lambda p: p[0])
        t = parts[0][1] if dim is None or len(parts) == 1 else torch.cat([p[1] for p in parts], dim=dim)
        if list(t.shape) != list(entry["shape"]):
            raise CheckpointError(
                f"tensor {name!r} in {step_dir} has shape {list(t.shape)}, manifest says {entry['shape']}"
            )
        full[name] = t
    if shards:
        raise CheckpointError(f"checkpoint {step_dir} holds tensors not in its manifest: {sorted(shards)[:5]}")
    return NeoXConfig.from_dict(manifest["config"]), full

"""Load a full checkpoint (neox run dir or HF GPT-NeoX dir) into this TP rank's shard of the model.

Generation may run on another TP size than training: each tensor is cut along its partition dim
(the model spec's `partition_dim`) and the rank keeps its slice. Vocab tensors are first re-padded
to the padded vocab of this TP size (padding rows are zeros and never sampled), so a TP = 1
checkpoint loads at TP = 2 and back.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from megatron_ext.topology import ParallelState
from neox.checkpoint.io import CheckpointError
from neox.checkpoint.loading import load_config_and_weights
from neox.config import NeoXConfig
from neox.models.registry import build_model, get_model_spec

VOCAB_TENSORS = ("embed.weight", "lm_head.weight")


def _fit_vocab_rows(t: torch.Tensor, rows: int, vocab_size: int, name: str) -> torch.Tensor:
    """[V?, D] -> [rows, D]: append zero rows, or drop padding rows (never real-vocab rows)."""
    if t.shape[0] < rows:
        return torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])])
    if t.shape[0] > rows:
        if rows < vocab_size:
            raise CheckpointError(f"{name}: {t.shape[0]} rows cannot shrink to {rows} < vocab {vocab_size}")
        return t[:rows]
    return t


def shard_state_dict(full: Mapping[str, torch.Tensor], model: nn.Module, cfg: NeoXConfig,
                     ps: ParallelState) -> dict[str, torch.Tensor]:
    """This TP rank's slices of a full (checkpoint-named) state dict, shaped like model.state_dict()."""
    part = get_model_spec(cfg.model.model_type).partition_dim
    own = model.state_dict()
    missing = sorted(set(own) - set(full))
    unexpected = sorted(set(full) - set(own))
    if missing or unexpected:
        raise CheckpointError(f"checkpoint does not match the model it describes (missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]})")
    out = {}
    for name, local in own.items():
        t, dim = full[name], part(name)
        if name in VOCAB_TENSORS:
            rows = local.shape[0] * (ps.tp_size if dim == 0 else 1)
            t = _fit_vocab_rows(t, rows, cfg.model.vocab_size, name)
        if dim is not None and ps.tp_size > 1:
            if t.shape[dim] % ps.tp_size:
                raise CheckpointError(f"{name}: dim {dim} of size {t.shape[dim]} does not split over tp "
                                      f"{ps.tp_size}")
            t = t.chunk(ps.tp_size, dim=dim)[ps.tp_rank]
        if t.shape != local.shape:
            raise CheckpointError(f"{name}: checkpoint slice {list(t.shape)} != model {list(local.shape)}")
        out[name] = t
    return out


def load_model_for_inference(path, ps: ParallelState | None = None, *, dtype: torch.dtype = torch.float32,
                             device: str | torch.device = "cpu") -> tuple[NeoXConfig, nn.Module]:
    """(config, this rank's GPTNeoX in eval mode) from a checkpoint path; ps defaults to one process."""
    ps = ps or ParallelState.single()
    cfg, full = load_config_and_weights(path)
    model = build_model(cfg.model, ps)
    model.load_state_dict(shard_state_dict(full, model, cfg, ps), strict=True)
    return cfg, model.to(device=device, dtype=dtype).eval()

"""``neox.load``: any neox checkpoint (any TP/PP layout) or Hugging Face GPT-NeoX / RWKV directory -> a module."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import torch

from neox.checkpoint.io import CheckpointError, load_model_checkpoint
from neox.config import NeoXConfig


def hf_model_type(path: Path) -> str | None:
    """transformers' `model_type` of a Hugging Face model directory (None: not one)."""
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return None
    try:
        return json.loads(cfg.read_text()).get("model_type")
    except json.JSONDecodeError:
        return None


def is_hf_dir(path: Path) -> bool:
    """A Hugging Face directory of a model family neox converts (GPT-NeoX, RWKV)."""
    from neox.models.registry import spec_for_hf_model_type

    kind = hf_model_type(path)
    return kind is not None and spec_for_hf_model_type(kind) is not None


def load_config_and_weights(path) -> tuple[NeoXConfig, dict[str, torch.Tensor]]:
    """Read a neox checkpoint or an HF GPT-NeoX / RWKV directory as (config, full neox state dict)."""
    path = Path(path)
    if path.is_dir() and is_hf_dir(path):
        from neox.models.registry import spec_for_hf_model_type

        adapter = importlib.import_module(spec_for_hf_model_type(hf_model_type(path)).hf_adapter)
        return adapter.load_hf_checkpoint(path)
    return load_model_checkpoint(path)


def load(path, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> torch.nn.Module:
    """A ready ``CausalLM`` in eval mode: ``model(input_ids [B, T]) -> logits [B, T, V]`` (real vocab)."""
    from megatron_ext.topology import ParallelState
    from neox.inference.loading import shard_state_dict
    from neox.models.causal_lm import CausalLM
    from neox.models.registry import build_model

    cfg, state = load_config_and_weights(path)
    ps = ParallelState.single()
    model = build_model(cfg.model, ps)
    # vocab rows re-padded for one process (a checkpoint written for TP > 1 pads them further)
    model.load_state_dict(shard_state_dict(state, model, cfg, ps), strict=True)
    lm = CausalLM(model, cfg.model)
    lm.config = cfg
    return lm.to(device=device, dtype=dtype).eval()


def find_tokenizer(load, cfg: NeoXConfig, explicit: str | None = None, kind: str = "HFTokenizer"):
    """The tokenizer for a checkpoint: ``explicit`` (of type ``kind``), else a tokenizer.json beside it
    (HF dir, step dir or run dir), else the one its config names."""
    from neox.checkpoint.io import resolve_step_dir
    from neox.data.tokenizers import build_tokenizer

    load = Path(load)
    if explicit:
        return build_tokenizer(kind, explicit)
    candidates = [load / "tokenizer.json"]
    if load.is_dir() and not is_hf_dir(load):
        try:
            step = resolve_step_dir(load)
            candidates += [step / "tokenizer.json", step.parent / "tokenizer.json"]
        except ValueError:
            pass
    for c in candidates:
        if c.is_file():
            return build_tokenizer("HFTokenizer", str(c))
    d = cfg.data
    if d.tokenizer_type == "CharLevelTokenizer" or (d.vocab_file and Path(d.vocab_file).is_file()):
        return build_tokenizer(d.tokenizer_type, d.vocab_file, d.merge_file)
    raise CheckpointError(f"no tokenizer found for {load}: pass --tokenizer path/to/tokenizer.json")

"""``neox.load``: any neox checkpoint (any TP/PP layout) or Hugging Face GPT-NeoX directory -> a module."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from neox.checkpoint.io import CheckpointError, load_model_checkpoint
from neox.config import NeoXConfig


def is_hf_dir(path: Path) -> bool:
    cfg = path / "config.json"
    if not cfg.is_file():
        return False
    try:
        return json.loads(cfg.read_text()).get("model_type") == "gpt_neox"
    except json.JSONDecodeError:
        return False


def load_config_and_weights(path) -> tuple[NeoXConfig, dict[str, torch.Tensor]]:
    """Read a neox checkpoint or an HF GPT-NeoX directory as (config, full neox state dict)."""
    path = Path(path)
    if path.is_dir() and is_hf_dir(path):
        from neox.checkpoint.hf_gpt_neox import load_hf_checkpoint

        return load_hf_checkpoint(path)
    return load_model_checkpoint(path)


def load(path, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> torch.nn.Module:
    """A ready ``CausalLM`` in eval mode: ``model(input_ids [B, T]) -> logits [B, T, V]`` (real vocab)."""
    from megatron_ext.topology import ParallelState
    from neox.models.causal_lm import CausalLM
    from neox.models.registry import build_model

    cfg, state = load_config_and_weights(path)
    model = build_model(cfg.model, ParallelState.single())
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: checkpoint does not match the model it describes "
            f"(missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]})"
        )
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

"""Hugging Face `GPTNeoXForCausalLM` <-> neox GPT-NeoX: configs, state dicts, and files on disk.

The two models are the same network with different names, plus two differences in storage:
neox pads the vocabulary (rows of the embedding / head) to a multiple of make_vocab_size_divisible_by
(the padded rows are zero and never reach the loss), and a tied neox model has no `lm_head.weight`.
Conversion in both directions is exact (no arithmetic on the tensors), so HF -> neox -> HF is
bit-identical.

Config fields that neox does not model (token ids, classifier dropout, dtype...) ride along in a
`base` dict: `neox_config_to_hf(cfg, base=original_hf_config_dict)` restores them.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from neox.config import ModelConfig, NeoXConfig

#: files beside the weights that travel with a converted model (tokenizer, generation defaults)
HF_SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                 "merges.txt", "added_tokens.json", "generation_config.json")

_LAYER_MAP = {  # HF name inside gpt_neox.layers.{i}.  ->  neox name inside layers.{i}.
    "input_layernorm": "input_norm",
    "post_attention_layernorm": "post_attention_norm",
    "attention.query_key_value": "attention.query_key_value",
    "attention.dense": "attention.dense",
    "mlp.dense_h_to_4h": "mlp.dense_h_to_4h",
    "mlp.dense_4h_to_h": "mlp.dense_4h_to_h",
}
# buffers that older HF checkpoints carry and that are recomputed, not learned
_IGNORED = re.compile(r"(attention\.(bias|masked_bias)|rotary_emb\.inv_freq)$")


def _model_cfg(cfg: NeoXConfig | ModelConfig) -> ModelConfig:
    return cfg.model if hasattr(cfg, "model") else cfg


# ---------------------------------------------------------------------------------------- configs
def hf_config_to_neox(hf_config, **overrides) -> NeoXConfig:
    """transformers.GPTNeoXConfig (or its dict) -> NeoXConfig (model section; the rest defaults).

    overrides: further flat gpt-neox keys (e.g. vocab_file, seq_length) merged in.
    """
    from transformers import GPTNeoXConfig

    if isinstance(hf_config, Mapping):
        hf_config = GPTNeoXConfig.from_dict(dict(hf_config))
    if hf_config.model_type != "gpt_neox":
        raise ValueError(f"expected a Hugging Face gpt_neox config, got model_type={hf_config.model_type!r}")
    rope = dict(hf_config.rope_parameters or {})
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"rope_type {rope['rope_type']!r} is not supported by neox (only 'default' RoPE)")
    if not hf_config.attention_bias:
        raise ValueError("attention_bias=False is not supported: neox GPT-NeoX layers always have biases")
    if hf_config.hidden_act != "gelu":
        raise ValueError(f"hidden_act {hf_config.hidden_act!r} is not supported (neox uses exact 'gelu')")
    theta = rope.get("rope_theta", 10000)
    flat = {
        "model_type": "gpt_neox",
        "num_layers": hf_config.num_hidden_layers,
        "hidden_size": hf_config.hidden_size,
        "num_attention_heads": hf_config.num_attention_heads,
        "intermediate_size": hf_config.intermediate_size,
        "seq_length": hf_config.max_position_embeddings,
        "max_position_embeddings": hf_config.max_position_embeddings,
        "vocab_size": hf_config.vocab_size,
        "pos_emb": "rotary",
        "rotary_pct": rope.get("partial_rotary_factor", 1.0),
        "rotary_emb_base": int(theta) if float(theta).is_integer() else theta,
        "gpt_j_residual": bool(hf_config.use_parallel_residual),
        "norm": "layernorm",
        "layernorm_epsilon": hf_config.layer_norm_eps,
        "no_weight_tying": not hf_config.tie_word_embeddings,
        "activation": "gelu",
        "init_method_std": hf_config.initializer_range,
        "hidden_dropout": hf_config.hidden_dropout,
        "attention_dropout": hf_config.attention_dropout,
    }
    flat.update(overrides)
    return NeoXConfig.from_dict(flat)


def neox_config_to_hf(cfg: NeoXConfig | ModelConfig, base: Mapping | None = None):
    """NeoXConfig / ModelConfig -> transformers.GPTNeoXConfig.

    base: an HF config dict whose non-architecture fields (token ids, dtype, ...) are kept; the
    architecture fields always come from `cfg`.
    """
    from transformers import GPTNeoXConfig

    m = _model_cfg(cfg)
    d = dict(base or {})
    rope = dict(d.get("rope_parameters") or {})
    rope.update(rope_type="default", rope_theta=m.rotary_emb_base, partial_rotary_factor=m.rotary_pct)
    d.update(
        model_type="gpt_neox",
        vocab_size=m.vocab_size,
        hidden_size=m.hidden_size,
        num_hidden_layers=m.num_layers,
        num_attention_heads=m.num_attention_heads,
        intermediate_size=m.ffn_size,
        hidden_act="gelu",
        max_position_embeddings=m.max_position_embeddings,
        rope_parameters=rope,
        use_parallel_residual=bool(m.gpt_j_residual),
        layer_norm_eps=m.layernorm_epsilon,
        tie_word_embeddings=not m.no_weight_tying,
        attention_bias=True,
        hidden_dropout=m.hidden_dropout,
        attention_dropout=m.attention_dropout,
    )
    d.setdefault("initializer_range", m.init_method_std)
    d.setdefault("architectures", ["GPTNeoXForCausalLM"])
    for legacy in ("rotary_pct", "rotary_emb_base", "rope_scaling", "rope_theta", "partial_rotary_factor"):
        d.pop(legacy, None)
    return GPTNeoXConfig.from_dict(d)


# ------------------------------------------------------------------------------------ state dicts
def _pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    """[V, D] -> [rows, D] with zero rows appended (vocab padding)."""
    if t.shape[0] > rows:
        raise ValueError(f"vocab tensor has {t.shape[0]} rows, more than the padded vocab {rows}")
    return torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])]) if t.shape[0] < rows else t


def hf_to_neox_state_dict(hf_sd: Mapping[str, torch.Tensor], cfg: NeoXConfig | ModelConfig
                          ) -> dict[str, torch.Tensor]:
    """HF GPTNeoXForCausalLM (or GPTNeoXModel) state dict -> full neox state dict (TP = PP = 1)."""
    m = _model_cfg(cfg)
    vpad = m.padded_vocab_size(1)
    out: dict[str, torch.Tensor] = {}
    head = None
    unknown = []
    for name, t in hf_sd.items():
        key = name.removeprefix("gpt_neox.")
        if _IGNORED.search(key):
            continue
        if key == "embed_in.weight":
            out["embed.weight"] = _pad_rows(t, vpad)
        elif key in ("lm_head.weight", "embed_out.weight"):  # transformers >= 5 / older checkpoints
            head = t
        elif key.startswith("final_layer_norm."):
            out["final_norm." + key.split(".", 1)[1]] = t
        elif (mt := re.fullmatch(r"layers\.(\d+)\.(.+)\.(weight|bias)", key)) and mt.group(2) in _LAYER_MAP:
            out[f"layers.{mt.group(1)}.{_LAYER_MAP[mt.group(2)]}.{mt.group(3)}"] = t
        else:
            unknown.append(name)
    if unknown:
        raise ValueError(f"unexpected tensors in the Hugging Face GPT-NeoX state dict: {unknown[:8]}")
    if m.no_weight_tying:
        if head is None:
            raise ValueError("untied model (tie_word_embeddings=False) but the HF state dict has no "
                             "lm_head.weight")
        out["lm_head.weight"] = _pad_rows(head, vpad)
    elif head is not None and not torch.equal(head, out.get("embed.weight", head)[: len(head)]):
        raise ValueError("tie_word_embeddings=True but lm_head.weight differs from embed_in.weight")
    expected = set(neox_param_names(m))
    if set(out) != expected:
        missing, extra = sorted(expected - set(out)), sorted(set(out) - expected)
        raise ValueError(f"HF state dict does not match the config: missing {missing[:8]}, extra {extra[:8]}")
    return out


def neox_to_hf_state_dict(sd: Mapping[str, torch.Tensor], cfg: NeoXConfig | ModelConfig
                          ) -> dict[str, torch.Tensor]:
    """Full neox state dict -> HF GPTNeoXForCausalLM state dict (vocab padding removed).

    With tied embeddings `lm_head.weight` is the same tensor as `gpt_neox.embed_in.weight` (as in
    `model.state_dict()`); drop it before writing safetensors (see `save_hf_checkpoint`).
    """
    m = _model_cfg(cfg)
    v = m.vocab_size
    inverse = {n: h for h, n in _LAYER_MAP.items()}
    out: dict[str, torch.Tensor] = {}
    for name, t in sd.items():
        if name == "embed.weight":
            out["gpt_neox.embed_in.weight"] = t[:v].contiguous()
        elif name == "lm_head.weight":
            out["lm_head.weight"] = t[:v].contiguous()
        elif name.startswith("final_norm."):
            out["gpt_neox.final_layer_norm." + name.split(".", 1)[1]] = t
        elif (mt := re.fullmatch(r"layers\.(\d+)\.(.+)\.(weight|bias)", name)) and mt.group(2) in inverse:
            out[f"gpt_neox.layers.{mt.group(1)}.{inverse[mt.group(2)]}.{mt.group(3)}"] = t
        else:
            raise ValueError(f"unexpected tensor {name!r} in a neox GPT-NeoX state dict")
    if not m.no_weight_tying:
        out["lm_head.weight"] = out["gpt_neox.embed_in.weight"]
    return out


def neox_param_names(m: ModelConfig) -> list[str]:
    """Checkpoint names of a full (all stages) neox GPT-NeoX model."""
    names = ["embed.weight"]
    for i in range(m.num_layers):
        for sub in ("input_norm", "post_attention_norm", "attention.query_key_value", "attention.dense",
                    "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"):
            names += [f"layers.{i}.{sub}.weight", f"layers.{i}.{sub}.bias"]
    names += ["final_norm.weight", "final_norm.bias"]
    return names + (["lm_head.weight"] if m.no_weight_tying else [])


# ------------------------------------------------------------------------------------- HF on disk
def load_hf_state_dict(hf_dir) -> dict[str, torch.Tensor]:
    """All tensors of a Hugging Face model directory (single or sharded safetensors, or .bin)."""
    hf_dir = Path(hf_dir)
    index = hf_dir / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        sd: dict[str, torch.Tensor] = {}
        for f in files:
            sd.update(load_file(str(hf_dir / f)))
        return sd
    if (hf_dir / "model.safetensors").is_file():
        return load_file(str(hf_dir / "model.safetensors"))
    if (hf_dir / "pytorch_model.bin").is_file():
        return torch.load(hf_dir / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise ValueError(f"{hf_dir} holds no model.safetensors(.index.json) or pytorch_model.bin")


def save_hf_checkpoint(hf_dir, hf_sd: Mapping[str, torch.Tensor], hf_config,
                       max_shard_bytes: int = 5 * 2**30) -> Path:
    """Write config.json + safetensors (sharded with an index above max_shard_bytes), loadable by
    `GPTNeoXForCausalLM.from_pretrained`. A tied `lm_head.weight` is left out (HF re-ties it)."""
    hf_dir = Path(hf_dir)
    hf_dir.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in hf_sd.items()
               if not (k == "lm_head.weight" and hf_config.tie_word_embeddings)}
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, v in tensors.items():
        nbytes = v.numel() * v.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = v
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(hf_dir / "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(hf_dir / fname), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, fname))
        total = sum(v.numel() * v.element_size() for v in tensors.values())
        (hf_dir / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    hf_config.save_pretrained(hf_dir)
    return hf_dir


def load_hf_checkpoint(hf_dir) -> tuple[NeoXConfig, dict[str, torch.Tensor]]:
    """A Hugging Face GPT-NeoX directory -> (NeoXConfig, full neox state dict)."""
    from transformers import GPTNeoXConfig

    cfg = hf_config_to_neox(GPTNeoXConfig.from_pretrained(hf_dir))
    return cfg, hf_to_neox_state_dict(load_hf_state_dict(hf_dir), cfg)

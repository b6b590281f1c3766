"""RWKV-4 weights between neox, BlinkDL's RWKV-LM `.pth` and Hugging Face `RwkvForCausalLM`.

All three hold the same network under different names; only storage differs:
* neox pads the vocabulary rows of `embed` / `lm_head` (zeros; stripped on the way out) and keeps the
  token-shift mixes `time_mix_*` as [D]; BlinkDL and HF store them as [1, 1, D].
* BlinkDL (`emb`, `blocks.N.{ln0,ln1,ln2,att,ffn}`, `ln_out`, `head`) has no config: shapes give it.
* HF prefixes `rwkv.` and says `embeddings`, `pre_ln`, `attention`, `feed_forward`, `time_mix_key`...

Conversion never does arithmetic on a tensor (rename, reshape, pad/strip zero rows), so every round trip
is bit-identical and dtypes are kept (a bf16 `.pth` stays bf16 in the neox checkpoint).
HF config fields neox does not model (token ids, rescale_every, ...) ride along in a `base` dict.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from neox.config import ModelConfig, NeoXConfig

#: layer tensors under neox `layers.{i}.` and their BlinkDL (`blocks.{i}.`) / HF (`rwkv.blocks.{i}.`) names
_LAYER_NAMES = [  # (neox, blinkdl, hf)
    ("ln1.weight", "ln1.weight", "ln1.weight"), ("ln1.bias", "ln1.bias", "ln1.bias"),
    ("ln2.weight", "ln2.weight", "ln2.weight"), ("ln2.bias", "ln2.bias", "ln2.bias"),
    ("att.time_decay", "att.time_decay", "attention.time_decay"),
    ("att.time_first", "att.time_first", "attention.time_first"),
    ("att.time_mix_k", "att.time_mix_k", "attention.time_mix_key"),
    ("att.time_mix_v", "att.time_mix_v", "attention.time_mix_value"),
    ("att.time_mix_r", "att.time_mix_r", "attention.time_mix_receptance"),
    ("att.key.weight", "att.key.weight", "attention.key.weight"),
    ("att.value.weight", "att.value.weight", "attention.value.weight"),
    ("att.receptance.weight", "att.receptance.weight", "attention.receptance.weight"),
    ("att.output.weight", "att.output.weight", "attention.output.weight"),
    ("ffn.time_mix_k", "ffn.time_mix_k", "feed_forward.time_mix_key"),
    ("ffn.time_mix_r", "ffn.time_mix_r", "feed_forward.time_mix_receptance"),
    ("ffn.key.weight", "ffn.key.weight", "feed_forward.key.weight"),
    ("ffn.receptance.weight", "ffn.receptance.weight", "feed_forward.receptance.weight"),
    ("ffn.value.weight", "ffn.value.weight", "feed_forward.value.weight"),
]
_LN0 = [("ln0.weight", "ln0.weight", "pre_ln.weight"), ("ln0.bias", "ln0.bias", "pre_ln.bias")]
_TOP = [  # (neox, blinkdl, hf) outside the blocks
    ("embed.weight", "emb.weight", "rwkv.embeddings.weight"),
    ("ln_out.weight", "ln_out.weight", "rwkv.ln_out.weight"),
    ("ln_out.bias", "ln_out.bias", "rwkv.ln_out.bias"),
    ("lm_head.weight", "head.weight", "head.weight"),
]
_VOCAB = ("embed.weight", "lm_head.weight")
BLINKDL, HF = 1, 2  # column of the name tables


def _model_cfg(cfg: NeoXConfig | ModelConfig) -> ModelConfig:
    return cfg.model if hasattr(cfg, "model") else cfg


def name_map(num_layers: int, fmt: int) -> dict[str, str]:
    """neox checkpoint name -> BlinkDL (fmt=BLINKDL) or HF (fmt=HF) name, for every tensor of the model."""
    out = {row[0]: row[fmt] for row in _TOP}
    block = "blocks.{}." if fmt == BLINKDL else "rwkv.blocks.{}."
    for i in range(num_layers):
        for row in (_LN0 if i == 0 else []) + _LAYER_NAMES:
            out[f"layers.{i}.{row[0]}"] = block.format(i) + row[fmt]
    return out


def _pad_rows(t: torch.Tensor, rows: int, name: str) -> torch.Tensor:
    if t.shape[0] > rows:
        raise ValueError(f"{name} has {t.shape[0]} rows, more than the padded vocab {rows}")
    return torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])]) if t.shape[0] < rows else t


def _to_neox(src: Mapping[str, torch.Tensor], m: ModelConfig, fmt: int, what: str) -> dict[str, torch.Tensor]:
    names = name_map(m.num_layers, fmt)
    inverse = {v: k for k, v in names.items()}
    unknown = sorted(set(src) - set(inverse))
    missing = sorted(set(inverse) - set(src))
    if unknown or missing:
        raise ValueError(f"{what} state dict does not match an RWKV-4 with {m.num_layers} layers: "
                         f"missing {missing[:6]}, unexpected {unknown[:6]} (only plain RWKV-4 converts)")
    vpad = m.padded_vocab_size(1)
    out = {}
    for ext_name, t in src.items():
        name = inverse[ext_name]
        if name in _VOCAB:
            t = _pad_rows(t, vpad, ext_name)
        elif ".time_mix_" in name:
            t = t.reshape(-1)
        out[name] = t
    return out


def _from_neox(sd: Mapping[str, torch.Tensor], m: ModelConfig, fmt: int) -> dict[str, torch.Tensor]:
    names = name_map(m.num_layers, fmt)
    if set(sd) != set(names):
        missing, extra = sorted(set(names) - set(sd)), sorted(set(sd) - set(names))
        raise ValueError(f"neox RWKV state dict does not match its config: missing {missing[:6]}, extra {extra[:6]}")
    out = {}
    for name, t in sd.items():
        if name in _VOCAB:
            t = t[: m.vocab_size]
        elif ".time_mix_" in name:
            t = t.reshape(1, 1, -1)
        out[names[name]] = t.contiguous()
    return out


# --------------------------------------------------------------------------------------- BlinkDL
def blinkdl_config(sd: Mapping[str, torch.Tensor], **overrides) -> NeoXConfig:
    """The NeoXConfig of a BlinkDL RWKV-4 state dict, read from its shapes (vocab = rows of `emb`).

    overrides: further flat gpt-neox keys (seq_length, vocab_file, ...)."""
    if "emb.weight" not in sd or "blocks.0.ffn.key.weight" not in sd:
        raise ValueError("not a BlinkDL RWKV-4 state dict: no emb.weight / blocks.0.ffn.key.weight")
    layers = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k)))
    vocab, d = sd["emb.weight"].shape
    att = sd["blocks.0.att.key.weight"].shape[0]
    if att != d:
        raise ValueError(f"attention width {att} != hidden size {d}: neox RWKV-4 needs them equal")
    flat = {"model_type": "rwkv", "num_layers": layers, "hidden_size": d, "vocab_size": vocab,
            "intermediate_size": sd["blocks.0.ffn.key.weight"].shape[0], "no_weight_tying": True,
            "seq_length": 1024, "max_position_embeddings": 1024, "layernorm_epsilon": 1e-5}
    flat.update(overrides)
    return NeoXConfig.from_dict(flat)


def blinkdl_to_neox_state_dict(sd: Mapping[str, torch.Tensor], cfg: NeoXConfig | ModelConfig
                               ) -> dict[str, torch.Tensor]:
    """BlinkDL RWKV-LM RWKV-4 state dict -> full neox state dict (TP = PP = 1)."""
    return _to_neox(sd, _model_cfg(cfg), BLINKDL, "BlinkDL")


def neox_to_blinkdl_state_dict(sd: Mapping[str, torch.Tensor], cfg: NeoXConfig | ModelConfig
                               ) -> dict[str, torch.Tensor]:
    """Full neox RWKV state dict -> BlinkDL names/shapes (what `torch.save` writes as a RWKV-4 .pth)."""
    return _from_neox(sd, _model_cfg(cfg), BLINKDL)


def load_blinkdl(path) -> dict[str, torch.Tensor]:
    """A RWKV-LM `.pth` (a torch.save'd state dict), read without unpickling code."""
    return torch.load(path, map_location="cpu", weights_only=True)


# --------------------------------------------------------------------------------- Hugging Face
def hf_config_to_neox(hf_config, **overrides) -> NeoXConfig:
    """transformers.RwkvConfig (or its dict) -> NeoXConfig."""
    from transformers import RwkvConfig

    if isinstance(hf_config, Mapping):
        hf_config = RwkvConfig.from_dict(dict(hf_config))
    if hf_config.model_type != "rwkv":
        raise ValueError(f"expected a Hugging Face rwkv config, got model_type={hf_config.model_type!r}")
    if hf_config.attention_hidden_size != hf_config.hidden_size:
        raise ValueError(f"attention_hidden_size {hf_config.attention_hidden_size} != hidden_size "
                         f"{hf_config.hidden_size}: neox RWKV-4 needs them equal")
    if hf_config.tie_word_embeddings:
        raise ValueError("tie_word_embeddings=True is not supported: RWKV-4 has an untied head")
    if hf_config.layer_norm_epsilon != 1e-5:  # HF's ln_out always uses 1e-5; neox one eps for all norms
        raise ValueError(f"layer_norm_epsilon {hf_config.layer_norm_epsilon} is not supported (only 1e-5)")
    flat = {"model_type": "rwkv", "num_layers": hf_config.num_hidden_layers, "hidden_size": hf_config.hidden_size,
            "vocab_size": hf_config.vocab_size, "intermediate_size": hf_config.intermediate_size,
            "seq_length": hf_config.context_length, "max_position_embeddings": hf_config.context_length,
            "layernorm_epsilon": hf_config.layer_norm_epsilon, "no_weight_tying": True}
    flat.update(overrides)
    return NeoXConfig.from_dict(flat)


def neox_config_to_hf(cfg: NeoXConfig | ModelConfig, base: Mapping | None = None):
    """NeoXConfig / ModelConfig -> transformers.RwkvConfig; `base` keeps non-architecture fields."""
    from transformers import RwkvConfig

    m = _model_cfg(cfg)
    d = dict(base or {})
    d.update(model_type="rwkv", vocab_size=m.vocab_size, hidden_size=m.hidden_size,
             num_hidden_layers=m.num_layers, attention_hidden_size=m.hidden_size, intermediate_size=m.ffn_size,
             context_length=m.max_position_embeddings or m.seq_length or 1024,
             layer_norm_epsilon=m.layernorm_epsilon, tie_word_embeddings=False)
    d.setdefault("architectures", ["RwkvForCausalLM"])
    return RwkvConfig.from_dict(d)


def hf_to_neox_state_dict(hf_sd: Mapping[str, torch.Tensor], cfg: NeoXConfig | ModelConfig
                          ) -> dict[str, torch.Tensor]:
    """HF RwkvForCausalLM state dict -> full neox state dict (TP = PP = 1)."""
    return _to_neox(hf_sd, _model_cfg(cfg), HF, "Hugging Face RWKV")


def neox_to_hf_state_dict(sd: Mapping[str, torch.Tensor], cfg: NeoXConfig | ModelConfig
                          ) -> dict[str, torch.Tensor]:
    """Full neox RWKV state dict -> HF RwkvForCausalLM state dict (vocab padding removed)."""
    return _from_neox(sd, _model_cfg(cfg), HF)


def load_hf_checkpoint(hf_dir) -> tuple[NeoXConfig, dict[str, torch.Tensor]]:
    """A Hugging Face RWKV directory -> (NeoXConfig, full neox state dict)."""
    from transformers import RwkvConfig

    from neox.checkpoint.hf_gpt_neox import load_hf_state_dict

    cfg = hf_config_to_neox(RwkvConfig.from_pretrained(hf_dir))
    return cfg, hf_to_neox_state_dict(load_hf_state_dict(hf_dir), cfg)

"""NeoXConfig: the five concerns together, built from (and written back to) one flat dict."""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from . import compat
from .data import DataConfig
from .errors import ConfigError
from .model import ModelConfig
from .optimizer import OptimizerConfig
from .parallel import ParallelConfig
from .training import TrainingConfig

SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "parallel": ParallelConfig,
    "data": DataConfig,
    "optimizer": OptimizerConfig,
    "training": TrainingConfig,
}

# flat key -> section name; field names are unique across sections (checked at import).
FIELD_SECTION: dict[str, str] = {}
for _sec, _cls in SECTIONS.items():
    for _f in dataclasses.fields(_cls):
        assert _f.name not in FIELD_SECTION, f"duplicate config key {_f.name}"
        FIELD_SECTION[_f.name] = _sec

KNOWN_KEYS = sorted(set(FIELD_SECTION) | set(compat.ALIASES) | set(compat.HINTS) | set(compat.UNSUPPORTED)
                    | {"optimizer", "zero_optimization", "fp16", "bf16"})


def _type_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(hint: Any, value: Any, key: str, origin: str) -> Any:
    """Check/convert a YAML value to the field's annotated type (int-valued floats -> int, etc.)."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (hint,) = [a for a in args if a is not type(None)]
        args = typing.get_args(hint)

    def bad(what: str) -> ConfigError:
        return ConfigError(f"{origin}: `{key}` must be {what}, got {value!r}")

    base = typing.get_origin(hint) or hint
    if base is bool:
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if base is int:
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad("an integer")
        return value
    if base is float:
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                raise bad("a number") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad("a number")
        return float(value)
    if base is str:
        if isinstance(value, (dict, list, bool)) or value is None:
            raise bad("a string")
        return str(value)
    if base is list:
        if not isinstance(value, (list, tuple)):
            raise bad("a list")
        if not args:
            return list(value)
        return [_coerce(args[0], v, f"{key}[{i}]", origin) for i, v in enumerate(value)]
    raise AssertionError(f"unhandled annotation {hint} for {key}")


@dataclass
class NeoXConfig:
    """A whole run's configuration. `ignored` lists accepted gpt-neox keys that change nothing."""

    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    ignored: dict[str, str] = field(default_factory=dict, compare=False, repr=False)

    # ---- dict <-> config ---------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict, origin: str = "config dict") -> NeoXConfig:
        """Build from a flat gpt-neox-style dict (dashes or underscores; DeepSpeed sections allowed)."""
        flat = compat.resolve_aliases(compat.flatten_sections(normalize_keys(d, origin), origin), origin)
        return cls._from_flat(flat, dict.fromkeys(flat, origin))

    @classmethod
    def _from_flat(cls, flat: dict, origins: dict[str, str]) -> NeoXConfig:
        values: dict[str, dict[str, Any]] = {s: {} for s in SECTIONS}
        ignored: dict[str, str] = {}
        hints = {s: _type_hints(c) for s, c in SECTIONS.items()}
        for key, value in flat.items():
            origin = origins.get(key, "config")
            if key in FIELD_SECTION:
                sec = FIELD_SECTION[key]
                value = compat.canonical_value(key, value)
                values[sec][key] = _coerce(hints[sec][key], value, key, origin)
            elif key in compat.HINTS:
                ignored[key] = compat.HINTS[key]
            elif key == "attention_config" and flat.get("model_type") == "rwkv" and \
                    compat.attention_types(value) == {"rwkv"}:
                ignored[key] = "RWKV layers (model_type: rwkv)"
            elif key in compat.UNSUPPORTED:
                compat.check_unsupported(key, value, origin)
                ignored[key] = "gpt-neox feature left at its neutral value"
            else:
                close = difflib.get_close_matches(key, KNOWN_KEYS, n=1, cutoff=0.6)
                hint = f"; did you mean `{close[0]}`?" if close else "; see docs/config.md for the keys"
                raise ConfigError(f"{origin}: unknown key `{key}`{hint}")
        try:
            parts = {s: SECTIONS[s](**values[s]) for s in SECTIONS}
        except TypeError as e:  # pragma: no cover - keys are checked above
            raise ConfigError(str(e)) from None
        return cls(**parts, ignored=ignored)

    def to_dict(self) -> dict[str, Any]:
        """Flat dict of every field (underscored names); from_dict(to_dict()) == self."""
        out: dict[str, Any] = {}
        for sec in SECTIONS:
            obj = getattr(self, sec)
            for f in dataclasses.fields(obj):
                v = getattr(obj, f.name)
                out[f.name] = list(v) if isinstance(v, (list, tuple)) else v
        return out

    # ---- checks ------------------------------------------------------------------------------------
    def validate(self, world_size: int | None = None) -> NeoXConfig:
        """Raise ConfigError on the first problem; with world_size also check the DP/batch layout."""
        self.model.validate()
        self.parallel.validate(self.model, world_size)
        self.data.validate()
        self.optimizer.validate(training=self.training.train_iters is not None)
        dp = self.parallel.dp_size(world_size) if world_size is not None else None
        self.training.validate(dp)
        t, o = self.training, self.optimizer
        if t.train_iters is not None and o.warmup_iters is not None and o.warmup_iters > o.decay_iters(
                t.train_iters):
            raise ConfigError(
                f"warmup_iters ({o.warmup_iters}) exceeds the lr decay iterations "
                f"({o.decay_iters(t.train_iters)})"
            )
        if self.parallel.precision == "fp16" and self.model.model_type == "rwkv":
            raise ConfigError("RWKV's WKV recurrence overflows in fp16; use precision bf16 or fp32")
        return self


def normalize_keys(raw: dict, origin: str) -> dict:
    """Top-level keys: dashes -> underscores; two spellings of one key in one file is an error."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{origin}: a config must be a mapping of keys to values, got {type(raw).__name__}")
    out: dict[str, Any] = {}
    spelled: dict[str, str] = {}
    for k, v in raw.items():
        nk = str(k).replace("-", "_")
        if nk in out:
            raise ConfigError(f"{origin}: `{k}` and `{spelled[nk]}` are the same key; keep one")
        out[nk], spelled[nk] = v, str(k)
    return out

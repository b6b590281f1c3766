"""Field helper: every config field carries its help text in ``metadata["help"]``.

One convention keeps tools/gen_config_docs.py simple: it walks ``dataclasses.fields`` and prints
``metadata["help"]`` (and ``metadata["choices"]`` when present).
"""

from __future__ import annotations

import dataclasses
from typing import Any


def opt(default: Any, help: str, choices: tuple | None = None) -> Any:
    """A dataclass field with documentation; mutable defaults (lists, dicts) are copied per instance."""
    meta = {"help": help}
    if choices is not None:
        meta["choices"] = tuple(choices)
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def require_positive(obj: Any, *keys: str, optional: bool = False) -> None:
    """Raise ConfigError unless each named attribute is a positive int (None allowed when optional)."""
    from .errors import ConfigError

    for key in keys:
        val = getattr(obj, key)
        if val is None:
            if optional:
                continue
            raise ConfigError(f"`{key}` is required but not set")
        if isinstance(val, bool) or not isinstance(val, int) or val <= 0:
            raise ConfigError(f"`{key}` must be a positive integer, got {val!r}")


def require_choice(obj: Any, key: str) -> None:
    """Raise ConfigError unless the attribute is one of the field's metadata choices."""
    from .errors import ConfigError

    (fld,) = [f for f in dataclasses.fields(obj) if f.name == key]
    choices = fld.metadata["choices"]
    val = getattr(obj, key)
    if val not in choices:
        raise ConfigError(f"`{key}: {val}` is not supported; supported: {', '.join(map(str, choices))}")

"""Read gpt-neox config files: JSON-style YAML with comments, trailing commas, True/False, 1e-3."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from . import compat
from .errors import ConfigError
from .neox_config import NeoXConfig, normalize_keys


class _Loader(yaml.SafeLoader):
    """SafeLoader + YAML 1.2 floats (1e-3, 5E4) + an error on duplicate keys."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"""),
    list("-+0123456789."),
)


def _construct_mapping(loader: _Loader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: set = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
        seen.add(key)
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _relax(text: str) -> str:
    """Drop trailing commas before } or ] and turn tabs into spaces, outside strings and comments."""
    out: list[str] = []
    i, n = 0, len(text)
    quote = None
    while i < n:
        c = text[i]
        if quote:
            out.append(c)
            if c == "\\" and quote == '"' and i + 1 < n:
                out.append(text[i + 1])
                i += 1
            elif c == quote:
                quote = None
        elif c in "\"'" and (not out or out[-1] in " \t\n{[,:"):
            quote = c
            out.append(c)
        elif c == "#" and (not out or out[-1] in " \t\n"):
            j = text.find("\n", i)
            j = n if j < 0 else j
            out.append(text[i:j])
            i = j
            continue
        elif c == "\t":
            out.append(" ")
        elif c == ",":
            j = i + 1
            while j < n:  # look past whitespace and comments for a closing bracket
                if text[j] in " \t\r\n":
                    j += 1
                elif text[j] == "#":
                    k = text.find("\n", j)
                    j = n if k < 0 else k
                else:
                    break
            if j >= n or text[j] not in "}]":
                out.append(c)
        else:
            out.append(c)
        i += 1
    return "".join(out)


def parse_yaml(text: str, origin: str) -> Any:
    """Parse one config text the way gpt-neox configs are written."""
    try:
        return yaml.load(_relax(text), Loader=_Loader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        raise ConfigError(f"{origin}: not valid YAML/JSON: {e}") from None


def _parse_override(item: str) -> tuple[dict, str]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key=value (e.g. train_iters=100)")
    key, text = item.split("=", 1)
    key = key.strip()
    origin = f"command-line override `{item}`"
    value = parse_yaml(text, origin) if text.strip() else None
    parts = key.split(".")
    nested: Any = value
    for part in reversed(parts[1:]):
        nested = {part: nested}
    return {parts[0]: nested}, origin


def load_config(paths: list[str] | str, overrides: list[str] | None = None) -> NeoXConfig:
    """Merge config files in order (later keys win) plus `key=value` overrides; returns an unvalidated
    NeoXConfig (call .validate(world_size) once the world size is known)."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    flat: dict[str, Any] = {}
    origins: dict[str, str] = {}
    sources: list[tuple[dict, str]] = []
    for path in paths:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {path} not found")
        raw = parse_yaml(p.read_text(), str(path))
        if raw is None:
            continue
        sources.append((raw, str(path)))
    sources += [_parse_override(item) for item in overrides or []]
    for raw, origin in sources:
        part = compat.resolve_aliases(compat.flatten_sections(normalize_keys(raw, origin), origin), origin)
        flat.update(part)
        origins.update(dict.fromkeys(part, origin))
    return NeoXConfig._from_flat(flat, origins)

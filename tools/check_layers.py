"""Check the import layering of shared/DESIGN.md: imports flow one way, down the list of rooms.

Usage: python tools/check_layers.py [ROOT]     (exit 1 and one line per violation when broken)

Every ``import`` in ``megatron_ext/`` and ``neox/`` is read with ``ast`` (including imports inside
functions), and each module may only import the rooms its level allows. Third-party imports are
checked only where DESIGN.md restricts them: ``megatron_ext`` imports torch (and the stdlib) only,
``neox.config`` the stdlib and yaml only.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

# room -> rooms of ours it may import (itself is always allowed)
ALLOWED: dict[str, set[str]] = {
    "megatron_ext": set(),
    "neox.config": set(),
    "neox.ops": {"neox.config"},
    "neox.models": {"neox.config", "neox.ops", "megatron_ext"},
    "neox.data": {"neox.config"},
    "neox.inference": {"neox.config", "neox.ops", "megatron_ext", "neox.models", "neox.data",
                       "neox.checkpoint"},
    "neox.checkpoint": {"neox.config", "neox.ops", "megatron_ext", "neox.models", "neox.data",
                        "neox.inference"},
    "neox.training": {"neox.config", "neox.ops", "megatron_ext", "neox.models", "neox.data",
                      "neox.inference", "neox.checkpoint"},
    "neox.rlhf": {"neox.config", "neox.ops", "megatron_ext", "neox.models", "neox.data",
                  "neox.inference", "neox.checkpoint", "neox.training"},
    # the package root only re-exports (lazily) the public API
    "neox": {"neox.config", "neox.ops", "megatron_ext", "neox.models", "neox.data", "neox.inference",
             "neox.checkpoint", "neox.training", "neox.rlhf"},
}
OURS = ("neox", "megatron_ext", "tools", "tests", "train")
# third-party restrictions: room -> allowed top-level packages beyond the stdlib and our own rooms
THIRD_PARTY: dict[str, set[str]] = {
    "megatron_ext": {"torch", "numpy"},
    "neox.config": {"yaml"},
}


def room_of(module: str) -> str | None:
    """The room a dotted module name belongs to (longest matching prefix), or None if not ours."""
    parts = module.split(".")
    if parts[0] == "megatron_ext":
        return "megatron_ext"
    if parts[0] != "neox":
        return None
    if len(parts) > 1 and f"neox.{parts[1]}" in ALLOWED:
        return f"neox.{parts[1]}"
    return "neox"


def module_name(root: Path, path: Path) -> str:
    rel = path.relative_to(root).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imported_modules(tree: ast.AST, this_module: str, is_package: bool) -> list[tuple[int, str]]:
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import: resolve against this module's package
                base = this_module.split(".")
                if not is_package:
                    base = base[:-1]
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.append((node.lineno, mod))
    return out


def check(root: Path) -> list[str]:
    errors = []
    stdlib = set(sys.stdlib_module_names) | {"__future__"}
    for top in ("megatron_ext", "neox"):
        for path in sorted((root / top).rglob("*.py")):
            mod = module_name(root, path)
            room = room_of(mod)
            tree = ast.parse(path.read_text(), filename=str(path))
            for lineno, imp in imported_modules(tree, mod, path.name == "__init__.py"):
                head = imp.split(".")[0]
                where = f"{path.relative_to(root)}:{lineno}"
                target = room_of(imp)
                if head in OURS and target is None:
                    errors.append(f"{where}: {room} imports {imp!r}; library code never imports tools/tests/train")
                elif target is not None and target != room and target not in ALLOWED[room]:
                    errors.append(f"{where}: {room} may not import {target} ({imp!r}); see shared/DESIGN.md")
                elif target is None and room in THIRD_PARTY and head not in stdlib \
                        and head not in THIRD_PARTY[room]:
                    allowed = ", ".join(sorted(THIRD_PARTY[room]))
                    errors.append(f"{where}: {room} may import only the stdlib and {allowed}, not {imp!r}")
    return errors


def main(argv: list[str]) -> int:
    root = Path(argv[1]) if len(argv) > 1 else Path(__file__).resolve().parents[1]
    errors = check(root)
    for e in errors:
        print(e)
    if errors:
        print(f"import layering: {len(errors)} violation(s)")
        return 1
    print("import layering: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))

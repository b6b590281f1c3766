"""Lazy, cached, race-free builds of the csrc/ torch extensions.

An extension is compiled on first use (never at import, never in a layer's __init__) into
`$NEOX_EXTENSIONS_DIR/<torch version>-<hash of sources and flags>` (default root
`~/.cache/neox/extensions`), so it builds once per machine or CI run and a source edit gets a fresh
directory. torch's `cpp_extension.load` holds a file lock (FileBaton) in that directory, so ranks that
start together wait for one compiler instead of racing; forked ranks should call the op's
`prebuild()` in the parent first. Any failure is raised as `ExtensionBuildError` with the reason, so the
caller can fall back to pure torch and say why.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import threading
from pathlib import Path

import torch

CSRC = Path(__file__).resolve().parents[2] / "csrc"

_lock = threading.Lock()
_loaded: dict[str, object] = {}


class ExtensionBuildError(RuntimeError):
    """The extension could not be built or loaded here (no compiler, no ninja, compile error...)."""


def extensions_root() -> Path:
    root = os.environ.get("NEOX_EXTENSIONS_DIR")
    return Path(root) if root else Path.home() / ".cache" / "neox" / "extensions"


def _ensure_ninja() -> None:
    """torch's JIT builds need `ninja` on PATH; the pip package ships one inside the venv."""
    if shutil.which("ninja"):
        return
    try:
        import ninja  # type: ignore[import-not-found]
    except ImportError as e:
        raise ExtensionBuildError("the `ninja` build tool is not installed (pip install ninja)") from e
    os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")


def build_dir(name: str, sources: list[Path], flags: list[str]) -> Path:
    """`<root>/<torch version>-<hash>`: one directory per (sources, flags, torch, python)."""
    h = hashlib.sha256()
    for part in (name, torch.__version__, sys.version, *flags):
        h.update(part.encode() + b"\0")
    for src in sorted(sources):
        h.update(src.name.encode() + b"\0" + src.read_bytes())
    for header in sorted({p for src in sources for p in src.parent.glob("*.h")}):
        h.update(header.name.encode() + b"\0" + header.read_bytes())
    return extensions_root() / f"{torch.__version__}-{h.hexdigest()[:16]}"


def load_extension(name: str, sources: list[Path], *, cflags: list[str] = (), cuda_cflags: list[str] = (),
                   ldflags: list[str] = (), with_cuda: bool = False, verbose: bool = False):
    """Compile (once) and import a torch extension; raises ExtensionBuildError on any failure."""
    flags = [*cflags, "|", *cuda_cflags, "|", *ldflags, f"cuda={with_cuda}"]
    with _lock:
        key = f"{name}:{with_cuda}"
        if key in _loaded:
            return _loaded[key]
        try:
            _ensure_ninja()
            from torch.utils import cpp_extension

            if shutil.which(os.environ.get("CXX", "c++")) is None:
                raise ExtensionBuildError("no C++ compiler found (set CXX or install g++)")
            if with_cuda and cpp_extension.CUDA_HOME is None:
                raise ExtensionBuildError("CUDA_HOME is not set and nvcc was not found")
            directory = build_dir(name, sources, flags)
            directory.mkdir(parents=True, exist_ok=True)
            if not any(directory.glob(f"{name}*.so")):
                print(f"neox: compiling the {name} extension (first use of this source on this machine, ~30-60 s; "
                      f"cached in {directory})", file=sys.stderr, flush=True)
            module = cpp_extension.load(
                name=name, sources=[str(s) for s in sources], build_directory=str(directory),
                extra_cflags=list(cflags), extra_cuda_cflags=list(cuda_cflags), extra_ldflags=list(ldflags),
                with_cuda=with_cuda, verbose=verbose)
        except ExtensionBuildError:
            raise
        except Exception as e:  # compiler errors arrive as RuntimeError/CalledProcessError/OSError
            raise ExtensionBuildError(f"building {name} failed: {type(e).__name__}: {str(e)[-2000:]}") from e
        _loaded[key] = module
        return module

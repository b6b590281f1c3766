"""The import-layering check passes on the tree and catches each kind of violation."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("check_layers", ROOT / "tools" / "check_layers.py")
check_layers = importlib.util.module_from_spec(spec)
spec.loader.exec_module(check_layers)


def test_tree_is_layered():
    assert check_layers.check(ROOT) == []


def _fake_tree(tmp_path: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    (tmp_path / "megatron_ext").mkdir(exist_ok=True)
    return tmp_path


def test_catches_violations(tmp_path):
    root = _fake_tree(tmp_path, {
        "neox/__init__.py": "",
        "neox/config/__init__.py": "import torch\n",
        "neox/data/ds.py": "from neox.models import gpt_neox\n",
        "neox/training/loop.py": "def f():\n    from neox.rlhf import ppo\n",
        "neox/models/m.py": "from ..training import loop\nfrom . import other\n",
        "megatron_ext/x.py": "import neox\nimport transformers\n",
        "neox/ops/a.py": "import tools.plan\n",
    })
    errors = "\n".join(check_layers.check(root))
    assert "neox.config may import only the stdlib and yaml, not 'torch'" in errors
    assert "neox.data may not import neox.models" in errors
    assert "neox.training may not import neox.rlhf" in errors
    assert "neox.models may not import neox.training" in errors  # relative import resolved
    assert "megatron_ext may not import neox" in errors
    assert "megatron_ext may import only the stdlib and numpy, torch, not 'transformers'" in errors
    assert "library code never imports tools/tests/train" in errors
    assert "neox.models may not import neox.models" not in errors
    assert check_layers.main(["x", str(root)]) == 1


def test_cli_ok_on_repo(capsys):
    assert check_layers.main(["x", str(ROOT)]) == 0
    assert "ok" in capsys.readouterr().out

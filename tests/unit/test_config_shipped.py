"""Every shipped config loads and validates; the 20B and Pythia configs carry the published settings."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from neox.config import load_config

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = sorted(p for p in (ROOT / "configs").rglob("*.yml"))

# Published Pythia shapes (EleutherAI/pythia README and the HF model cards): layers, width, heads, lr.
PYTHIA = {
    "14M": (6, 128, 4, 1.0e-3), "31M": (6, 256, 8, 1.0e-3), "70M": (6, 512, 8, 1.0e-3),
    "160M": (12, 768, 12, 6.0e-4), "410M": (24, 1024, 16, 3.0e-4), "1B": (16, 2048, 8, 2.5e-4),
    "1.4B": (24, 2048, 16, 2.0e-4), "2.8B": (32, 2560, 32, 1.6e-4), "6.9B": (32, 4096, 32, 1.2e-4),
    "12B": (36, 5120, 40, 1.2e-4),
}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(ROOT)))
def test_shipped_config_loads_and_validates(path):
    cfg = load_config([str(path)])
    world = cfg.parallel.tp_size * cfg.parallel.pp_size
    cfg.validate(world_size=world)
    cfg.validate(world_size=world * 4)


def test_20b_settings():
    cfg = load_config([str(ROOT / "configs/20B.yml")]).validate(world_size=96)
    m, p, o, t, d = cfg.model, cfg.parallel, cfg.optimizer, cfg.training, cfg.data
    assert (m.num_layers, m.hidden_size, m.num_attention_heads) == (44, 6144, 64)
    assert (m.seq_length, m.max_position_embeddings, m.rotary_pct) == (2048, 2048, 0.25)
    assert m.gpt_j_residual and m.no_weight_tying
    assert (m.init_method, m.output_layer_init_method) == ("small_init", "wang_init")
    assert m.vocab_size == 50277 and m.padded_vocab_size(p.tp_size) == 50432
    assert (p.pp_size, p.tp_size, p.zero_stage, p.precision) == (4, 2, 1, "fp16")
    assert (p.loss_scale, p.loss_scale_window, p.initial_scale_power, p.hysteresis, p.min_loss_scale) == (
        0, 1000, 12, 2, 1)
    assert p.checkpoint_activations
    assert o.optimizer_type == "Adam" and o.lr == 0.97e-4 and o.betas == [0.9, 0.95] and o.eps == 1e-8
    assert o.lr_decay_style == "cosine" and o.min_lr == 0.97e-5 and o.warmup == 0.01
    assert (t.train_iters, o.lr_decay_iters) == (150000, 150000)
    assert (t.train_micro_batch_size_per_gpu, t.gradient_accumulation_steps) == (4, 32)
    assert t.global_batch(p.dp_size(96)) == 1536
    assert d.tokenizer_type == "HFTokenizer" and d.vocab_file.endswith("20B_tokenizer.json")


@pytest.mark.parametrize("name", PYTHIA)
def test_pythia_shapes(name):
    cfg = load_config([str(ROOT / f"configs/pythia/{name}.yml")]).validate()
    m = cfg.model
    layers, width, heads, lr = PYTHIA[name]
    assert (m.num_layers, m.hidden_size, m.num_attention_heads) == (layers, width, heads)
    assert cfg.optimizer.lr == lr
    assert (m.seq_length, m.rotary_pct, m.gpt_j_residual, m.no_weight_tying) == (2048, 0.25, True, True)
    assert m.vocab_size == 50277 and cfg.optimizer.min_lr == pytest.approx(lr / 10)
    assert cfg.training.train_iters == 143000 and cfg.optimizer.lr_decay_style == "cosine"


def test_tiny_default():
    cfg = load_config([str(ROOT / "configs/tiny/neox.yml")]).validate(world_size=1)
    assert cfg.parallel.precision == "fp32" and cfg.optimizer.optimizer_type == "AdamW"
    assert cfg.data.vocab_file == "cache/default/tokenizer.json"
    assert cfg.data.data_path == "cache/default/corpus_text_document"
    assert cfg.training.save == "runs/tiny-neox" and cfg.training.train_iters == 600


def test_config_docs_are_current():
    """docs/config.md is generated; a field added without regenerating it fails here."""
    r = subprocess.run([sys.executable, str(ROOT / "tools/gen_config_docs.py"), "--check"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr

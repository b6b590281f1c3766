"""neox.config: reading gpt-neox-style YAML, merging, overrides, round trips, one clear error each."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import textwrap

import pytest
import yaml

from neox.config import ConfigError, NeoXConfig, load_config, parse_yaml

# Written in gpt-neox's style: JSON-like YAML, comments (also after a value and inside a section),
# trailing commas, a tab, True/False, dashes and underscores mixed, nested DeepSpeed sections.
GPT_NEOX_STYLE = """\
# a small model in gpt-neox's config style
{
  # parallelism settings
  "pipe-parallel-size": 2,
  "model-parallel-size": 2,

  # model settings
  "num-layers": 4,
  "hidden-size": 128,
  "num-attention-heads": 8,
  "seq-length": 512,
  "max-position-embeddings": 1024,
  "norm": "layernorm",
  "pos-emb": "rotary",
  "rotary_pct": 0.25,
  "no-weight-tying": true,
  "gpt_j_residual": True,
  "output_layer_parallelism": "column",
  "attention-config": [[["flash"], 4]],
  "scaled-upper-triang-masked-softmax-fusion": true,
  "bias-gelu-fusion": true,
  "vocab_size": 50277,

  "optimizer": {
    "type": "Adam",
    "params": {
      "lr": 0.97e-4,
      "betas": [0.9, 0.95],
      "eps": 1.0e-8,
      }
      },
  "min_lr": 0.97e-5,

  "zero_optimization": {
  "stage": 1,
  "allgather_partitions": True,
  "allgather_bucket_size": 1260000000,
  "overlap_comm": True,
  "reduce_scatter": True,
  "reduce_bucket_size": 1260000000,
  "contiguous_gradients": True,
  },

  "train_micro_batch_size_per_gpu": 4,
  "gradient_accumulation_steps": 32,
  "data-impl": "mmap",
  "split": "995,4,1",

  "checkpoint-activations": true,
  "checkpoint-num-layers": 1,
  "partition-activations": false, #true,
  "synchronize-each-layer": true,

  "gradient_clipping": 1.0,
  "weight-decay": 0.01,
  "hidden-dropout": 0,
  "attention-dropout": 0,

  "fp16": {
    "fp16": true,
    "enabled": true,
    "loss_scale": 0,
    "loss_scale_window": 1000,
    "initial_scale_power": 12,
    "hysteresis": 2,
    "min_loss_scale": 1
    },

  "train-iters": 150000,
  "lr-decay-iters": 150000,
  "distributed-backend": "nccl",
  "lr-decay-style": "cosine",
  "warmup": 0.01,
  "save-interval": 500,
  "eval-interval": 1000,
  "eval-iters": 10,
  "log-interval": 2,
  "steps_per_print": 2,
  "wall_clock_breakdown": false,
\t"tokenizer_type": "HFTokenizer",
  "vocab-file": "./20B_checkpoints/20B_tokenizer.json",
  "tensorboard-dir": "./tensorboard",
  "log-dir": "./logs",
}
"""


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return str(p)


def test_gpt_neox_style_file_reads_every_setting(tmp_path):
    cfg = load_config([write(tmp_path, "neox.yml", GPT_NEOX_STYLE)]).validate(world_size=8)
    m, p, o, t, d = cfg.model, cfg.parallel, cfg.optimizer, cfg.training, cfg.data
    assert (m.num_layers, m.hidden_size, m.num_attention_heads, m.seq_length) == (4, 128, 8, 512)
    assert m.max_position_embeddings == 1024 and m.rotary_pct == 0.25
    assert m.no_weight_tying is True and m.gpt_j_residual is True
    assert (p.pp_size, p.tp_size, p.zero_stage, p.zero_reduce_bucket_size) == (2, 2, 1, 1260000000)
    assert p.checkpoint_activations and p.checkpoint_num_layers == 1
    assert p.precision == "fp16" and p.initial_scale_power == 12 and p.loss_scale == 0
    assert o.optimizer_type == "Adam" and o.lr == pytest.approx(0.97e-4) and o.betas == [0.9, 0.95]
    assert o.eps == 1e-8 and o.min_lr == pytest.approx(0.97e-5) and o.weight_decay == 0.01
    assert o.lr_decay_style == "cosine" and o.lr_decay_iters == 150000 and o.clip_grad == 1.0
    assert t.train_iters == 150000 and t.checkpoint_factor == 500 and t.eval_iters == 10
    assert t.tensorboard_dir == "./tensorboard" and t.log_dir == "./logs"
    assert d.split == "995,4,1" and d.vocab_file.endswith("20B_tokenizer.json")
    # accepted speed/logging hints are recorded, not silently dropped
    assert "bias_gelu_fusion" in cfg.ignored and "steps_per_print" in cfg.ignored
    assert "attention_config" in cfg.ignored


def test_parser_matches_json_on_the_same_data(tmp_path):
    """Trailing commas, comments and tabs are tolerated; the data equals what json reads from a clean copy."""
    import json

    text = '{\n  "a": 1, # one\n\t"b": [1, 2,], "c": {"d": True, "e": "x,}",},\n  "f": 1e-3,\n}\n'
    clean = '{"a": 1, "b": [1, 2], "c": {"d": true, "e": "x,}"}, "f": 1e-3}'
    assert parse_yaml(text, "t") == json.loads(clean)
    assert parse_yaml("lr: 1e-3\nn: 5E2\n", "t") == {"lr": 0.001, "n": 500.0}


def test_later_files_and_overrides_win(tmp_path):
    a = write(tmp_path, "a.yml", GPT_NEOX_STYLE)
    b = write(tmp_path, "b.yml", """\
        # override only lr inside the optimizer section, switch to bf16, shrink the layout
        optimizer: {params: {lr: 3.0e-4}}
        bf16: {enabled: true}
        fp16: {enabled: false}
        pipe_parallel_size: 1
        model-parallel-size: 1
        """)
    cfg = load_config([a, b], ["train_iters=10", "optimizer.params.betas=[0.8, 0.9]", "seed=7",
                               "data_path=null", "save=runs/x"])
    assert cfg.optimizer.lr == 3e-4 and cfg.optimizer.optimizer_type == "Adam"  # type kept from a.yml
    assert cfg.optimizer.betas == [0.8, 0.9] and cfg.optimizer.eps == 1e-8
    assert cfg.parallel.precision == "bf16" and cfg.parallel.pp_size == 1 and cfg.parallel.tp_size == 1
    assert cfg.training.train_iters == 10 and cfg.training.seed == 7 and cfg.training.save == "runs/x"
    assert cfg.model.num_layers == 4  # untouched keys come from a.yml
    cfg.validate(world_size=3)


def test_round_trip_is_exact(tmp_path):
    cfg = load_config([write(tmp_path, "neox.yml", GPT_NEOX_STYLE)])
    flat = cfg.to_dict()
    assert all("-" not in k for k in flat) and all(not isinstance(v, dict) for v in flat.values())
    again = NeoXConfig.from_dict(flat)
    assert again == cfg and again.to_dict() == flat
    # through YAML text as well (what a checkpoint manifest or a saved config would hold)
    assert NeoXConfig.from_dict(yaml.safe_load(yaml.safe_dump(flat))) == cfg
    # every field is present, so the dict names every setting
    n_fields = sum(len(dataclasses.fields(getattr(cfg, s)))
                   for s in ("model", "parallel", "data", "optimizer", "training"))
    assert len(flat) == n_fields


def test_from_dict_accepts_dashes_and_sections():
    cfg = NeoXConfig.from_dict({"num-layers": 2, "hidden_size": 64, "num-attention-heads": 4,
                                "seq_length": 16, "optimizer": {"type": "sgd", "params": {"lr": 0.1}},
                                "precision": "bfloat16"})
    assert cfg.model.num_layers == 2 and cfg.optimizer.optimizer_type == "SGD"
    assert cfg.parallel.precision == "bf16"


def test_does_not_import_torch():
    code = "import sys, neox.config; assert 'torch' not in sys.modules, 'neox.config imported torch'"
    subprocess.run([sys.executable, "-c", code], check=True)


# ---- one clear message per problem ------------------------------------------------------------------

BASE = """\
num_layers: 4
hidden_size: 128
num_attention_heads: 8
seq_length: 128
vocab_size: 1000
"""


def err(tmp_path, extra="", overrides=None, world_size=None, match=None, same_file=False):
    """The ConfigError for BASE merged with `extra` (a second file, or appended to the first)."""
    paths = [write(tmp_path, "c.yml", BASE + (textwrap.dedent(extra) if same_file else ""))]
    if not same_file:
        paths.append(write(tmp_path, "extra.yml", extra or "{}"))
    with pytest.raises(ConfigError, match=match) as e:
        load_config(paths, overrides).validate(world_size)
    return str(e.value)


def test_unknown_key_names_file_key_and_suggestion(tmp_path):
    msg = err(tmp_path, "num_layrs: 3\n")
    assert "extra.yml" in msg and "num_layrs" in msg and "did you mean `num_layers`" in msg
    msg = err(tmp_path, overrides=["hiden-size=3"])
    assert "command-line override" in msg and "hidden_size" in msg


def test_unknown_nested_keys(tmp_path):
    assert "optimizer.params.lrr" in err(tmp_path, "optimizer: {type: Adam, params: {lrr: 1}}\n")
    assert "fp16.loss_scal" in err(tmp_path, "fp16: {enabled: true, loss_scal: 0}\n")
    assert "zero_optimization.stagee" in err(tmp_path, "zero_optimization: {stagee: 1}\n")


@pytest.mark.parametrize("extra, words", [
    ("moe_num_experts: 8\n", ["moe_num_experts", "dense"]),
    ('attention_config: [[["local", "global"], 4]]\n', ["attention_config", "global", "flash"]),
    ("pos_emb: alibi\n", ["pos_emb", "rotary"]),
    ("pos_emb: learned\n", ["pos_emb", "rotary"]),
    ("norm: rmsnorm\n", ["norm", "layernorm"]),
    ("norm: scalenorm\n", ["norm", "layernorm"]),
    ("activation: swiglu\n", ["activation", "gelu"]),
    ("gpt_j_tied: true\n", ["gpt_j_tied"]),
    ("use_mup: true\n", ["muP"]),
    ("curriculum_learning: {enabled: true, curriculum_type: seqlen}\n", ["curriculum"]),
    ("num_kv_heads: 2\n", ["num_kv_heads"]),
    ("zero_optimization: {stage: 4}\n", ["zero_stage", "0, 1, 2, 3"]),
    ("zero_optimization: {stage: 3}\nmodel_parallel_size: 2\n", ["zero_stage 3", "model_parallel_size 1"]),
    ("zero_optimization: {stage: 1, cpu_offload: true}\n", ["cpu_offload"]),
    ("optimizer: {type: OneBitAdam, params: {lr: 1}}\n", ["OneBitAdam", "Adam, AdamW, SGD, Lion"]),
    ("lr_decay_style: exponential\n", ["exponential", "cosine"]),
    ("train_impl: dpo\n", ["RLHF"]),
])
def test_unsupported_features_are_named(tmp_path, extra, words):
    msg = err(tmp_path, extra)
    for w in words:
        assert w in msg, msg


def test_neutral_values_of_unsupported_features_are_accepted(tmp_path):
    path = write(tmp_path, "c.yml", BASE + "moe_num_experts: 1\ngpt_j_tied: false\nuse_mup: false\n"
                 "attention_config: [[[global], 2], [[flash], 2]]\ncurriculum_learning: {enabled: false}\n")
    load_config([path]).validate()


@pytest.mark.parametrize("extra, world, words", [
    ("hidden_size: 100\n", None, ["hidden_size", "num_attention_heads"]),
    ("model_parallel_size: 2\nintermediate_size: 129\n", None, ["MLP width"]),
    ("model_parallel_size: 16\n", None, ["num_attention_heads", "model_parallel_size"]),
    ("pipe_parallel_size: 3\n", None, ["num_layers", "uniform"]),
    ("pipe_parallel_size: 2\nnum_virtual_pipeline_stages: 4\n", None, ["num_virtual_pipeline_stages"]),
    ("rotary_pct: 0\n", None, ["rotary_pct"]),
    ("rotary_pct: 1.5\n", None, ["rotary_pct"]),
    ("max_position_embeddings: 64\n", None, ["seq_length", "max_position_embeddings"]),
    ("fp16: {enabled: true}\nbf16: {enabled: true}\n", None, ["fp16", "bf16"]),
    ("precision: fp16\nbf16: {enabled: true}\n", None, ["precision"]),
    ("num_layers: 0\n", None, ["num_layers", "positive"]),
    ("train_micro_batch_size_per_gpu: -1\n", None, ["train_micro_batch_size_per_gpu"]),
    ("train_batch_size: 64\ntrain_micro_batch_size_per_gpu: 4\n", 4,
     ["train_batch_size", "gradient_accumulation_steps to 4"]),
    ("model_parallel_size: 2\n", 3, ["world size 3", "2"]),
    ("split: '1,2,x'\n", None, ["split"]),
    ("data_path: a\ntrain_data_paths: [b]\n", None, ["data_path"]),
    ("train_data_paths: [a, b]\ntrain_data_weights: [1.0]\n", None, ["weights"]),
    ("warmup: 100\n", None, ["warmup_iters"]),
    ("train_iters: 10\n", None, ["lr"]),
    ("num_layers: 2.5\n", None, ["integer"]),
    ("no_weight_tying: 'yes'\n", None, ["true or false"]),
    ("gradient_clipping: 1.0\nclip_grad: 2.0\n", None, ["gradient_clipping", "clip_grad"]),
])
def test_inconsistent_values(tmp_path, extra, world, words):
    msg = err(tmp_path, extra, world_size=world)
    for w in words:
        assert w in msg, msg


def test_duplicate_key_in_one_file(tmp_path):
    err(tmp_path, "seq_length: 64\n", match="duplicate key", same_file=True)
    msg = err(tmp_path, "num-layers: 4\n", same_file=True)
    assert "num-layers" in msg and "num_layers" in msg and "same key" in msg


def test_batch_consistency_with_world_size(tmp_path):
    path = write(tmp_path, "c.yml", BASE + "train_batch_size: 64\ntrain_micro_batch_size_per_gpu: 4\n"
                 "gradient_accumulation_steps: 4\nmodel_parallel_size: 2\n")
    load_config([path]).validate(world_size=8)  # dp 4: 4 * 4 * 4 = 64
    with pytest.raises(ConfigError, match="train_batch_size"):
        load_config([path]).validate(world_size=16)


def test_parameters_partition_allows_uneven_layers(tmp_path):
    path = write(tmp_path, "c.yml", BASE + "pipe_parallel_size: 3\npipe_partition_method: parameters\n")
    load_config([path]).validate()
    # gpt-neox's default spelling means uniform
    cfg = NeoXConfig.from_dict({"pipe_partition_method": "type:transformer|mlp"})
    assert cfg.parallel.pipe_partition_method == "uniform"


def test_schedule_helpers_follow_gpt_neox():
    o = NeoXConfig.from_dict({"lr": 1.0, "warmup": 0.01, "lr_decay_iters": 1000}).optimizer
    assert o.decay_iters(5000) == 1000 and o.warmup_steps(5000) == 10
    o = NeoXConfig.from_dict({"lr": 1.0, "lr_decay_fraction": 0.5, "warmup_iters": 7}).optimizer
    assert o.decay_iters(300) == 150 and o.warmup_steps(300) == 7


def test_padded_vocab():
    m = NeoXConfig.from_dict({"vocab_size": 50277}).model
    assert m.padded_vocab_size(1) == 50304 and m.padded_vocab_size(2) == 50432
    assert m.padded_vocab_size(4) == 50688  # Pythia-12B's embedding rows at TP 4

"""Assemble a pretraining run from a config: tokenizer, data, model, optimizer, schedule, loop."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from neox.config import ConfigError, NeoXConfig
from neox.training.engine import Engine
from neox.training.loop import LoopSettings, run
from neox.training.optim import LRSchedule
from neox.training.pretrain import PretrainStage
from neox.training.progress import ProgressLogger, format_count
from neox.training.sinks import build_sinks


def resolve_vocab(cfg: NeoXConfig):
    """Build the tokenizer and make ``cfg.model.vocab_size`` agree with it (set it when unset)."""
    from neox.data.tokenizers import build_tokenizer

    tok = build_tokenizer(cfg.data.tokenizer_type, cfg.data.vocab_file, cfg.data.merge_file)
    if cfg.model.vocab_size is None:
        cfg.model.vocab_size = tok.vocab_size
    elif cfg.model.vocab_size < tok.vocab_size:
        raise ConfigError(
            f"vocab_size {cfg.model.vocab_size} is smaller than the tokenizer's vocabulary "
            f"({tok.vocab_size}, {cfg.data.vocab_file}); remove vocab_size or set it >= {tok.vocab_size}"
        )
    return tok


def describe_run(cfg: NeoXConfig, ps, n_params: int) -> str:
    m, t = cfg.model, cfg.training
    lines = [
        f"model: {m.model_type}, {m.num_layers} layers, hidden {m.hidden_size}, {m.num_attention_heads} heads, "
        f"seq {m.seq_length}, vocab {m.vocab_size} (padded {m.padded_vocab_size(ps.tp_size)})",
        f"parameters: {n_params:,} ({format_count(n_params)}) on this rank",
        f"layout: world {ps.world_size} = TP {ps.tp_size} x PP {ps.pp_size} x DP {ps.dp_size}",
        f"batch: micro {t.train_micro_batch_size_per_gpu} x accum {t.gradient_accumulation_steps} x DP "
        f"{ps.dp_size} = {t.global_batch(ps.dp_size)} sequences "
        f"({t.global_batch(ps.dp_size) * m.seq_length:,} tokens) per step, {t.train_iters} steps",
    ]
    return "\n".join(lines)


def build_pretraining(cfg: NeoXConfig, ps, logger: ProgressLogger, tokenizer=None) -> PretrainStage:
    from neox.data.gpt_dataset import build_datasets_from_config, make_batch_iterator

    t, o = cfg.training, cfg.optimizer
    tok = tokenizer if tokenizer is not None else resolve_vocab(cfg)
    cfg.validate(world_size=ps.world_size)
    torch.manual_seed(t.seed)
    engine = Engine(cfg, ps, init_seed=t.seed)
    n_params = sum(p.numel() for p in engine.chunks.parameters())
    logger.print(describe_run(cfg, ps, n_params))

    global_batch = t.global_batch(ps.dp_size)
    eval_runs = t.train_iters // t.eval_interval + 1 if t.eval_interval else 1
    mb = t.train_micro_batch_size_per_gpu
    num_samples = (t.train_iters * global_batch, eval_runs * t.eval_iters * mb * ps.dp_size, 0)
    train_ds, valid_ds, _ = build_datasets_from_config(cfg, tok, num_samples)

    def train_batches(start_sample: int):
        return make_batch_iterator(train_ds, mb, start_sample=start_sample, dp_rank=ps.dp_rank, dp_size=ps.dp_size)

    valid_batches = None
    if valid_ds is not None and len(valid_ds) > 0:
        def valid_batches():
            return make_batch_iterator(valid_ds, mb, start_sample=0, dp_rank=ps.dp_rank, dp_size=ps.dp_size)

    schedule = LRSchedule(lr=o.lr, min_lr=o.min_lr, decay_style=o.lr_decay_style,
                          decay_iters=o.decay_iters(t.train_iters), warmup=o.warmup_steps(t.train_iters))
    return PretrainStage(cfg, engine, schedule, train_batches=train_batches, valid_batches=valid_batches,
                         eval_iters=t.eval_iters)


def copy_tokenizer(cfg: NeoXConfig, run_dir: Path) -> None:
    """Keep the tokenizer next to the checkpoints, so a run directory is self-contained."""
    for f in (cfg.data.vocab_file, cfg.data.merge_file):
        if f and Path(f).is_file():
            run_dir.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(f, run_dir / Path(f).name)


def config_lines(cfg: NeoXConfig) -> str:
    """The resolved config, keys that differ from the defaults (the full one is in every manifest)."""
    defaults = NeoXConfig().to_dict()
    changed = {k: v for k, v in cfg.to_dict().items() if defaults.get(k, object()) != v}
    return "config: " + ", ".join(f"{k}={v}" for k, v in sorted(changed.items()))


def pretrain(cfg: NeoXConfig, ps) -> dict:
    """Run pretraining as the config says; returns the loop's summary."""
    from neox.config.plan import flops_per_token

    t, m = cfg.training, cfg.model
    main = ps.rank == 0
    tok = resolve_vocab(cfg)  # the vocab size is needed for the FLOPs count below
    flops = flops_per_token(m, ps.tp_size, cfg.parallel.checkpoint_activations)["model"]
    logger = ProgressLogger(t.train_iters, log_dir=t.log_dir or t.save, enabled=main,
                            sinks=build_sinks(cfg, main), flops_per_token=flops, num_devices=ps.world_size,
                            peak_flops=t.peak_flops)
    logger.print(config_lines(cfg))
    stage = build_pretraining(cfg, ps, logger, tokenizer=tok)
    start = 0
    if t.load:
        load_path = Path(t.load)
        if load_path.exists() and any(load_path.iterdir()):
            start = stage.load(load_path, t.load_iteration, load_optim=not (t.no_load_optim or t.finetune),
                               load_rng=not t.no_load_rng, finetune=t.finetune)
            logger.print(f"{'fine-tuning from' if t.finetune else 'resumed from'} {load_path} at step {start}")
        elif t.load != t.save:
            raise ConfigError(f"load: {load_path} does not exist or is empty; fix the path or remove `load`")
    stage.save_optim, stage.save_rng = not t.no_save_optim, not t.no_save_rng
    if t.save and main:
        copy_tokenizer(cfg, Path(t.save))
    settings = LoopSettings(
        train_iters=t.train_iters, log_interval=t.log_interval, eval_interval=t.eval_interval,
        save_dir=t.save, checkpoint_factor=t.checkpoint_factor or 0,
        extra_save_iters=list(t.extra_save_iters or []), exit_interval=t.exit_interval or 0,
        keep_last_n_checkpoints=t.keep_last_n_checkpoints or 0, max_nonfinite_losses=t.max_nonfinite_losses,
        is_main=main,
    )
    return run(stage, settings, logger, start_step=start)


__all__ = ["pretrain", "build_pretraining", "resolve_vocab"]

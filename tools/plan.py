#!/usr/bin/env python
"""Size a run before launching it: exact parameter count, parameters per GPU, training FLOPs per token.

    python tools/plan.py -c configs/20B.yml
    python tools/plan.py -c configs/pythia/70M.yml --json
    python tools/plan.py -c configs/20B.yml model_parallel_size=4 --world-size 96

The arithmetic lives in neox/config/plan.py (no torch); FLOPs follow Megatron's formula, documented
there: model FLOPs = 3 x forward matmul FLOPs; activation checkpointing adds one more forward of the
layers to the hardware FLOPs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from neox.config import (  # noqa: E402
    ConfigError,
    NeoXConfig,
    count_parameters,
    flops_per_token,
    load_config,
    stage_layer_counts,
    stage_parameters,
)

FLOPS_FORMULA = (
    "forward = 2*(L*(4*D^2 + 2*D*F) + Vpad*D) + 4*L*s*D per token; model = 3*forward "
    "(= 72*L*D^2*(1 + s/(6D) + Vpad/(12*L*D)) when F = 4D); hardware = model + L-layer forward "
    "when checkpoint_activations"
)


def _vocab_from_tokenizer(cfg: NeoXConfig) -> int | None:
    """vocab_size from the config's tokenizer file when the config does not give one."""
    path = cfg.data.vocab_file
    if not path or not Path(path).is_file() or cfg.data.tokenizer_type != "HFTokenizer":
        return None
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(path)).get_vocab_size()


def plan(cfg: NeoXConfig, world_size: int | None = None) -> dict:
    """Everything tools/plan.py prints, as a dict."""
    m, p = cfg.model, cfg.parallel
    if m.vocab_size is None:
        m.vocab_size = _vocab_from_tokenizer(cfg)
        if m.vocab_size is None:
            raise ConfigError("vocab_size is not set and no HF tokenizer file is at hand: set `vocab_size`")
    tp, pp = p.tp_size, p.pp_size
    per_stage = stage_parameters(m, tp, pp, p.pipe_partition_method)
    flops = flops_per_token(m, tp, p.checkpoint_activations)
    out = {
        "config": {"model_type": m.model_type, "num_layers": m.num_layers, "hidden_size": m.hidden_size,
                   "num_attention_heads": m.num_attention_heads, "ffn_size": m.ffn_size,
                   "seq_length": m.seq_length, "vocab_size": m.vocab_size},
        "padded_vocab_size": m.padded_vocab_size(tp),
        "parameters": count_parameters(m, tp),
        "tp": tp,
        "pp": pp,
        "pipe_partition_method": p.pipe_partition_method,
        "layers_per_stage": stage_layer_counts(m, pp, p.pipe_partition_method, tp),
        "parameters_per_gpu": {"per_stage": per_stage, "first": per_stage[0], "last": per_stage[-1],
                               "middle": max(per_stage[1:-1]) if pp > 2 else None, "max": max(per_stage)},
        "checkpoint_activations": p.checkpoint_activations,
        "flops_per_token": flops,
        "flops_formula": FLOPS_FORMULA,
    }
    if world_size is not None:
        dp = p.dp_size(world_size)
        batch = cfg.training.global_batch(dp)
        out.update(world_size=world_size, dp=dp, global_batch=batch, tokens_per_step=batch * m.seq_length,
                   model_flops_per_step=flops["model"] * batch * m.seq_length)
    return out


def _fmt(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def render(info: dict) -> str:
    c = info["config"]
    ppg = info["parameters_per_gpu"]
    lines = [
        f"model: {c['model_type']}, {c['num_layers']} layers, hidden {c['hidden_size']}, "
        f"{c['num_attention_heads']} heads, ffn {c['ffn_size']}, seq {c['seq_length']}, "
        f"vocab {c['vocab_size']} -> padded {info['padded_vocab_size']} (TP {info['tp']})",
        f"parameters: {info['parameters']:,} ({_fmt(info['parameters'])})",
        f"layout: TP {info['tp']} x PP {info['pp']} ({info['pipe_partition_method']}; layers per stage "
        f"{'/'.join(map(str, info['layers_per_stage']))})",
        f"parameters per GPU: first stage {ppg['first']:,}, "
        + (f"middle {ppg['middle']:,}, " if ppg["middle"] is not None else "")
        + f"last {ppg['last']:,}; max {ppg['max']:,} ({_fmt(ppg['max'])})",
        f"training FLOPs per token: model {info['flops_per_token']['model']:.4g}, hardware "
        f"{info['flops_per_token']['hardware']:.4g}"
        + (" (activation checkpointing recomputes the forward)" if info["checkpoint_activations"] else ""),
        f"  formula: {info['flops_formula']}",
    ]
    if "world_size" in info:
        lines.append(
            f"world {info['world_size']}: DP {info['dp']}, global batch {info['global_batch']} sequences, "
            f"{info['tokens_per_step']:,} tokens/step, {info['model_flops_per_step']:.4g} model FLOPs/step"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-c", "--config", nargs="+", required=True, help="config files, merged in order")
    ap.add_argument("overrides", nargs="*", help="key=value overrides")
    ap.add_argument("--json", action="store_true", help="print JSON")
    ap.add_argument("--world-size", type=int, default=None, help="GPUs, to derive DP and the global batch")
    args = ap.parse_args(argv)
    # `-c a.yml k=v` : argparse hands the override to -c; move it back.
    files = [c for c in args.config if "=" not in c or Path(c).is_file()]
    overrides = [c for c in args.config if c not in files] + args.overrides
    try:
        cfg = load_config(files, overrides).validate(args.world_size)
        info = plan(cfg, args.world_size)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    info = {"config_files": files, "overrides": overrides, **info}
    print(json.dumps(info, indent=2) if args.json else render(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())

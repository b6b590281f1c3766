#!/usr/bin/env python
"""Size a run before launching it: parameters (total, per GPU), training FLOPs per token, memory per GPU.

    python tools/plan.py -c configs/20B.yml --world-size 96 --gpu-mem 40
    python tools/plan.py -c configs/pythia/70M.yml --json
    python tools/plan.py -c configs/20B.yml model_parallel_size=4 --dp 6 --gpu-mem 80 --headroom 0.15

The arithmetic lives in neox/config/plan.py (no torch); FLOPs follow Megatron's formula, documented
there: model FLOPs = 3 x forward matmul FLOPs; activation checkpointing adds one more forward of the
layers to the hardware FLOPs. Memory per GPU = params + grads + optimizer state (fp32 master + moments,
sharded over DP by ZeRO-1) + activations (the tensors neox's GPT-NeoX / RWKV-4 save for backward, with
torch SDPA's CUDA kernel unless --attention-kernel says otherwise; see docs/planning.md), per pipeline
stage; --gpu-mem GiB says whether the largest stage fits after keeping --headroom for the CUDA context,
NCCL buffers and fragmentation. DP comes from --dp, --world-size, the config's world_size /
global_num_gpus / num_gpus x num_nodes, else 1.
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
    parse_yaml,
    stage_layer_counts,
    stage_parameters,
)
from neox.config.plan import SDPA_KERNELS, memory_per_gpu  # noqa: E402

GIB = 2**30

FLOPS_FORMULA = (
    "forward = 2*(L*(4*D^2 + 2*D*F) + Vpad*D) + 4*L*s*D per token; model = 3*forward "
    "(= 72*L*D^2*(1 + s/(6D) + Vpad/(12*L*D)) when F = 4D); hardware = model + L-layer forward "
    "when checkpoint_activations"
)
# RWKV-4: att key/value/receptance/output (4 D^2) + ffn key, value (2 D F) and receptance (D^2); no attention
# term (the WKV recurrence is O(D) per token), as neox.config.plan.flops_per_token counts it.
RWKV_FLOPS_FORMULA = (
    "forward = 2*(L*(5*D^2 + 2*D*F) + Vpad*D) per token (no attention term: WKV is O(D) per token); "
    "model = 3*forward (= 78*L*D^2*(1 + Vpad/(13*L*D)) when F = 4D); hardware = model + L-layer forward "
    "when checkpoint_activations"
)


def flops_formula(model_type: str) -> str:
    """The FLOPs formula flops_per_token uses for this model type, as printed."""
    return RWKV_FLOPS_FORMULA if model_type == "rwkv" else FLOPS_FORMULA


def _vocab_from_tokenizer(cfg: NeoXConfig) -> int | None:
    """vocab_size from the config's tokenizer file when the config does not give one."""
    path = cfg.data.vocab_file
    if not path or not Path(path).is_file() or cfg.data.tokenizer_type != "HFTokenizer":
        return None
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(path)).get_vocab_size()


def world_size_from_files(files: list[str], overrides: list[str]) -> int | None:
    """The GPU count a gpt-neox config names (world_size, global_num_gpus, or num_gpus per node x
    num_nodes); neox's loader ignores these launcher keys, so read them from the raw files."""
    raw: dict = {}
    for path in files:
        raw.update({str(k).replace("-", "_"): v for k, v in (parse_yaml(Path(path).read_text(), path) or {}).items()})
    for item in overrides:
        key, _, text = item.partition("=")
        raw[key.strip().replace("-", "_")] = parse_yaml(text, item)
    for key in ("world_size", "global_num_gpus"):
        if isinstance(raw.get(key), int) and raw[key] > 0:
            return raw[key]
    if isinstance(raw.get("num_gpus"), int) and raw["num_gpus"] > 0:
        nodes = raw.get("num_nodes")
        return raw["num_gpus"] * (nodes if isinstance(nodes, int) and nodes > 0 else 1)
    return None


def plan(cfg: NeoXConfig, world_size: int | None = None, gpu_mem: float | None = None,
         headroom: float = 0.1, attention: str | None = None) -> dict:
    """Everything tools/plan.py prints, as a dict (memory at DP 1 when world_size is None). attention: the
    SDPA kernel GPT-NeoX's activations assume (None: what CUDA picks for the precision)."""
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
        "flops_formula": flops_formula(m.model_type),
    }
    dp = 1
    if world_size is not None:
        dp = p.dp_size(world_size)
        batch = cfg.training.global_batch(dp)
        out.update(world_size=world_size, dp=dp, global_batch=batch, tokens_per_step=batch * m.seq_length,
                   model_flops_per_step=flops["model"] * batch * m.seq_length)
    t = cfg.training
    mem = memory_per_gpu(
        m, tp=tp, pp=pp, dp=dp, micro_batch=t.train_micro_batch_size_per_gpu, grad_accum=t.gradient_accumulation_steps,
        precision=p.precision, zero_stage=p.zero_stage, sequence_parallel=p.sequence_parallel,
        checkpoint_activations=p.checkpoint_activations, checkpoint_num_layers=p.checkpoint_num_layers,
        virtual=p.virtual_size, partition_method=p.pipe_partition_method, optimizer=cfg.optimizer.optimizer_type,
        momentum=cfg.optimizer.momentum, attention=attention)
    if gpu_mem is not None:
        usable = gpu_mem * GIB * (1 - headroom)
        mem.update(gpu_mem_gib=gpu_mem, headroom=headroom, usable_bytes=usable, fits=mem["max_total"] <= usable,
                   spare_bytes=usable - mem["max_total"])
    out["memory"] = mem
    return out


def _fmt(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def _gib(n: float) -> str:
    return f"{n / GIB:.2f}"


_ACTIVATIONS_NOTE = {
    "gpt_neox": "  activations: GPT-NeoX tensors saved for backward, per layer e*sb((3|4)D/q + 7D/t + 2F/t) "
                "+ 16sb/q + 4sba/t bytes with a fused SDPA kernel (TP t; q = t with SP, else 1; 3D/q with parallel "
                "residual; no selective recompute: selective = none), x micro-batches in flight under 1F1B; "
                "head = final-norm input + fused head's d/dh and fp32 d/dW; see docs/planning.md",
    "rwkv": "  activations: RWKV-4 tensors saved for backward, per block e*sb(12D/q + 6D/t + 2F/t) bytes (TP t; "
            "q = t with SP, else 1; no selective recompute: selective = none), x micro-batches in flight under "
            "1F1B; head = ln_out input + fused head's d/dh and fp32 d/dW; see docs/planning.md",
}


def render_memory(mem: dict) -> list[str]:
    """The memory block of the human-readable plan (GiB = 2**30 bytes)."""
    bpp = mem["stages"][0]["bytes_per_param"]
    zero = "ZeRO-1" if mem["zero_stage"] >= 1 else "no ZeRO"
    ckpt = "full ckpt" if mem["checkpoint_activations"] else "no ckpt"
    lines = [
        f"memory per GPU (GiB): {mem['precision']}, {bpp['params']} B params + {bpp['grads']} B grads + "
        f"{bpp['optimizer']} B optimizer (fp32 master + {mem['optimizer']} state) per parameter; DP {mem['dp']}, "
        f"{zero}; micro-batch {mem['micro_batch']}" + (", sequence parallel" if mem["sequence_parallel"] else "")
        + (f", {mem['virtual']} virtual stages" if mem["virtual"] > 1 else "")
        + (f"; activation checkpointing every {mem['checkpoint_num_layers']} layer(s)"
           if mem["checkpoint_activations"] else "; no activation checkpointing"),
        _ACTIVATIONS_NOTE["rwkv" if mem.get("model_type") == "rwkv" else "gpt_neox"],
        f"  {'stage':>5} {'params':>7} {'in-flight':>9} | {'params':>6} {'grads':>6} {'optim ZeRO-1 / none':>19} | "
        f"{'activations none / selective / full ckpt':>40} {'head':>5} | {'total':>6}",
    ]
    if mem.get("attention_kernel") is not None:
        per_layer = mem["layer_activations"]
        lines.insert(2, f"  SDPA kernel {mem['attention_kernel']}: {per_layer['none'] / 2**20:,.1f} MiB per layer and "
                        f"micro-batch; Korthikanti et al. 2022 per layer (Megatron's kernels, s x s scores kept): "
                        f"{per_layer['korthikanti'] / 2**20:,.1f} MiB")
    for st in mem["stages"]:
        acts = st["activations"]
        act_txt = f"{_gib(acts['none'])} / {_gib(acts['selective'])} / {_gib(acts['full'])}"
        optim = f"{_gib(st['optimizer_zero1'])} / {_gib(st['optimizer_no_zero'])}"
        lines.append(
            f"  {st['stage']:>5} {_fmt(st['parameters']):>7} {st['in_flight']:>9} | {_gib(st['params']):>6} "
            f"{_gib(st['grads']):>6} {optim:>19} | {act_txt:>40} {_gib(st['head_activations']):>5} | "
            f"{_gib(st['total']):>6}"
        )
    alt = mem["stages"][mem["max_stage"]]["totals"]
    lines.append(
        f"  largest: stage {mem['max_stage']}, {_gib(mem['max_total'])} GiB ({zero}, {ckpt}, as configured); "
        f"the same stage with ZeRO-1: full ckpt {_gib(alt['zero1']['full'])}, selective "
        f"{_gib(alt['zero1']['selective'])}, no ckpt {_gib(alt['zero1']['none'])}; without ZeRO: full ckpt "
        f"{_gib(alt['no_zero']['full'])}, no ckpt {_gib(alt['no_zero']['none'])}"
    )
    if "fits" in mem:
        verdict = "FITS" if mem["fits"] else "does NOT fit"
        lines.append(
            f"  {verdict} in {mem['gpu_mem_gib']:g} GiB per GPU: usable {_gib(mem['usable_bytes'])} GiB after "
            f"{mem['headroom']:.0%} headroom, largest stage {_gib(mem['max_total'])} GiB, "
            + (f"{_gib(mem['spare_bytes'])} GiB spare" if mem["fits"] else f"{_gib(-mem['spare_bytes'])} GiB short")
        )
    return lines


def render(info: dict) -> str:
    c = info["config"]
    ppg = info["parameters_per_gpu"]
    lines = [
        f"model: {c['model_type']}, {c['num_layers']} layers, hidden {c['hidden_size']}, "
        + (f"{c['num_attention_heads']} heads, " if c["num_attention_heads"] is not None else "")
        + f"ffn {c['ffn_size']}, seq {c['seq_length']}, "
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
    return "\n".join(lines + render_memory(info["memory"]))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-c", "--config", nargs="+", required=True, help="config files, merged in order")
    ap.add_argument("overrides", nargs="*", help="key=value overrides")
    ap.add_argument("--json", action="store_true", help="print JSON")
    ap.add_argument("--world-size", type=int, default=None, help="GPUs, to derive DP and the global batch")
    ap.add_argument("--dp", type=int, default=None, help="data-parallel size (instead of --world-size)")
    ap.add_argument("--gpu-mem", type=float, default=None, help="GiB per GPU: say whether the plan fits")
    ap.add_argument("--headroom", type=float, default=0.1,
                    help="fraction of --gpu-mem kept for CUDA context, NCCL buffers, fragmentation (default 0.1)")
    ap.add_argument("--attention-kernel", choices=SDPA_KERNELS, default=None,
                    help="torch SDPA kernel GPT-NeoX's activations assume: flash (also cuDNN; CUDA's choice for "
                         "fp16/bf16), efficient (CUDA's for fp32), math (keeps the s x s probabilities); "
                         "default: CUDA's choice for the config's precision")
    args = ap.parse_args(argv)
    # `-c a.yml k=v` : argparse hands the override to -c; move it back.
    files = [c for c in args.config if "=" not in c or Path(c).is_file()]
    overrides = [c for c in args.config if c not in files] + args.overrides
    try:
        if not 0 <= args.headroom < 1:
            raise ConfigError(f"--headroom must be in [0, 1), got {args.headroom}")
        cfg = load_config(files, overrides)
        world_size = args.world_size
        if args.dp is not None:
            if args.dp < 1:
                raise ConfigError(f"--dp must be >= 1, got {args.dp}")
            mp = cfg.parallel.tp_size * cfg.parallel.pp_size
            if world_size is not None and world_size != args.dp * mp:
                raise ConfigError(f"--dp {args.dp} x TP*PP {mp} != --world-size {world_size}; give one of them")
            world_size = args.dp * mp
        elif world_size is None:
            world_size = world_size_from_files(files, overrides)
        cfg.validate(world_size)
        info = plan(cfg, world_size, args.gpu_mem, args.headroom, args.attention_kernel)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    info = {"config_files": files, "overrides": overrides, **info}
    print(json.dumps(info, indent=2) if args.json else render(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())

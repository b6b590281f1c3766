"""Convert RWKV-4 weights between BlinkDL's .pth, neox checkpoints (any layout) and Hugging Face directories.

    python tools/convert_rwkv.py --input RWKV-4-Pile-169M.pth --output runs/rwkv-169m --to neox --tp 2 --pp 2
    python tools/convert_rwkv.py --input runs/rwkv-169m --output rwkv-169m.pth --to blinkdl
    python tools/convert_rwkv.py --input rwkv-4-169m-pile/ --output runs/rwkv-hf --to neox
    python tools/convert_rwkv.py --input runs/rwkv-hf --output hf/rwkv --to hf

The input format is detected: a file is a BlinkDL .pth (a torch.save'd state dict, read with
weights_only=True), a directory with an rwkv config.json is Hugging Face, anything else a neox run or
global_stepN dir. Conversion only renames, reshapes and pads/strips zero vocab rows, so round trips are
bit-identical and dtypes are kept. A neox run dir keeps the original HF config.json as hf_config.json
(every HF config field comes back) and the tokenizer files beside it (where tools/generate.py looks).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

from neox.checkpoint.hf_gpt_neox import HF_SIDE_FILES, load_hf_state_dict, save_hf_checkpoint
from neox.checkpoint.io import load_model_checkpoint, resolve_step_dir
from neox.checkpoint.loading import hf_model_type
from neox.checkpoint.reshard import save_model_in_layout
from neox.checkpoint.rwkv_convert import (
    blinkdl_config,
    blinkdl_to_neox_state_dict,
    hf_config_to_neox,
    hf_to_neox_state_dict,
    load_blinkdl,
    neox_config_to_hf,
    neox_to_blinkdl_state_dict,
    neox_to_hf_state_dict,
)
from neox.models.rwkv import partition_dim


def read_input(src: Path, args):
    """-> (NeoXConfig, full neox state dict, HF base config dict or None, dirs holding side files)."""
    if src.is_file():
        sd = load_blinkdl(src)
        over = {"seq_length": args.context_length, "max_position_embeddings": args.context_length}
        if args.tokenizer:
            over.update(tokenizer_type="HFTokenizer", vocab_file=str(Path(args.tokenizer).resolve()))
        cfg = blinkdl_config(sd, **over)
        return cfg, blinkdl_to_neox_state_dict(sd, cfg), None, []
    kind = hf_model_type(src)
    if kind is not None:
        if kind != "rwkv":
            raise ValueError(f"{src} holds a Hugging Face {kind!r} model, not rwkv (GPT-NeoX: convert_hf_to_neox.py)")
        from transformers import RwkvConfig

        base = json.loads((src / "config.json").read_text())
        cfg = hf_config_to_neox(RwkvConfig.from_pretrained(src))
        return cfg, hf_to_neox_state_dict(load_hf_state_dict(src), cfg), base, [src]
    step_dir = resolve_step_dir(src)
    cfg, sd = load_model_checkpoint(step_dir)
    if cfg.model.model_type != "rwkv":
        raise ValueError(f"{step_dir} holds a {cfg.model.model_type!r} model, not rwkv")
    search = [step_dir, step_dir.parent]
    base_file = next((d / "hf_config.json" for d in search if (d / "hf_config.json").is_file()), None)
    return cfg, sd, json.loads(base_file.read_text()) if base_file else None, search


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", required=True, help="BlinkDL .pth, Hugging Face RWKV dir, or neox run/step dir")
    ap.add_argument("--output", required=True, help=".pth file (blinkdl), directory (hf) or run dir (neox)")
    ap.add_argument("--to", required=True, choices=["neox", "hf", "blinkdl"], help="format to write")
    ap.add_argument("--tp", type=int, default=1, help="tensor-parallel size of a written neox checkpoint")
    ap.add_argument("--pp", type=int, default=1, help="pipeline-parallel size of a written neox checkpoint")
    ap.add_argument("--iteration", type=int, default=0, help="iteration number of a written neox checkpoint")
    ap.add_argument("--context-length", type=int, default=1024,
                    help="seq_length recorded for a BlinkDL input (it has no config; RNN mode has no limit)")
    ap.add_argument("--tokenizer", help="tokenizer.json to record (and copy) for a BlinkDL input")
    args = ap.parse_args(argv)

    src, out = Path(args.input), Path(args.output)
    if not src.exists():
        print(f"error: {src} does not exist", file=sys.stderr)
        return 2
    try:
        cfg, sd, base, side_dirs = read_input(src, args)
        m = cfg.model
        if args.to == "neox":
            if args.tp < 1 or args.pp < 1 or m.hidden_size % args.tp or m.ffn_size % args.tp:
                raise ValueError(f"--tp {args.tp} must divide hidden_size {m.hidden_size} and the channel-mix "
                                 f"width {m.ffn_size} (and --pp {args.pp} must be >= 1)")
            out.mkdir(parents=True, exist_ok=True)
            where = save_model_in_layout(out, sd, cfg, tp=args.tp, pp=args.pp, iteration=args.iteration,
                                         partition_dims={k: partition_dim(k) for k in sd})
            if base is not None:
                (out / "hf_config.json").write_text(json.dumps(base, indent=2))
            if args.tokenizer:
                shutil.copy2(args.tokenizer, out / "tokenizer.json")
        elif args.to == "hf":
            where = save_hf_checkpoint(out, neox_to_hf_state_dict(sd, cfg), neox_config_to_hf(cfg, base=base))
        else:
            out.parent.mkdir(parents=True, exist_ok=True)
            torch.save(neox_to_blinkdl_state_dict(sd, cfg), out)
            where = out
    except ValueError as e:  # ConfigError / CheckpointError too
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.to in ("neox", "hf"):
        for name in HF_SIDE_FILES:
            f = next((d / name for d in side_dirs if (d / name).is_file()), None)
            if f is not None and not (out / name).exists():
                shutil.copy2(f, out / name)
    n = sum(t.numel() for t in sd.values())
    print(f"wrote {where} ({args.to}; {m.num_layers} layers, hidden {m.hidden_size}, vocab {m.vocab_size}, "
          f"{n / 1e6:.1f}M parameters incl. vocab padding)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

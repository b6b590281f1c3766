"""Convert a Hugging Face GPT-NeoX model directory into a neox checkpoint, in any TP x PP layout.

    python tools/convert_hf_to_neox.py --input pythia-70m/ --output runs/pythia-70m
    python tools/convert_hf_to_neox.py --input pythia-70m/ --output runs/pythia-70m-tp2pp2 --tp 2 --pp 2

With --tp/--pp the shards are cut for that layout (vocabulary padded for that TP, layers split over
the stages as the engine splits them), so a run with those sizes loads it directly; any layout also
loads into one process with neox.load and converts back with tools/convert_neox_to_hf.py.

Writes RUN_DIR/global_step0 (or --iteration), copies the tokenizer files into RUN_DIR (where
tools/generate.py looks) and keeps the original config.json as RUN_DIR/hf_config.json, so that
tools/convert_neox_to_hf.py restores every Hugging Face config field.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from neox.checkpoint.hf_gpt_neox import (
    HF_SIDE_FILES,
    hf_config_to_neox,
    hf_to_neox_state_dict,
    load_hf_state_dict,
)
from neox.checkpoint.reshard import save_model_in_layout
from neox.models.gpt_neox import partition_dim


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", required=True, help="Hugging Face model directory (config.json + weights)")
    ap.add_argument("--output", required=True, help="neox run directory to write")
    ap.add_argument("--iteration", type=int, default=0, help="iteration number of the checkpoint")
    ap.add_argument("--tp", type=int, default=1, help="tensor-parallel size of the written checkpoint")
    ap.add_argument("--pp", type=int, default=1, help="pipeline-parallel size of the written checkpoint")
    ap.add_argument("--vpp", type=int, default=None, help="virtual pipeline chunks per stage (interleaved)")
    args = ap.parse_args(argv)

    from transformers import GPTNeoXConfig

    src, run_dir = Path(args.input), Path(args.output)
    if not (src / "config.json").is_file():
        print(f"error: {src} has no config.json; pass a Hugging Face model directory", file=sys.stderr)
        return 2
    hf_config = GPTNeoXConfig.from_pretrained(src)
    run_dir.mkdir(parents=True, exist_ok=True)
    side = [name for name in HF_SIDE_FILES if (src / name).is_file()]
    overrides = {}
    if "tokenizer.json" in side:
        vocab_file = str((run_dir / "tokenizer.json").resolve())
        overrides = {"tokenizer_type": "HFTokenizer", "vocab_file": vocab_file}
    cfg = hf_config_to_neox(hf_config, **overrides)
    sd = hf_to_neox_state_dict(load_hf_state_dict(src), cfg)
    m = cfg.model
    if args.tp < 1 or args.pp < 1 or m.num_attention_heads % args.tp or m.ffn_size % args.tp:
        print(f"error: --tp {args.tp} must divide the {m.num_attention_heads} heads and the ffn size {m.ffn_size} "
              f"(and --pp {args.pp} must be >= 1)", file=sys.stderr)
        return 2
    try:
        step_dir = save_model_in_layout(run_dir, sd, cfg, tp=args.tp, pp=args.pp, vpp=args.vpp,
                                        iteration=args.iteration, partition_dims={k: partition_dim(k) for k in sd})
    except ValueError as e:  # ConfigError too: layers that do not split over the stages
        print(f"error: {e}", file=sys.stderr)
        return 2
    for name in side:
        shutil.copy2(src / name, run_dir / name)
    shutil.copy2(src / "config.json", run_dir / "hf_config.json")
    n = sum(t.numel() for t in sd.values())
    print(f"wrote {step_dir} (tp={args.tp} pp={args.pp}; {len(sd)} tensors, {n / 1e6:.1f}M parameters)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

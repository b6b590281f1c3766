"""Convert a Hugging Face GPT-NeoX model directory into a neox checkpoint (TP = PP = 1).

    python tools/convert_hf_to_neox.py --input pythia-70m/ --output runs/pythia-70m

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
from neox.checkpoint.io import save_model_checkpoint
from neox.models.gpt_neox import partition_dim


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", required=True, help="Hugging Face model directory (config.json + weights)")
    ap.add_argument("--output", required=True, help="neox run directory to write")
    ap.add_argument("--iteration", type=int, default=0, help="iteration number of the checkpoint")
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
    step_dir = save_model_checkpoint(run_dir, sd, cfg, iteration=args.iteration,
                                     partition_dims={k: partition_dim(k) for k in sd})
    for name in side:
        shutil.copy2(src / name, run_dir / name)
    shutil.copy2(src / "config.json", run_dir / "hf_config.json")
    n = sum(t.numel() for t in sd.values())
    print(f"wrote {step_dir} ({len(sd)} tensors, {n / 1e6:.1f}M parameters incl. vocab padding)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

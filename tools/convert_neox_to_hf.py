"""Convert a neox GPT-NeoX checkpoint (any TP/PP layout) into a Hugging Face model directory.

    python tools/convert_neox_to_hf.py --input runs/pythia-70m --output hf/pythia-70m
    python tools/convert_neox_to_hf.py --input runs/pythia-70m/global_step1000 --output hf/step1000

The result loads with transformers.GPTNeoXForCausalLM.from_pretrained. Tokenizer files and the
original hf_config.json (written by convert_hf_to_neox.py) are taken from the step or run directory
when present.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from neox.checkpoint.hf_gpt_neox import (
    HF_SIDE_FILES,
    neox_config_to_hf,
    neox_to_hf_state_dict,
    save_hf_checkpoint,
)
from neox.checkpoint.io import load_model_checkpoint, resolve_step_dir


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", required=True, help="neox run dir (follows 'latest') or global_stepN dir")
    ap.add_argument("--output", required=True, help="Hugging Face directory to write")
    args = ap.parse_args(argv)

    step_dir = resolve_step_dir(args.input)
    cfg, sd = load_model_checkpoint(step_dir)
    if cfg.model.model_type != "gpt_neox":
        print(f"error: {step_dir} holds a {cfg.model.model_type!r} model; only gpt_neox converts to "
              "transformers.GPTNeoXForCausalLM", file=sys.stderr)
        return 2
    search = [step_dir, step_dir.parent]
    base_file = next((d / "hf_config.json" for d in search if (d / "hf_config.json").is_file()), None)
    base = json.loads(base_file.read_text()) if base_file else None
    out = Path(args.output)
    hf_config = neox_config_to_hf(cfg, base=base)
    save_hf_checkpoint(out, neox_to_hf_state_dict(sd, cfg), hf_config)
    for name in HF_SIDE_FILES:
        src = next((d / name for d in search if (d / name).is_file()), None)
        if src is not None:
            shutil.copy2(src, out / name)
    print(f"wrote {out} from {step_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

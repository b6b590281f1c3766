"""Convert a neox checkpoint to another tensor / pipeline / data-parallel layout.

    python tools/reshard.py --input runs/x/global_step100 --output runs/x_tp1_pp2 --tp 1 --pp 2
    python tools/reshard.py --input runs/x --output runs/x_tp4 --tp 4 --pp 1 --dp 2   # follows 'latest'

Writes OUTPUT/global_stepN (same N) and OUTPUT/latest: model shards for the new layout (vocabulary
rows re-padded for the new TP) and the optimizer state in a layout-independent form that any DP size
loads, with or without ZeRO-1 or FSDP (ZeRO-2/3), whichever wrote it; the data position and iteration
(hence the LR step) carry over. Point the run's `load` at OUTPUT. Tensors are streamed one at a time:
peak memory is a few times the largest tensor, not the model. Per-rank RNG states are not carried over
(see neox/checkpoint/reshard.py).
"""

from __future__ import annotations

import argparse
import sys
import time

from neox.checkpoint.io import CheckpointError
from neox.checkpoint.reshard import reshard_checkpoint
from neox.config import ConfigError


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", required=True, help="neox run dir (follows 'latest') or global_stepN dir")
    ap.add_argument("--output", required=True, help="run directory to write (OUTPUT/global_stepN)")
    ap.add_argument("--tp", type=int, required=True, help="tensor-parallel size of the new layout")
    ap.add_argument("--pp", type=int, required=True, help="pipeline-parallel size of the new layout")
    ap.add_argument("--dp", type=int, default=None,
                    help="data-parallel size to record (default: the input's); any DP loads the result")
    ap.add_argument("--vpp", type=int, default=None,
                    help="virtual pipeline chunks per stage (default: the input's when it fits; 1 = none)")
    ap.add_argument("--step", type=int, default=None, help="with a run dir: this global_stepN instead of latest")
    ap.add_argument("--weights-only", action="store_true", help="leave the optimizer state out")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    try:
        out = reshard_checkpoint(args.input, args.output, tp=args.tp, pp=args.pp, dp=args.dp, vpp=args.vpp,
                                 weights_only=args.weights_only, step=args.step)
    except (CheckpointError, ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out} (tp={args.tp} pp={args.pp}) in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

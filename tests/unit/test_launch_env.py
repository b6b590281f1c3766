"""Launcher environment parsing (pure functions fed dicts) and a real 2-process init_distributed."""

import multiprocessing as mp
import os
import socket

import pytest

from megatron_ext.launch import (
    DEFAULT_MASTER_PORT,
    detect_launcher_env,
    expand_slurm_nodelist,
    first_slurm_host,
)


@pytest.mark.parametrize(
    "nodelist,hosts",
    [
        ("node07", ["node07"]),
        ("node[01-04,07]", ["node01", "node02", "node03", "node04", "node07"]),
        ("a[1-2],b3", ["a1", "a2", "b3"]),
        ("gpu[9-11]", ["gpu9", "gpu10", "gpu11"]),
        ("h1,h2", ["h1", "h2"]),
        ("rack[1-2]-n[01-02]", ["rack1-n01", "rack1-n02", "rack2-n01", "rack2-n02"]),
        ("x-[003-004],y", ["x-003", "x-004", "y"]),
    ],
)
def test_expand_slurm_nodelist(nodelist, hosts):
    assert expand_slurm_nodelist(nodelist) == hosts
    assert first_slurm_host(nodelist) == hosts[0]


@pytest.mark.parametrize("bad", ["node[01-04", "node[a-b]"])
def test_bad_nodelist_is_a_clear_error(bad):
    with pytest.raises(ValueError, match="SLURM node list"):
        expand_slurm_nodelist(bad)


def test_no_launcher_is_single_process():
    assert detect_launcher_env({}) == dict(rank=0, world_size=1, local_rank=0, local_world_size=1,
                                           master_addr="127.0.0.1", master_port=DEFAULT_MASTER_PORT,
                                           launcher="none")


def test_torchrun():
    env = dict(RANK="5", WORLD_SIZE="8", LOCAL_RANK="1", LOCAL_WORLD_SIZE="4", MASTER_ADDR="10.0.0.2",
               MASTER_PORT="1234")
    assert detect_launcher_env(env) == dict(rank=5, world_size=8, local_rank=1, local_world_size=4,
                                            master_addr="10.0.0.2", master_port=1234, launcher="torchrun")


def test_slurm_srun():
    env = dict(SLURM_PROCID="6", SLURM_NTASKS="8", SLURM_LOCALID="2", SLURM_JOB_NODELIST="node[03-04,09]",
               SLURM_NTASKS_PER_NODE="4", SLURM_JOB_ID="77")
    info = detect_launcher_env(env)
    assert info == dict(rank=6, world_size=8, local_rank=2, local_world_size=4, master_addr="node03",
                        master_port=DEFAULT_MASTER_PORT, launcher="slurm")
    env["MASTER_ADDR"], env["MASTER_PORT"] = "head", "4000"
    assert detect_launcher_env(env)["master_addr"] == "head"
    assert detect_launcher_env(env)["master_port"] == 4000
    env = dict(SLURM_PROCID="1", SLURM_NTASKS="2", SLURM_NODELIST="a[1-2],b3", SLURM_TASKS_PER_NODE="1(x2)")
    info = detect_launcher_env(env)
    assert (info["master_addr"], info["local_rank"], info["local_world_size"]) == ("a1", 0, 1)


def test_openmpi_wins_over_inherited_slurm_vars():
    env = dict(OMPI_COMM_WORLD_RANK="3", OMPI_COMM_WORLD_SIZE="4", OMPI_COMM_WORLD_LOCAL_RANK="3",
               OMPI_COMM_WORLD_LOCAL_SIZE="4", SLURM_PROCID="0", SLURM_NTASKS="1")
    assert detect_launcher_env(env) == dict(rank=3, world_size=4, local_rank=3, local_world_size=4,
                                            master_addr="127.0.0.1", master_port=DEFAULT_MASTER_PORT,
                                            launcher="openmpi")


def test_mpich_pmi():
    env = dict(PMI_RANK="2", PMI_SIZE="4", MPI_LOCALRANKID="0", MPI_LOCALNRANKS="2",
               SLURM_JOB_NODELIST="c[10-11]")
    info = detect_launcher_env(env)
    assert (info["rank"], info["world_size"], info["local_rank"], info["launcher"]) == (2, 4, 0, "mpich")
    assert info["master_addr"] == "c10"  # mpirun inside an allocation: first node of the job


def test_multinode_mpi_without_master_addr_is_unknown():
    env = dict(PMI_RANK="2", PMI_SIZE="4", MPI_LOCALRANKID="0", MPI_LOCALNRANKS="2")
    assert detect_launcher_env(env)["master_addr"] is None


@pytest.mark.parametrize(
    "env,match",
    [
        (dict(RANK="x", WORLD_SIZE="2"), "RANK='x' is not an integer"),
        (dict(RANK="2", WORLD_SIZE="2"), "RANK=2 is not a valid rank"),
        (dict(SLURM_PROCID="0", SLURM_NTASKS="0"), "SLURM_NTASKS=0"),
    ],
)
def test_bad_values_are_clear(env, match):
    with pytest.raises(ValueError, match=match):
        detect_launcher_env(env)


def _init_child(rank, port, conn):
    import torch
    import torch.distributed as dist

    from megatron_ext.launch import init_distributed

    os.environ.update(OMPI_COMM_WORLD_RANK=str(rank), OMPI_COMM_WORLD_SIZE="2",
                      OMPI_COMM_WORLD_LOCAL_RANK=str(rank), OMPI_COMM_WORLD_LOCAL_SIZE="2",
                      MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR"):
        os.environ.pop(var, None)
    try:
        torch.set_num_threads(1)
        got = init_distributed(timeout_s=30)
        x = torch.tensor([rank + 1.0])
        dist.all_reduce(x)
        conn.send((got, x.item(), dist.get_backend(), init_distributed()))
        dist.destroy_process_group()
    except BaseException as exc:
        conn.send(repr(exc))
    os._exit(0)


def test_init_distributed_from_mpi_env_two_processes():
    import torch  # noqa: F401  (fork after importing torch)

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("fork")
    pipes = [ctx.Pipe(duplex=False) for _ in range(2)]
    procs = [ctx.Process(target=_init_child, args=(r, port, pipes[r][1]), daemon=True) for r in range(2)]
    for p in procs:
        p.start()
    try:
        results = []
        for recv, _ in pipes:
            assert recv.poll(60), "init_distributed hung"
            results.append(recv.recv())
    finally:
        for p in procs:
            p.kill()
            p.join()
    assert results == [((0, 2), 3.0, "gloo", (0, 2)), ((1, 2), 3.0, "gloo", (1, 2))]

"""Who this process is in a distributed run, and the process group it talks through.

The world comes from the launcher, in this order:
- torchrun (or any launcher that sets RANK and WORLD_SIZE): RANK, WORLD_SIZE, LOCAL_RANK,
  MASTER_ADDR, MASTER_PORT;
- SLURM (srun with one task per GPU): SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, and the first
  host of SLURM_JOB_NODELIST as the rendezvous address (port MASTER_PORT, else one derived from
  the job id so two jobs on one node do not collide);
- otherwise one process.

Every rank keeps NVLink SHARP and multicast off (NCCL_NVLS_ENABLE=0,
TORCH_SYMM_MEM_DISABLE_MULTICAST=1, NVSHMEM_DISABLE_NVLS=1; GPU.md), also for its children.
The process group is created with a timeout, so a collective that never completes raises on
gloo after `timeout_s` instead of hanging the run. On NCCL, PyTorch's watchdog ends the process
after the timeout; the launcher then stops the other ranks and rank 0 records the case in flight
as failed (suite.run.distributed).
"""
from __future__ import annotations

import datetime as dt
import os
import re
import shutil
import subprocess
from dataclasses import dataclass

import torch
import torch.distributed as dist

NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
                "NVSHMEM_DISABLE_NVLS": "1"}
DEFAULT_TIMEOUT_S = 600.0
TIMEOUT_ENV = "HCBENCH_DIST_TIMEOUT_S"


@dataclass(frozen=True)
class World:
    rank: int
    size: int
    local_rank: int
    master_addr: str | None
    master_port: int | None
    source: str            # torchrun | slurm | single

    @property
    def is_leader(self) -> bool:
        return self.rank == 0


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: SLURM's own `scontrol show hostnames` where it is
    installed, else this parser: 'gpu[07-09,12],cpu1' -> 'gpu07', 'sn[10-11]-ib' -> 'sn10-ib',
    'r[1-2]-n[3-4]' -> 'r1-n3'."""
    nodelist = nodelist.strip()
    if shutil.which("scontrol"):
        try:
            out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True,
                                 text=True, timeout=10)
            if out.returncode == 0 and out.stdout.split():
                return out.stdout.split()[0]
        except (OSError, subprocess.SubprocessError):
            pass
    return parse_first_host(nodelist)


def parse_first_host(nodelist: str) -> str:
    depth, end = 0, len(nodelist)
    for i, ch in enumerate(nodelist):          # the first item: up to a comma outside brackets
        depth += (ch == "[") - (ch == "]")
        if ch == "," and depth == 0:
            end = i
            break
    item = nodelist[:end]
    if not re.fullmatch(r"(?:[^\[\],]+|\[[^\[\]]+\])+", item):      # names and [ranges], unnested
        raise ValueError(f"SLURM_JOB_NODELIST {nodelist!r} is not a node list")
    return re.sub(r"\[([^\]]+)\]", lambda m: m.group(1).split(",")[0].split("-")[0], item)


def from_env(env: dict | None = None) -> World:
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        port = env.get("MASTER_PORT")
        return World(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)),
                     env.get("MASTER_ADDR"), int(port) if port else None, "torchrun")
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        addr = env.get("MASTER_ADDR") or first_host(env.get("SLURM_JOB_NODELIST", "localhost"))
        port = env.get("MASTER_PORT")
        if not port:
            port = 20000 + int(env.get("SLURM_JOB_ID", "0") or 0) % 20000
        return World(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]),
                     int(env.get("SLURM_LOCALID", 0)), addr, int(port), "slurm")
    return World(0, 1, 0, None, None, "single")


def keep_multicast_off(env: dict | None = None) -> None:
    env = os.environ if env is None else env
    env.update(NO_MULTICAST)


def timeout_s() -> float:
    return float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S))


def init(world: World, timeout: float | None = None) -> None:
    """Joins the process group (gloo for CPU tensors, NCCL for CUDA tensors where there is a
    GPU); a world of one needs none."""
    keep_multicast_off()
    if world.size == 1 or dist.is_initialized():
        return
    if world.master_addr:
        os.environ["MASTER_ADDR"] = world.master_addr
    if world.master_port:
        os.environ["MASTER_PORT"] = str(world.master_port)
    backend = "gloo"
    if "OMP_NUM_THREADS" not in os.environ:
        # CPU ranks share the machine's cores (torchrun sets this too with more than one rank).
        local = int(os.environ.get("LOCAL_WORLD_SIZE", world.size))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))
    if torch.cuda.is_available():
        torch.cuda.set_device(world.local_rank % torch.cuda.device_count())
        backend = "cpu:gloo,cuda:nccl"
    dist.init_process_group(backend, rank=world.rank, world_size=world.size,
                            timeout=dt.timedelta(seconds=timeout or timeout_s()))


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()

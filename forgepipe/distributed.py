"""Bring up torch.distributed from whatever launched us, and tear it down.

Supported launchers, with no wrapper script:
- torchrun / the deepspeed launcher: RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR/PORT.
- Slurm's srun: SLURM_PROCID, SLURM_LOCALID, SLURM_NTASKS, SLURM_NTASKS_PER_NODE (or
  SLURM_TASKS_PER_NODE), master address = first host of SLURM_JOB_NODELIST.
- a single plain process.

Ranks per node always come from the launcher, never from torch.cuda.device_count(): under
`srun --gpu-bind=closest` each rank sees one device.

All rank-dependent behaviour lives here and in tracking.py; stages never test `rank == 0`.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import re
import socket
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from forgepipe.errors import ForgeError

DEFAULT_MASTER_PORT = 29500


@dataclass(frozen=True)
class World:
    """Where this process sits in the job."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = DEFAULT_MASTER_PORT
    launcher: str = "single"  # torchrun | slurm | single

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def num_nodes(self) -> int:
        return max(1, self.world_size // max(1, self.local_world_size))


def expand_first_host(nodelist: str) -> str:
    """First host of a Slurm node list: 'frontier[00012-00015,00020]' -> 'frontier00012'."""
    nodelist = nodelist.strip()
    if not nodelist:
        raise ForgeError("SLURM_JOB_NODELIST is empty")
    # Split on the first comma that is not inside brackets.
    depth = 0
    for i, ch in enumerate(nodelist):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        elif ch == "," and depth == 0:
            nodelist = nodelist[:i]
            break
    match = re.fullmatch(r"([^\[]*)\[([^\]]+)\](.*)", nodelist)
    if not match:
        return nodelist
    prefix, ranges, suffix = match.groups()
    first = ranges.split(",")[0].split("-")[0]
    return f"{prefix}{first}{suffix}"


def tasks_per_node(env: dict[str, str]) -> int | None:
    """Ranks on this node from Slurm: SLURM_NTASKS_PER_NODE, else SLURM_TASKS_PER_NODE ('8(x2),4')."""
    if env.get("SLURM_NTASKS_PER_NODE"):
        return int(env["SLURM_NTASKS_PER_NODE"])
    spec = env.get("SLURM_TASKS_PER_NODE")
    if not spec:
        return None
    # The count for this node; without knowing our node index take the first group (the common
    # homogeneous case). Heterogeneous layouts are rejected by the hpZ check if it matters.
    return int(re.match(r"(\d+)", spec).group(1))


def detect_world(env: dict[str, str] | None = None) -> World:
    """Read the launcher's environment. Pure: pass `env` in tests."""
    env = dict(os.environ if env is None else env)
    port = int(env.get("MASTER_PORT", DEFAULT_MASTER_PORT))
    if "RANK" in env and "WORLD_SIZE" in env:
        world_size = int(env["WORLD_SIZE"])
        return World(
            rank=int(env["RANK"]),
            local_rank=int(env.get("LOCAL_RANK", 0)),
            world_size=world_size,
            local_world_size=int(env.get("LOCAL_WORLD_SIZE", world_size)),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=port,
            launcher="torchrun",
        )
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        world_size = int(env["SLURM_NTASKS"])
        per_node = tasks_per_node(env) or world_size
        if "MASTER_PORT" not in env and env.get("SLURM_JOB_ID"):
            # A port derived from the job id lets two jobs share a node without colliding.
            port = 20000 + int(env["SLURM_JOB_ID"]) % 20000
        return World(
            rank=int(env["SLURM_PROCID"]),
            local_rank=int(env.get("SLURM_LOCALID", 0)),
            world_size=world_size,
            local_world_size=per_node,
            master_addr=env.get("MASTER_ADDR") or expand_first_host(env.get("SLURM_JOB_NODELIST", "127.0.0.1")),
            master_port=port,
            launcher="slurm",
        )
    return World(master_port=port)


def device_for(world: World) -> torch.device:
    if torch.cuda.is_available():  # ROCm builds answer here too
        count = torch.cuda.device_count()
        # With one visible device per rank (srun --gpu-bind) it is device 0; with all visible,
        # the local rank picks its own.
        return torch.device("cuda", world.local_rank % count if count > 1 else 0)
    return torch.device("cpu")


def init_distributed(world: World | None = None) -> World:
    """Initialise torch.distributed (NCCL/RCCL on GPUs, gloo on CPU) and return the World.

    Safe to call twice. With a single plain process it still creates a one-rank group so that
    DeepSpeed finds one and does not try to discover a launcher itself.
    """
    world = world or detect_world()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return world
    os.environ.update(
        RANK=str(world.rank),
        LOCAL_RANK=str(world.local_rank),
        WORLD_SIZE=str(world.world_size),
        LOCAL_WORLD_SIZE=str(world.local_world_size),
        MASTER_ADDR=world.master_addr,
        MASTER_PORT=str(world.master_port),
    )
    if world.world_size == 1 and world.launcher == "single":
        # A free port, so that two single-process runs on one machine never collide.
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    device = device_for(world)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    import deepspeed

    deepspeed.init_distributed(
        dist_backend="nccl" if device.type == "cuda" else "gloo",
        auto_mpi_discovery=False,
        timeout=datetime.timedelta(minutes=30),
    )
    return world


def is_initialized() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def barrier() -> None:
    if is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.barrier()


def current_rank() -> int:
    return torch.distributed.get_rank() if is_initialized() else int(os.environ.get("RANK", 0))


def is_main_process() -> bool:
    return current_rank() == 0


@contextlib.contextmanager
def main_process_first() -> Iterator[None]:
    """Rank 0 runs the body first (e.g. builds a cache); the others wait, then run it (load it)."""
    if not is_main_process():
        barrier()
    try:
        yield
    finally:
        if is_main_process():
            barrier()


def broadcast_object(obj):
    """Rank 0's value of a picklable object, on every rank."""
    if not is_initialized() or torch.distributed.get_world_size() == 1:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def all_reduce_sum(values: list[float]) -> list[float]:
    """Sum a few floats over ranks (metrics); identity on one process."""
    if not is_initialized() or torch.distributed.get_world_size() == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64)
    torch.distributed.all_reduce(t)
    return t.tolist()


def teardown() -> None:
    """Destroy the process group; without it a rank sometimes aborts after finishing.

    Through DeepSpeed's comm layer, which also drops the sub-groups (ZeRO, hpZ) it keeps
    references to; left alive, they are destroyed after the backend at interpreter exit.
    """
    if not is_initialized():
        return
    with contextlib.suppress(Exception):
        barrier()
    try:
        import deepspeed.comm as ds_comm

        if ds_comm.is_initialized():
            ds_comm.destroy_process_group()
    except (ImportError, AttributeError, AssertionError):
        pass
    if is_initialized():
        torch.distributed.destroy_process_group()

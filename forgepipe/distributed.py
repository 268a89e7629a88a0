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
    """The one place that picks this rank's compute device: every engine, frozen model and
    batch follows it (engines read it back from `torch.cuda.current_device()`)."""
    if torch.cuda.is_available():  # ROCm builds answer here too
        count = torch.cuda.device_count()
        # With one visible device per rank (srun --gpu-bind) it is device 0; with all visible,
        # the local rank picks its own.
        return torch.device("cuda", world.local_rank % count if count > 1 else 0)
    return torch.device("cpu")


DEFAULT_TIMEOUT_MINUTES = 30.0


def op_build_arch_list(value: str) -> str:
    """TORCH_CUDA_ARCH_LIST as DeepSpeed's JIT op builder can read it.

    DeepSpeed 0.19.8 sorts the entries as dotted integers, so an arch-specific entry such as Hopper's
    "9.0a" (set by CUDA images) makes the first fused-Adam build fail with "invalid literal for int()"
    (seen on an H200). Its ops need no arch-specific instructions: "9.0a" -> "9.0"; "+PTX" is kept.
    """
    entries = [e for e in re.split(r"[;\s]+", value.strip()) if e]
    fixed = [re.sub(r"^(\d+)\.(\d+)[a-z]+", r"\1.\2", e) for e in entries]
    return ";".join(dict.fromkeys(fixed))


def init_distributed(world: World | None = None, timeout_minutes: float = DEFAULT_TIMEOUT_MINUTES) -> World:
    """Initialise torch.distributed (NCCL/RCCL on GPUs, gloo on CPU) and return the World.

    Safe to call twice. With a single plain process it still creates a one-rank group so that
    DeepSpeed finds one and does not try to discover a launcher itself. The rank's GPU is made
    current before the group exists (NCCL binds its communicator to it). A collective that does
    not complete in `timeout_minutes` aborts the process (TORCH_NCCL_ASYNC_ERROR_HANDLING=1)
    instead of hanging the job; a rank that dies outright is handled faster by the launcher
    (srun --kill-on-bad-exit, torchrun's agent).
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
    os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    if world.world_size == 1 and world.launcher == "single":
        # A free port, so that two single-process runs on one machine never collide.
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    device = device_for(world)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        if os.environ.get("TORCH_CUDA_ARCH_LIST"):  # for this process's op builds only
            os.environ["TORCH_CUDA_ARCH_LIST"] = op_build_arch_list(os.environ["TORCH_CUDA_ARCH_LIST"])
    import deepspeed

    deepspeed.init_distributed(
        dist_backend="nccl" if device.type == "cuda" else "gloo",
        auto_mpi_discovery=False,
        timeout=datetime.timedelta(minutes=timeout_minutes),
    )
    return world


def is_initialized() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def current_rank() -> int:
    return torch.distributed.get_rank() if is_initialized() else int(os.environ.get("RANK", 0))


def is_main_process() -> bool:
    return current_rank() == 0


# ---------------------------------------------------------------------------
# Collectives. Every collective forgepipe issues goes through these few functions (a test
# greps that no other module calls torch.distributed): NCCL/RCCL serve GPU tensors only, gloo
# serves CPU tensors, and a tensor on the wrong side fails at the first multi-rank step
# ("No backend type associated with device type cpu").


def _distributed() -> bool:
    return is_initialized() and torch.distributed.get_world_size() > 1


def comm_device() -> torch.device:
    """The device the default process group's collectives take tensors on.

    Read from the backend itself (torch's registry of which device types each backend serves),
    so gloo gives the CPU, NCCL/RCCL the current GPU, and any other backend its own device.
    """
    if not is_initialized():
        return torch.device("cpu")
    backend = str(torch.distributed.get_backend()).lower()
    if ":" in backend:  # "cpu:gloo,cuda:nccl": one backend per device type
        types = [part.split(":")[0] for part in backend.split(",")]
    else:
        types = torch.distributed.Backend.backend_capability.get(backend, ["cuda"])
    if "cpu" in types:
        return torch.device("cpu")
    kind = types[0]
    module = getattr(torch, kind, None)
    index = module.current_device() if module is not None and hasattr(module, "current_device") else None
    return torch.device(kind, index)


def barrier() -> None:
    """Every rank waits here for all the others (host-blocking)."""
    if not _distributed():
        return
    device = comm_device()
    if device.type == "cpu":
        torch.distributed.barrier()
    elif device.index is not None:
        torch.distributed.barrier(device_ids=[device.index])  # NCCL: on this rank's GPU, not a guess
    else:
        torch.distributed.all_reduce(torch.zeros(1, device=device))


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
    if not _distributed():
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0, device=comm_device())
    return box[0]


def all_reduce(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """`tensor` reduced over ranks (op: sum | max | min), on the device it came from.

    The tensor visits the process group's device for the collective; a GPU tensor under NCCL
    never leaves the GPU, and no host synchronisation happens here.
    """
    if not _distributed():
        return tensor
    ops = {"sum": torch.distributed.ReduceOp.SUM, "max": torch.distributed.ReduceOp.MAX,
           "min": torch.distributed.ReduceOp.MIN}
    buffer = tensor.to(comm_device(), copy=True)
    torch.distributed.all_reduce(buffer, op=ops[op])
    return buffer.to(tensor.device)


def all_reduce_sum(values) -> list[float]:
    """Sum a few numbers over ranks (metrics, counts, flags): floats, or 0-d tensors that stay on
    their device until this one transfer. Summed in float64; identity on one process."""
    if not any(torch.is_tensor(v) for v in values) and not _distributed():
        return [float(v) for v in values]
    device = comm_device()
    stacked = torch.stack([v.detach().to(device=device, dtype=torch.float64).reshape(()) if torch.is_tensor(v)
                           else torch.tensor(float(v), dtype=torch.float64, device=device) for v in values])
    return all_reduce(stacked).tolist()


def min_max(values: list[float]) -> tuple[list[float], list[float]]:
    """(per-value minimum, per-value maximum) over ranks, in one collective."""
    t = torch.tensor([float(v) for v in values] + [-float(v) for v in values], dtype=torch.float64,
                     device=comm_device())
    out = all_reduce(t, "max").tolist()
    n = len(values)
    return [-x for x in out[n:]], out[:n]


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

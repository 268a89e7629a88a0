"""Every collective forgepipe issues goes to the device its process group serves.

Under NCCL/RCCL a CPU tensor fails at the first multi-rank step ("No backend type associated with
device type cpu"); gloo hides that. Here a two-rank world is built on a backend that serves the
`meta` device only (torch's fake process group, registered for `meta`): torch's own dispatch then
refuses a CPU tensor exactly as NCCL does, so a helper that builds its tensor on the host fails
these tests. The recorder wraps torch.distributed: it lets torch validate the call, records the
devices, then stops the helper (meta tensors hold no values to bring back).

The values themselves are checked on a real two-rank gloo world (test_collective_values).
"""

from __future__ import annotations

import ast
import subprocess
from pathlib import Path

import pytest
import torch
import torch.distributed
from conftest import REPO, child_env, torchrun

from forgepipe import distributed as dist

BACKEND = "forgepipe_meta_only"


class Delivered(Exception):
    """torch accepted the collective; stop before reading values."""


@pytest.fixture
def meta_world(monkeypatch):
    from torch.testing._internal.distributed.fake_pg import FakeStore, _create_fake_pg

    if BACKEND not in torch.distributed.Backend.backend_list:
        torch.distributed.Backend.register_backend(BACKEND, _create_fake_pg, extended_api=True, devices=["meta"])
    torch.distributed.init_process_group(BACKEND, store=FakeStore(), rank=0, world_size=2)
    calls: list[tuple[str, list[torch.device], object]] = []

    def recording(name, real):
        def call(*args, **kwargs):
            tensors = [a for a in [*args, *kwargs.values()] if torch.is_tensor(a)]
            real(*args, **kwargs)  # torch checks the tensor's device against the backend here
            calls.append((name, [t.device for t in tensors], kwargs.get("device", kwargs.get("device_ids"))))
            raise Delivered
        return call

    for name in ("all_reduce", "broadcast", "broadcast_object_list", "barrier", "all_gather", "reduce"):
        monkeypatch.setattr(torch.distributed, name, recording(name, getattr(torch.distributed, name)))
    try:
        yield calls
    finally:
        torch.distributed.destroy_process_group()


def test_the_meta_world_refuses_a_host_tensor_as_nccl_does(meta_world):
    """The control: without it, the tests below could not fail."""
    with pytest.raises(RuntimeError, match="No backend type associated with device type cpu"):
        torch.distributed.all_reduce(torch.ones(2))
    assert dist.comm_device() == torch.device("meta")


def _helpers():
    from forgepipe.loop import memory_metrics
    from forgepipe.signals import StopRequest

    return {
        "all_reduce_sum of floats": lambda: dist.all_reduce_sum([1.0, 2.0]),
        "all_reduce_sum of host tensors": lambda: dist.all_reduce_sum([torch.tensor(1.0), 3.0]),
        "all_reduce max": lambda: dist.all_reduce(torch.ones(3), "max"),
        "min_max": lambda: dist.min_max([1.0, 5.0]),
        "barrier": dist.barrier,
        "broadcast_object": lambda: dist.broadcast_object({"run_id": "abc"}),
        "stop agreement": lambda: StopRequest().agreed(),
        "memory metrics": memory_metrics,
    }


@pytest.mark.parametrize("name", list(_helpers()))
def test_every_collective_uses_the_process_groups_device(meta_world, name):
    with pytest.raises(Delivered):
        _helpers()[name]()
    assert meta_world, f"{name} issued no collective"
    for fn, devices, device_arg in meta_world:
        assert all(d == torch.device("meta") for d in devices), f"{name}: {fn} got tensors on {devices}"
        if fn == "broadcast_object_list":
            assert device_arg == torch.device("meta")


def test_comm_device_follows_the_backend():
    assert dist.comm_device() == torch.device("cpu")  # no process group
    caps = torch.distributed.Backend.backend_capability
    assert "cpu" in caps["gloo"] and caps["nccl"] == ["cuda"]  # the registry comm_device reads


# ---------------------------------------------------------------------------
# Nobody else calls torch.distributed

COLLECTIVE_HOME = REPO / "forgepipe" / "distributed.py"


def _torch_distributed_uses(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [f"import {a.name}" for a in node.names if a.name.startswith(("torch.distributed", "deepspeed.comm"))]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(
                ("torch.distributed", "deepspeed.comm")):
            found.append(f"from {node.module} import ...")
        elif isinstance(node, ast.ImportFrom) and node.module in ("torch", "deepspeed") and any(
                a.name in ("distributed", "comm") for a in node.names):
            found.append(f"from {node.module} import distributed/comm")
        elif isinstance(node, ast.Attribute) and node.attr == "distributed" and isinstance(node.value, ast.Name) \
                and node.value.id == "torch":
            found.append(f"torch.distributed (line {node.lineno})")
    return found


def test_no_module_but_distributed_calls_torch_distributed():
    offenders = {}
    for path in sorted((REPO / "forgepipe").rglob("*.py")):
        if path == COLLECTIVE_HOME:
            continue
        uses = _torch_distributed_uses(path)
        if uses:
            offenders[str(path.relative_to(REPO))] = uses
    assert not offenders, f"collectives outside forgepipe/distributed.py: {offenders}"


def test_the_scan_sees_a_direct_call(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("import torch\n\ndef f(t):\n    torch.distributed.all_reduce(t)\n")
    assert _torch_distributed_uses(probe) == ["torch.distributed (line 4)"]


# ---------------------------------------------------------------------------
# The values, on a real two-rank gloo world

VALUES = r'''
import sys
from pathlib import Path

import torch
from forgepipe import distributed as dist
from forgepipe.loop import memory_metrics
from forgepipe.signals import StopRequest

world = dist.init_distributed(dist.detect_world())
r = world.rank
assert dist.comm_device() == torch.device("cpu")
assert dist.all_reduce_sum([1.0, float(r)]) == [2.0, 1.0]
assert dist.all_reduce_sum([torch.tensor(r + 1.0), 2]) == [3.0, 4.0]
t = torch.tensor([float(r), -float(r)])
assert dist.all_reduce(t, "max").tolist() == [1.0, 0.0] and t.tolist() == [float(r), -float(r)]  # input untouched
low, high = dist.min_max([10.0 * (r + 1), 5.0])
assert (low, high) == ([10.0, 5.0], [20.0, 5.0]), (low, high)
assert dist.broadcast_object({"id": f"rank{r}"}) == {"id": "rank0"}
stop = StopRequest()
if r == 1:
    stop.signal = 15
assert stop.agreed()  # one rank's signal stops all
mem = memory_metrics()
assert mem["mem/host_peak_rss_gib_min"] <= mem["mem/host_peak_rss_gib_max"]
dist.barrier()
dist.teardown()
Path(sys.argv[1], f"ok{r}").write_text("ok")  # a file per rank: the ranks' stdout interleaves
'''


@pytest.mark.slow
def test_collective_values(tmp_path):
    script = tmp_path / "values.py"
    script.write_text(VALUES)
    proc = subprocess.run(torchrun(2, str(script), str(tmp_path)), env=child_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (tmp_path / "ok0").is_file() and (tmp_path / "ok1").is_file()

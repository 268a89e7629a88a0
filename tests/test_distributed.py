"""Launcher discovery: torchrun/deepspeed variables, Slurm's srun variables, a plain process."""

from __future__ import annotations

import pytest

from forgepipe.distributed import detect_world, expand_first_host, tasks_per_node


def test_torchrun_environment():
    w = detect_world({"RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "4",
                      "MASTER_ADDR": "n1", "MASTER_PORT": "1234"})
    assert (w.rank, w.local_rank, w.world_size, w.local_world_size, w.num_nodes) == (5, 1, 8, 4, 2)
    assert (w.master_addr, w.master_port, w.launcher) == ("n1", 1234, "torchrun")


def test_srun_environment_without_wrapper():
    env = {"SLURM_PROCID": "9", "SLURM_LOCALID": "1", "SLURM_NTASKS": "16", "SLURM_NTASKS_PER_NODE": "8",
           "SLURM_JOB_NODELIST": "frontier[00012-00013]", "SLURM_JOB_ID": "1234567"}
    w = detect_world(env)
    assert (w.rank, w.local_rank, w.world_size, w.local_world_size) == (9, 1, 16, 8)
    assert w.master_addr == "frontier00012"
    assert w.master_port == 20000 + 1234567 % 20000  # per-job port: two jobs on a node do not collide
    assert w.launcher == "slurm" and not w.is_main


def test_srun_tasks_per_node_from_the_compact_form():
    assert tasks_per_node({"SLURM_TASKS_PER_NODE": "8(x2)"}) == 8
    assert tasks_per_node({"SLURM_TASKS_PER_NODE": "2"}) == 2
    assert tasks_per_node({}) is None
    w = detect_world({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_TASKS_PER_NODE": "2",
                      "SLURM_JOB_NODELIST": "localhost"})
    assert w.local_world_size == 2 and w.master_addr == "localhost"


def test_torchrun_wins_over_slurm_when_both_are_set():
    # torchrun inside an allocation: its own ranks are the truth.
    w = detect_world({"RANK": "1", "WORLD_SIZE": "2", "SLURM_PROCID": "0", "SLURM_NTASKS": "1"})
    assert (w.rank, w.world_size, w.launcher) == (1, 2, "torchrun")


def test_plain_process():
    w = detect_world({})
    assert (w.rank, w.world_size, w.launcher, w.is_main) == (0, 1, "single", True)


@pytest.mark.parametrize("nodelist, first", [
    ("frontier00012", "frontier00012"),
    ("frontier[00012-00015,00020]", "frontier00012"),
    ("frontier[00020,00012-00015]", "frontier00020"),
    ("a[1-2],b[3-4]", "a1"),
    ("nodeA,nodeB", "nodeA"),
    ("gpu[07-08]-ib", "gpu07-ib"),
])
def test_first_host_of_a_nodelist(nodelist, first):
    assert expand_first_host(nodelist) == first


@pytest.mark.parametrize("value, expected", [
    ("9.0a", "9.0"),                      # Hopper's arch-specific target, as CUDA images set it
    ("8.0 9.0a 10.0a+PTX", "8.0;9.0;10.0+PTX"),
    ("9.0;9.0a", "9.0"),                  # no entry twice
    ("7.5;8.6+PTX", "7.5;8.6+PTX"),       # already readable: unchanged
])
def test_the_arch_list_is_made_readable_for_deepspeeds_op_builder(value, expected):
    from forgepipe.distributed import op_build_arch_list

    assert op_build_arch_list(value) == expected
    assert all(int(part.split("+")[0]) >= 0 for cc in expected.split(";") for part in cc.split("."))  # its parse

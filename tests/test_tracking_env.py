"""The MLflow tags that tell a Frontier run from a workstation run: which image, which build."""

from __future__ import annotations

from forgepipe.distributed import World
from forgepipe.tracking import environment_tags


def test_the_image_names_itself_over_the_path_it_ran_from(monkeypatch):
    monkeypatch.setenv("APPTAINER_CONTAINER", "/mnt/bb/user/forge.sif")  # the job's node-local copy
    monkeypatch.setenv("FORGEPIPE_IMAGE", "/lustre/orion/proj/forge.sif")
    monkeypatch.setenv("FORGEPIPE_IMAGE_BUILD", "forgepipe-rocm commit=abc base=rocm/pytorch@sha256:1 torch=2.10.0")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    tags = environment_tags(World(world_size=2, local_world_size=2))
    assert tags["container_image"] == "/lustre/orion/proj/forge.sif"
    assert tags["image_build"].startswith("forgepipe-rocm commit=abc")
    assert (tags["slurm_job_id"], tags["world_size"], tags["device"]) == ("4242", "2", "cpu")
    assert "gpu_kind" not in tags  # no GPU here


def test_without_the_image_variable_the_container_path_is_kept(monkeypatch):
    for name in ("FORGEPIPE_IMAGE", "FORGEPIPE_IMAGE_BUILD", "SINGULARITY_CONTAINER"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("APPTAINER_CONTAINER", "/images/forge.sif")
    tags = environment_tags(World())
    assert tags["container_image"] == "/images/forge.sif" and "image_build" not in tags

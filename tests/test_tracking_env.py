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


def cfg_for(stage="sft", model="forge-s", zero=3, **deepspeed):
    from forgepipe.config import Config

    cfg = Config(stage=stage, output_dir="runs/out")
    cfg.model.name_or_path = model
    cfg.deepspeed.zero_stage = zero
    for key, value in deepspeed.items():
        setattr(cfg.deepspeed, key, value)
    return cfg


def test_run_names_say_stage_model_zero_and_ranks():
    from forgepipe.tracking import run_name_for

    sixteen = World(world_size=16, local_world_size=8)
    assert run_name_for(cfg_for(zeropp=True), sixteen) == "sft forge-s z3++ 16r"
    assert run_name_for(cfg_for("reward", "/scratch/out/sft/model", 2, offload="cpu"), World()) == "reward sft z2+off 1r"
    assert run_name_for(cfg_for("ppo", "out/sft", 3, quantized_weights=True), World()) == "ppo sft z3+qw 1r"
    assert run_name_for(cfg_for(), sixteen, stage="pipeline") == "pipeline forge-s z3 16r"
    named = cfg_for()
    named.tracking.run_name = "baseline"
    assert run_name_for(named, sixteen) == "baseline"


def test_run_tags_carry_stage_model_zero_and_absolute_directories(tmp_path, monkeypatch):
    from forgepipe.tracking import run_tags

    monkeypatch.chdir(tmp_path)
    tags = run_tags(cfg_for(zeropp=True))
    assert (tags["stage"], tags["model"], tags["zero"]) == ("sft", "forge-s", "z3++")
    assert tags["output_dir"] == str(tmp_path / "runs" / "out")
    assert tags["checkpoint_dir"] == str(tmp_path / "runs" / "out" / "checkpoints")


def test_metric_names_carry_the_stage():
    from forgepipe.tracking import stage_metric_name

    assert [stage_metric_name("sft", k) for k in ("train/loss", "eval/loss", "perf/tokens_per_s", "mem/x")] == \
        ["sft/loss", "sft/eval_loss", "perf/tokens_per_s", "mem/x"]
    assert [stage_metric_name("reward", k) for k in ("train/loss", "eval/accuracy")] == \
        ["reward/loss", "reward/eval_accuracy"]
    assert [stage_metric_name("ppo", k) for k in ("train/lr", "ppo/kl", "ppo/eval_score")] == \
        ["ppo/lr", "ppo/kl", "ppo/eval_score"]
    assert stage_metric_name(None, "train/loss") == "train/loss"


def test_a_store_named_relative_to_the_working_directory_becomes_absolute(tmp_path, monkeypatch):
    from forgepipe.tracking import resolve_tracking_uri

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri(None) == f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    assert resolve_tracking_uri("sqlite:///runs/m.db") == f"sqlite:///{tmp_path}/runs/m.db"
    assert resolve_tracking_uri("sqlite:////abs/m.db") == "sqlite:////abs/m.db"
    assert resolve_tracking_uri("store") == str(tmp_path / "store")
    assert resolve_tracking_uri("file:store") == (tmp_path / "store").as_uri()
    assert resolve_tracking_uri("http://mlflow:5000") == "http://mlflow:5000"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///env.db")
    assert resolve_tracking_uri(None) == f"sqlite:///{tmp_path}/env.db"


def test_files_forgepipe_writes_are_readable_by_the_group(tmp_path):
    import os
    import stat

    from forgepipe.layout import share_with_group
    from forgepipe.tracking import write_json_atomic

    before = os.umask(0o077)  # a user who shares nothing by default
    try:
        share_with_group()
        write_json_atomic(tmp_path / "forgepipe-run.json", {"a": 1})
        (tmp_path / "checkpoints").mkdir()
        after = os.umask(0o022)
    finally:
        os.umask(before)
    assert after == 0o027  # group may read and enter; write and others stay as the user had them
    assert stat.S_IMODE((tmp_path / "forgepipe-run.json").stat().st_mode) == 0o640
    assert stat.S_IMODE((tmp_path / "checkpoints").stat().st_mode) == 0o750


def test_an_export_written_0600_becomes_readable_by_the_group(tmp_path):
    import stat

    from forgepipe.tracking import share_tree

    export = tmp_path / "model"
    export.mkdir(mode=0o700)
    (export / "model.safetensors").write_bytes(b"x")
    (export / "model.safetensors").chmod(0o600)
    share_tree(export)
    assert stat.S_IMODE(export.stat().st_mode) == 0o750
    assert stat.S_IMODE((export / "model.safetensors").stat().st_mode) == 0o640

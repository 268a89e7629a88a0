"""Frontier job scripts: lint, the checks that stop a bad submission, and the --dry-run output.

The scripts run for real under bash. `sbatch` and `srun` are put on PATH as recorders only to
prove that nothing was submitted or launched when a setting is missing.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = ROOT / ".venv" / "bin"
SCRIPTS = sorted(
    [
        *ROOT.glob("scripts/frontier/*.sh"),
        *ROOT.glob("scripts/frontier/*.sbatch"),
        *ROOT.glob("scripts/ci/*.sh"),
        ROOT / "containers" / "build-args.sh",
    ]
)
SUBMIT = ROOT / "scripts" / "frontier" / "submit.sh"
DATA = ROOT / "examples" / "data" / "sample_pairs.jsonl"


def tool(name: str) -> str:
    path = BIN / name
    if not path.exists():
        path = shutil.which(name)
    if not path:
        pytest.skip(f"{name} is not installed (pip install -e '.[dev]')")
    return str(path)


@pytest.fixture
def recorder(tmp_path):
    """A PATH dir whose sbatch/srun/apptainer only record that they were called."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    log = tmp_path / "called"
    for name in ("sbatch", "srun", "apptainer"):
        script = bindir / name
        script.write_text(f'#!/bin/sh\necho "{name} $*" >> "{log}"\n')
        script.chmod(0o755)
    return bindir, log


def run(args, env_extra, bindir, cwd=None):
    env = {"PATH": f"{bindir}:{BIN}:/usr/bin:/bin", "HOME": os.environ.get("HOME", "/tmp"), "USER": "tester"}
    env.update(env_extra)
    return subprocess.run(
        ["bash", *map(str, args)], env=env, capture_output=True, text=True, cwd=cwd or ROOT, timeout=120
    )


@pytest.fixture
def image(tmp_path):
    sif = tmp_path / "forge.sif"
    sif.write_bytes(b"SIF")
    return sif


def full_settings(image, tmp_path):
    return {
        "ACCOUNT": "abc123",
        "IMAGE": str(image),
        "MODEL": str(tmp_path),
        "DATA": str(DATA),
        "OUTPUT_DIR": str(tmp_path / "out"),
    }


def test_shellcheck_every_script():
    assert len(SCRIPTS) >= 9
    out = subprocess.run(
        [tool("shellcheck"), "-x", *map(str, SCRIPTS)], capture_output=True, text=True, cwd=ROOT
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_hadolint_dockerfile():
    out = subprocess.run(
        [tool("hadolint"), "containers/Dockerfile.rocm"], capture_output=True, text=True, cwd=ROOT
    )
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize(
    ("stage", "drop", "message"),
    [
        ("sft", "ACCOUNT", "missing setting ACCOUNT"),
        ("sft", "IMAGE", "missing setting IMAGE"),
        ("sft", "MODEL", "missing setting MODEL"),
        ("reward", "DATA", "missing setting DATA"),
        ("pipeline", "OUTPUT_DIR", "missing setting OUTPUT_DIR"),
        ("ppo", "REWARD_MODEL", "missing setting REWARD_MODEL"),
        ("pipeline", "REWARD_MODEL", "missing setting REWARD_MODEL"),
    ],
)
def test_submit_names_the_missing_setting_and_submits_nothing(
    stage, drop, message, recorder, image, tmp_path
):
    bindir, log = recorder
    settings = {**full_settings(image, tmp_path), "REWARD_MODEL": str(tmp_path)}
    settings.pop(drop)
    out = run([SUBMIT, stage], settings, bindir)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [out.stderr.strip()]  # one line
    assert message in out.stderr
    assert not log.exists()


def test_submit_reports_a_missing_image_file_as_such(recorder, tmp_path, image):
    bindir, log = recorder
    settings = {**full_settings(image, tmp_path), "IMAGE": str(tmp_path / "nowhere" / "forge.sif")}
    out = run([SUBMIT, "sft"], settings, bindir)
    assert out.returncode == 2
    assert f"IMAGE: no image file at {tmp_path / 'nowhere' / 'forge.sif'}" in out.stderr
    assert not log.exists()


def test_batch_script_stops_before_srun_without_a_setting(recorder, image, tmp_path):
    bindir, log = recorder
    settings = {**full_settings(image, tmp_path), "FORGEPIPE_ROOT": str(ROOT), "SLURM_JOB_NUM_NODES": "1"}
    settings.pop("DATA")
    out = run([ROOT / "scripts" / "frontier" / "sft.sbatch"], settings, bindir, cwd=tmp_path)
    assert out.returncode == 2
    assert "missing setting DATA" in out.stderr
    assert not log.exists()


def test_batch_script_outside_the_checkout_asks_for_forgepipe_root(recorder, tmp_path):
    bindir, _ = recorder
    out = run(
        [ROOT / "scripts" / "frontier" / "reward.sbatch"],
        {"SLURM_SUBMIT_DIR": str(tmp_path)},
        bindir,
        cwd=tmp_path,
    )
    assert out.returncode == 2
    assert "missing setting FORGEPIPE_ROOT" in out.stderr


def test_submit_runs_sbatch_with_the_settings(recorder, image, tmp_path):
    bindir, log = recorder
    settings = {
        **full_settings(image, tmp_path),
        "NODES": "4",
        "WALLTIME": "01:30:00",
        "LOG_DIR": str(tmp_path),
    }
    out = run([SUBMIT, "sft", "--lr", "1e-5"], settings, bindir)
    assert out.returncode == 0, out.stderr
    (call,) = log.read_text().splitlines()
    assert call.startswith(
        "sbatch -A abc123 -N 4 -t 01:30:00 -J forgepipe-sft --ntasks-per-node=8 --cpus-per-task=7 "
    )
    assert call.endswith(f"{ROOT}/scripts/frontier/sft.sbatch --lr 1e-5")


def dry_run(settings, bindir, *args, stage="sft"):
    out = run([SUBMIT, stage, "--dry-run", *args], settings, bindir)
    lines = out.stdout.splitlines()
    srun = next((line for line in lines if line.startswith("srun ")), None)
    return out, srun


def test_dry_run_prints_the_container_srun_line_and_the_resolved_config(image, tmp_path):
    pytest.importorskip("forgepipe.cli")
    bindir = tmp_path / "empty"  # no apptainer here: config resolved by the forgepipe on PATH
    bindir.mkdir()
    settings = {**full_settings(image, tmp_path), "NODES": "2"}
    out, srun = dry_run(settings, bindir, "--max-steps", "3")
    assert out.returncode == 0, out.stderr
    assert re.fullmatch(
        r"srun -N 2 -n 16 --ntasks-per-node=8 -c7 --cpu-bind=cores --kill-on-bad-exit=1 --gpus-per-node=8 "
        rf"--gpu-bind=none apptainer exec --rocm --bind \S+ {re.escape(str(image))} forgepipe sft "
        rf"--model {re.escape(str(tmp_path))} --data {re.escape(str(DATA))} --output-dir \S+/out --max-steps 3",
        srun,
    ), srun
    binds = srun.split("--bind ")[1].split()[0].split(",")
    assert str(DATA.parent) in binds and str(tmp_path) in binds
    # The config is resolved for the job's world, not this one process.
    assert re.search(r"^\s+world_size: 16$", out.stdout, flags=re.M)
    assert re.search(r"^\s+max_steps: 3$", out.stdout, flags=re.M)


def test_dry_run_direct_cpu_shape_has_no_gpu_flags(tmp_path, image):
    pytest.importorskip("forgepipe.cli")
    settings = {
        **full_settings(image, tmp_path),
        "FORGEPIPE_LAUNCHER": "direct",
        "FORGEPIPE_DEVICE": "cpu",
        "GPUS_PER_NODE": "2",
        "CPUS_PER_TASK": "1",
    }
    settings.pop("IMAGE")
    out, srun = dry_run(settings, tmp_path)
    assert out.returncode == 0, out.stderr
    assert srun.startswith(
        "srun -N 1 -n 2 --ntasks-per-node=2 -c1 --cpu-bind=cores --kill-on-bad-exit=1 forgepipe sft "
    )
    assert "--gpu" not in srun and "apptainer" not in srun


def test_zeropp_defaults_hpz_to_the_gpus_of_a_node(image, tmp_path):
    settings = {**full_settings(image, tmp_path), "ZEROPP": "1", "GPUS_PER_NODE": "4"}
    _, srun = dry_run(settings, tmp_path)
    assert srun.endswith("--zeropp --hpz-size 4")
    _, srun = dry_run({**settings, "ZEROPP": "0"}, tmp_path, "--zeropp", "--hpz-size", "2")
    assert srun.endswith("--zeropp --hpz-size 2") and srun.count("--hpz-size") == 1


def test_qgz_is_refused_when_each_rank_sees_one_gcd(image, tmp_path):
    settings = {**full_settings(image, tmp_path), "FORGEPIPE_GPU_BIND": "closest"}
    out, srun = dry_run(settings, tmp_path, "--zeropp")
    assert out.returncode == 2 and srun is None
    assert "qgZ" in out.stderr and "FORGEPIPE_GPU_BIND=all" in out.stderr
    # hpZ and qwZ alone are fine under the one-GCD binding.
    _, srun = dry_run(settings, tmp_path, "--zeropp", "--no-quantized-gradients")
    assert "--gpu-bind=closest" in srun

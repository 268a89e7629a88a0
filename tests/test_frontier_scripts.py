"""Frontier job scripts: lint, the checks that stop a bad submission, and the --dry-run output.

The scripts run for real under bash. `sbatch` and `srun` are put on PATH as recorders only to
prove that nothing was submitted or launched when a setting is missing.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
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


# --- Walltime: the batch script's stop-and-resubmit logic, with srun and sbatch as stand-ins ---------


@pytest.fixture
def job(tmp_path):
    """Run sft.sbatch as Slurm would (job 4242) with a stand-in srun; sbatch records its calls."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    calls = tmp_path / "calls"
    (bindir / "sbatch").write_text(
        f'#!/bin/sh\necho "sbatch $* RESUME=$RESUME COUNT=$FORGEPIPE_RESUBMIT_COUNT" >> "{calls}"\n'
        'echo "Submitted batch job 4243"\n'
    )
    # srun: writes a checkpoint marker (unless FAKE_SRUN_CKPT=0) and exits with $FAKE_SRUN_RC, or,
    # with FAKE_SRUN_WAIT=1, runs until SIGUSR1 and then exits with $FAKE_SRUN_RC as forgepipe's stop does.
    (bindir / "srun").write_text(
        f'#!/bin/bash\necho "srun $*" >> "{calls}"\n'
        'if [[ "${FAKE_SRUN_CKPT:-1}" == 1 ]]; then\n'
        '    mkdir -p "$OUTPUT_DIR/checkpoints" && echo \'{"tag": "step-00000001"}\' > "$OUTPUT_DIR/checkpoints/latest"\n'
        "fi\n"
        'if [[ "${FAKE_SRUN_WAIT:-0}" == 1 ]]; then\n'
        f'    trap \'echo "srun got USR1" >> "{calls}"; exit "$FAKE_SRUN_RC"\' USR1\n'
        f'    echo started > "{tmp_path}/srun-started"\n'
        "    while :; do sleep 0.05; done\n"
        "fi\n"
        'exit "$FAKE_SRUN_RC"\n'
    )
    for name in ("sbatch", "srun"):
        (bindir / name).chmod(0o755)
    settings = {
        "PATH": f"{bindir}:/usr/bin:/bin",
        "HOME": os.environ.get("HOME", "/tmp"),
        "USER": "tester",
        "FORGEPIPE_ROOT": str(ROOT),
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NUM_NODES": "1",
        "FORGEPIPE_LAUNCHER": "direct",
        "FORGEPIPE_DEVICE": "cpu",
        "GPUS_PER_NODE": "2",
        "CPUS_PER_TASK": "1",
        "ACCOUNT": "abc123",
        "WALLTIME": "00:30:00",
        "LOG_DIR": str(tmp_path),
        "SBATCH_ARGS": "--wait -p batch",
        "MODEL": str(tmp_path),
        "DATA": str(DATA),
        "OUTPUT_DIR": str(tmp_path / "out"),
    }

    def start(rc: int, *args: str, wait: bool = False, **extra: str) -> subprocess.Popen:
        env = {**settings, "FAKE_SRUN_RC": str(rc), "FAKE_SRUN_WAIT": "1" if wait else "0", **extra}
        return subprocess.Popen(
            ["bash", str(ROOT / "scripts" / "frontier" / "sft.sbatch"), *args],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=tmp_path,
            start_new_session=True,
        )

    def sbatch_calls() -> list[str]:
        lines = calls.read_text().splitlines() if calls.exists() else []
        return [line for line in lines if line.startswith("sbatch ")]

    return start, sbatch_calls, calls, tmp_path


def finish(proc: subprocess.Popen) -> tuple[int, str]:
    try:
        out, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the script and its stand-in srun
        out, err = proc.communicate()
    return proc.returncode, out + err


def test_a_run_stopped_with_85_resubmits_the_job_after_itself(job):
    start, sbatch_calls, _, _ = job
    code, out = finish(start(85, "--lr", "1e-5", "--resume", "never", RESUME="never"))
    assert code == 85, out
    (call,) = sbatch_calls()
    assert call.startswith(
        "sbatch -A abc123 -N 1 -t 00:30:00 -J forgepipe-sft --ntasks-per-node=2 --cpus-per-task=1 "
    )
    # The same settings and arguments, after this job, continuing from the checkpoint; no --wait.
    assert call.endswith(
        f"-p batch --dependency=afterany:4242 {ROOT}/scripts/frontier/sft.sbatch --lr 1e-5 "
        "RESUME=auto COUNT=1"
    ), call
    assert "--wait" not in call and "never" not in call
    assert "resubmitting (1 of at most 10)" in out


@pytest.mark.parametrize(
    ("rc", "extra", "resubmitted"),
    [
        (0, {}, False),  # finished
        (1, {}, False),  # failed, with no stop asked for: a person should look
        (2, {}, False),
        (85, {"FORGEPIPE_RESUBMIT_COUNT": "3", "FORGEPIPE_MAX_RESUBMITS": "3"}, False),  # the chain's limit
        (85, {"FORGEPIPE_MAX_RESUBMITS": "0"}, False),  # resubmission off
        (85, {"FORGEPIPE_RESUBMIT_COUNT": "2", "FORGEPIPE_MAX_RESUBMITS": "3"}, True),
        (85, {"FAKE_SRUN_CKPT": "0"}, False),  # no checkpoint in this job: the next would fare no better
    ],
)
def test_only_a_stopped_run_is_resubmitted_and_only_up_to_the_limit(job, rc, extra, resubmitted):
    start, sbatch_calls, _, _ = job
    code, out = finish(start(rc, **extra))
    assert code == rc, out
    assert bool(sbatch_calls()) == resubmitted, out
    if rc == 85 and not resubmitted:
        assert "not resubmitting" in out and code == 85
    if resubmitted:
        assert sbatch_calls()[0].endswith("COUNT=3")


@pytest.mark.parametrize("srun_rc", [85, 143, 138])
def test_the_walltime_warning_reaches_srun_and_the_job_continues(job, srun_rc):
    """--signal=B:USR1 signals the batch shell only: it must pass the signal to srun (which
    forwards it to the ranks) and resubmit, whether srun reports 85 or a rank it ended (143) or
    one that died of the signal while starting (138)."""
    start, sbatch_calls, calls, tmp_path = job
    proc = start(srun_rc, wait=True)
    deadline = time.monotonic() + 30
    while not (tmp_path / "srun-started").exists():
        assert time.monotonic() < deadline and proc.poll() is None, finish(proc)
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)
    code, out = finish(proc)
    assert code == 85, out  # the job's own status: stopped, to be continued
    assert "srun got USR1" in calls.read_text()
    assert "walltime warning (SIGUSR1)" in out and len(sbatch_calls()) == 1, out


def test_a_warning_after_the_run_finished_is_not_a_stop(job):
    start, sbatch_calls, _, tmp_path = job
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    # srun "finishes" the run (writes the run file), then is killed by the late warning.
    srun = tmp_path / "bin" / "srun"
    srun.write_text(
        srun.read_text().replace("    while :;", f'    touch "{out_dir}/forgepipe-run.json"\n    while :;')
    )
    proc = start(138, wait=True)
    deadline = time.monotonic() + 30
    while not (tmp_path / "srun-started").exists():
        assert time.monotonic() < deadline and proc.poll() is None, finish(proc)
        time.sleep(0.05)
    time.sleep(0.2)
    proc.send_signal(signal.SIGUSR1)
    code, out = finish(proc)
    assert code == 138 and not sbatch_calls(), out


@pytest.mark.parametrize(
    ("settings", "lead"),
    [
        ({}, 600),  # WALLTIME 02:00:00: 10 minutes, time to checkpoint a large model
        ({"WALLTIME": "10"}, 120),  # a fifth of a short walltime, else the warning would come at once
        ({"WALLTIME": "1-00:00:00"}, 600),
        ({"WALLTIME": "1:30"}, 18),
        ({"WALLTIME": "10", "FORGEPIPE_SIGNAL_LEAD": "900"}, 900),
    ],
)
def test_submit_asks_for_the_warning_and_exports_what_a_resubmission_needs(
    recorder, image, tmp_path, settings, lead
):
    bindir, log = recorder
    (bindir / "sbatch").write_text(
        f'#!/bin/sh\necho "sbatch $* WALLTIME=$WALLTIME LOG_DIR=$LOG_DIR" >> "{log}"\n'
    )
    out = run([SUBMIT, "sft"], {**full_settings(image, tmp_path), **settings}, bindir, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    (call,) = log.read_text().splitlines()
    walltime = settings.get("WALLTIME", "02:00:00")
    assert f" -t {walltime} " in call and f" --signal=B:USR1@{lead} " in call
    assert call.endswith(f"WALLTIME={walltime} LOG_DIR={tmp_path}")


def test_batch_scripts_ask_for_the_warning_when_submitted_with_plain_sbatch():
    for name in ("sft", "reward", "ppo", "pipeline"):
        head = (ROOT / "scripts" / "frontier" / f"{name}.sbatch").read_text().split("\nset ")[0]
        assert "#SBATCH --signal=B:USR1@600" in head, name

"""A job that meets its walltime continues in a new job: on the localhost Slurm cluster.

The project's sft.sbatch is submitted through submit.sh (direct launcher, 2 CPU ranks). Once it
trains, its time limit is cut to the next minute or two: Slurm then sends the `--signal` warning
(B:USR1, 60 s ahead) to the batch shell, which passes it to the ranks through srun; forgepipe
checkpoints and exits 85, the script resubmits itself with `--dependency=afterany:<job>`, and the
second job (with the original limit) resumes and finishes the run.

Why cut the limit of a running job instead of submitting with a 1-minute one: slurmctld checks
time limits on a 30 s tick, so the warning comes up to 30 s late, and with a fixed limit how far
the first job gets (and whether the second can finish) would depend on that tick and the machine's
speed. Waiting until the first job trains, then cutting its limit, makes both certain.
"""

from __future__ import annotations

import math
import os
import re
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest
from test_slurm_launch import BIN, DATA, ROOT, cluster_up

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

STEPS = 2000  # more than the first job can do before its warning (<= 30 s at ~40 steps/s here, idle)
LEAD = 100  # seconds of warning before the walltime


@pytest.fixture(scope="module")
def slurm():
    reason = cluster_up()
    if reason:
        pytest.skip(reason)


def logged_step(db: Path) -> int:
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1) as con:
            row = con.execute("SELECT max(step) FROM metrics WHERE key = 'sft/loss'").fetchone()
    except sqlite3.OperationalError:
        return -1
    return row[0] if row and row[0] is not None else -1


def job_field(job_id: str, field: str) -> str | None:
    """A field of `scontrol show job` (Slurm keeps finished jobs for MinJobAge, 300 s by default)."""
    out = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True).stdout
    match = re.search(rf"\b{field}=(\S+)", out)
    return match.group(1) if match else None


def elapsed_seconds(job_id: str) -> int:
    out = subprocess.run(
        ["squeue", "-h", "-j", job_id, "-o", "%M"], capture_output=True, text=True
    ).stdout.strip()
    parts = [int(p) for p in re.split(r"[-:]", out)] if out else [0]
    seconds = 0
    for p in parts:
        seconds = seconds * 60 + p
    return seconds


def until(predicate, timeout: float, what: str, logs) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}:\n{logs()}")


def test_walltime_warning_checkpoints_resubmits_and_the_next_job_finishes(slurm, tmp_path):
    from forgepipe.models.tiny import make_tiny_model

    model = make_tiny_model(tmp_path / "tiny")
    db, out = tmp_path / "mlflow.db", tmp_path / "sft"
    env = {
        "PATH": f"{BIN}:/usr/bin:/bin",
        "HOME": os.environ.get("HOME", "/tmp"),
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
        "ACCOUNT": "ci",
        "NODES": "1",
        "WALLTIME": "6",  # minutes: the second job has time to finish
        "FORGEPIPE_SIGNAL_LEAD": str(LEAD),
        "FORGEPIPE_MAX_RESUBMITS": "2",
        "FORGEPIPE_LAUNCHER": "direct",
        "FORGEPIPE_DEVICE": "cpu",
        "GPUS_PER_NODE": "2",
        "CPUS_PER_TASK": "1",
        "MODEL": str(model),
        "DATA": str(DATA),
        "OUTPUT_DIR": str(out),
        "TRACKING_URI": f"sqlite:///{db}",
        "LOG_DIR": str(tmp_path),
        "RESUME": "never",  # the first job starts afresh; its resubmission must continue (auto)
    }
    submit = subprocess.run(
        [
            "bash",
            str(ROOT / "scripts" / "frontier" / "submit.sh"),
            "sft",
            "--torch-adam",
            "--dtype",
            "fp32",
            "--zero-stage",
            "2",
            "--per-device-batch-size",
            "1",
            "--epochs",
            "100",
            "--max-steps",
            str(STEPS),
            "--max-seq-len",
            "128",
            "--log-every",
            "1",
            "--save-every-minutes",
            "0",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert submit.returncode == 0, submit.stdout + submit.stderr
    first = re.search(r"Submitted batch job (\d+)", submit.stdout).group(1)
    log1 = tmp_path / f"forgepipe-sft-{first}.out"

    def logs() -> str:
        return "\n".join(
            f"== {p.name}\n" + p.read_text(errors="replace").replace("\r", "\n")[-3000:]
            for p in sorted(tmp_path.glob("forgepipe-sft-*.out"))
        )

    try:
        until(lambda: logged_step(db) >= 3, 150, "the first job to train 3 steps", logs)
        # Cut the limit to the first whole minute 40 s or more ahead: then the warning threshold
        # (LEAD s before the end) has passed and the warning comes at the next tick, and the end
        # is at least one tick (30 s) after it, time enough to checkpoint and resubmit.
        limit = math.ceil((elapsed_seconds(first) + 40) / 60)
        subprocess.run(["scontrol", "update", f"JobId={first}", f"TimeLimit={limit}"], check=True)
        second = until(
            lambda: (
                (m := re.search(r"Submitted batch job (\d+)", log1.read_text(errors="replace")))
                and m.group(1)
            ),
            150,
            "the first job to resubmit itself",
            logs,
        )
        until(
            lambda: job_field(second, "JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"),
            240,
            "the second job to end",
            logs,
        )
    finally:
        ids = [p.name.split("-")[-1].split(".")[0] for p in tmp_path.glob("forgepipe-sft-*.out")]
        subprocess.run(["scancel", first, *ids], capture_output=True)

    text1 = log1.read_text(errors="replace")
    stopped = re.search(r"stopped by signal 10 at step (\d+)", text1)
    assert stopped, logs()
    assert "walltime warning (SIGUSR1)" in text1, logs()
    # 85, or 143 when srun (--kill-on-bad-exit) ended a rank that had not exited yet.
    assert re.search(r"the run stopped before the end \(exit (85|143)\)", text1), logs()
    assert f"--dependency=afterany:{first} " in text1 and "(1 of at most 2)" in text1, logs()
    assert job_field(first, "JobState") == "FAILED" and job_field(first, "ExitCode") == "85:0", logs()

    text2 = (tmp_path / f"forgepipe-sft-{second}.out").read_text(errors="replace")
    assert "--resume auto" in text2 and "--resume never" not in text2, logs()
    assert (
        f"resumed from {out}/checkpoints/step-{int(stopped.group(1)):08d} at step {stopped.group(1)}" in text2
    )
    assert "resubmitting" not in text2 and "walltime warning" not in text2
    assert job_field(second, "JobState") == "COMPLETED" and job_field(second, "ExitCode") == "0:0", logs()
    assert (out / "forgepipe-run.json").is_file() and (out / "model" / "model.safetensors").is_file()

    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{db}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED" and run.data.tags["world_size"] == "2"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "sft/loss")]
    assert sorted(steps) == list(range(1, STEPS + 1))  # each step once, over both jobs

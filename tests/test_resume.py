"""Surviving walltime limits and failures: stop on a signal, die with kill -9, resume, and end up
exactly where an uninterrupted run with the same seed ends up (weights, loss curve, one MLflow run).

Ranks are started the way srun starts them on Frontier: one process per rank, no torchrun in
between, so each process's own exit status and signals are visible to the test. (torchrun would
forward a SIGTERM to its workers but report its own status, not their 85.)
"""

from __future__ import annotations

import json
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import SAMPLE_DOCS, SAMPLE_PAIRS, child_env, mlflow_run

pytestmark = pytest.mark.slow

EXIT_PREEMPTED = 85
STEPS = 64  # 65 training samples / (2 ranks x 1 x grad_accum 2) = 16 steps an epoch, 4 epochs
WORLD = 2
REWARD_STEPS = 40


def reward_args(model: Path, out: Path, *extra: str) -> list[str]:
    """Stage 2 under ZeRO-3: each rank's checkpoint holds only its partition."""
    return [
        "reward",
        "--model",
        str(model),
        "--data",
        str(SAMPLE_PAIRS),
        "--data-split",
        "0,1,0",
        "--output-dir",
        str(out),
        "--tracking-uri",
        f"sqlite:///{out}.db",
        "--dtype",
        "fp32",
        "--torch-adam",
        "--zero-stage",
        "3",
        "--per-device-batch-size",
        "2",
        "--lr",
        "1e-3",
        "--max-steps",
        str(REWARD_STEPS),
        "--eval-every",
        "15",
        "--seed",
        "3",
        "--log-every",
        "1",
        *extra,
    ]


def sft_args(model: Path, out: Path, *extra: str) -> list[str]:
    return [
        "sft",
        "--model",
        str(model),
        "--data",
        str(SAMPLE_PAIRS),
        "--data",
        str(SAMPLE_DOCS),
        "--data-split",  # the sft share, as before stages read all their data by default
        "2,4,4",
        "--output-dir",
        str(out),
        "--tracking-uri",
        f"sqlite:///{out}.db",
        "--dtype",
        "fp32",
        "--torch-adam",
        "--zero-stage",
        "2",
        "--per-device-batch-size",
        "1",
        "--grad-accum",
        "2",
        "--epochs",
        "4",
        "--lr",
        "2e-3",
        "--warmup-ratio",
        "0.1",
        "--max-seq-len",
        "128",
        "--seed",
        "5",
        "--log-every",
        "1",
        *extra,
    ]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Job:
    """WORLD rank processes of one forgepipe command, rank r logging to <out>.<attempt>.rank<r>.log."""

    def __init__(self, args: list[str], out: Path, attempt: str):
        port = str(free_port())
        self.logs = [out.parent / f"{out.name}.{attempt}.rank{r}.log" for r in range(WORLD)]
        self.procs = []
        for rank, log in enumerate(self.logs):
            env = child_env(
                {
                    "RANK": str(rank),
                    "LOCAL_RANK": str(rank),
                    "WORLD_SIZE": str(WORLD),
                    "LOCAL_WORLD_SIZE": str(WORLD),
                    "MASTER_ADDR": "127.0.0.1",
                    "MASTER_PORT": port,
                }
            )
            with open(log, "w") as f:
                self.procs.append(
                    subprocess.Popen(
                        [sys.executable, "-m", "forgepipe.cli", *args],
                        env=env,
                        stdout=f,
                        stderr=subprocess.STDOUT,
                    )
                )

    def wait(self, timeout: float = 300) -> list[int]:
        deadline = time.monotonic() + timeout
        codes = []
        for p in self.procs:
            try:
                codes.append(p.wait(timeout=max(1.0, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                p.kill()
                codes.append(p.wait())
        return codes

    def log(self, rank: int = 0) -> str:
        return self.logs[rank].read_text(errors="replace")

    def wait_for_step(self, db: Path, step: int, timeout: float = 180) -> int:
        """Poll the MLflow store until the stage's loss has reached `step`; returns the step seen."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(p.poll() is not None for p in self.procs):
                raise AssertionError(f"a rank ended before step {step}:\n{self.log()[-3000:]}")
            seen = logged_step(db)
            if seen >= step:
                return seen
            time.sleep(0.05)
        raise AssertionError(f"step {step} not reached in {timeout}s:\n{self.log()[-3000:]}")


def logged_step(db: Path) -> int:
    if not db.is_file():
        return -1
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1) as con:
            row = con.execute("SELECT max(step) FROM metrics WHERE key IN ('sft/loss', 'reward/loss')").fetchone()
    except sqlite3.OperationalError:  # the store is still being created
        return -1
    return row[0] if row and row[0] is not None else -1


def run_job(args, out, attempt) -> tuple[Job, list[int]]:
    job = Job(args, out, attempt)
    return job, job.wait()


def weights(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(out / "model" / "model.safetensors")


def history(out: Path) -> dict[str, dict[int, float]]:
    """Every metric of the one run in the store, as step -> value; a duplicated step fails here."""
    client, run = mlflow_run(Path(f"{out}.db"))
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1, [r.info.run_id for r in runs]
    assert run.info.status == "FINISHED" and run.data.tags["world_size"] == str(WORLD)
    curves = {}
    for key in run.data.metrics:
        points = client.get_metric_history(run.info.run_id, key)
        steps = [m.step for m in points]
        assert len(steps) == len(set(steps)), f"{key}: duplicated steps {sorted(steps)}"
        curves[key] = {m.step: m.value for m in points}
    return curves


def assert_same_result(out: Path, ref: Path, steps: int = STEPS) -> None:
    got, want = weights(out), weights(ref)
    assert got.keys() == want.keys()
    for name in want:
        assert torch.allclose(got[name], want[name], atol=1e-5, rtol=0), name
    got_curves, want_curves = history(out), history(ref)
    assert got_curves.keys() == want_curves.keys()
    for key in want_curves:
        if key.startswith(("perf/", "mem/")):  # wall-clock rates and process memory vary run to run
            continue
        assert sorted(got_curves[key]) == sorted(want_curves[key]), key
        for step, value in want_curves[key].items():
            assert got_curves[key][step] == pytest.approx(value, rel=1e-5, abs=1e-6), (key, step)
    loss = next(k for k in got_curves if k in ("sft/loss", "reward/loss"))
    assert sorted(got_curves[loss]) == list(range(1, steps + 1))


def resumed_step(log: str) -> int:
    lines = [line for line in log.splitlines() if "resumed from" in line]
    assert len(lines) == 1, log[-3000:]
    return int(lines[0].rsplit("at step ", 1)[1])


@pytest.fixture(scope="module")
def reference(tiny_model, tmp_path_factory) -> Path:
    """The uninterrupted run every interrupted one must reproduce."""
    out = tmp_path_factory.mktemp("reference") / "sft"
    job, codes = run_job(sft_args(tiny_model, out), out, "run")
    assert codes == [0, 0], job.log()[-3000:]
    return out


def test_sigterm_checkpoints_exits_85_and_resumes_to_the_same_result(tiny_model, reference, tmp_path):
    out, db = tmp_path / "sft", tmp_path / "sft.db"
    args = sft_args(tiny_model, out)
    job = Job(args, out, "first")
    job.wait_for_step(db, 3)
    for p in job.procs:  # what Slurm does at the walltime warning: every task gets the signal
        p.send_signal(signal.SIGTERM)
    codes = job.wait()
    assert codes == [EXIT_PREEMPTED, EXIT_PREEMPTED], job.log()[-3000:]
    assert "stopped by signal 15 at step" in job.log() and "resubmit to continue" in job.log()
    stopped_at = int(job.log().split("stopped by signal 15 at step ")[1].split(";")[0])
    assert 3 <= stopped_at < STEPS
    marker = json.loads((out / "checkpoints" / "latest").read_text())
    assert marker == {"tag": f"step-{stopped_at:08d}"}
    assert not (out / "model").exists() and not (out / "forgepipe-run.json").exists()

    again, codes = run_job(args, out, "resumed")  # the same command: --resume auto is the default
    assert codes == [0, 0], again.log()[-3000:]
    assert resumed_step(again.log()) == stopped_at
    assert_same_result(out, reference)


def test_kill_9_of_one_rank_resumes_from_the_last_complete_checkpoint(tiny_model, reference, tmp_path):
    out, db = tmp_path / "sft", tmp_path / "sft.db"
    args = sft_args(tiny_model, out, "--save-every", "4")
    job = Job(args, out, "first")
    job.wait_for_step(db, 10)
    job.procs[1].kill()  # SIGKILL: no handler, no checkpoint; the other rank's collectives fail
    codes = job.wait(timeout=120)
    assert codes[1] == -signal.SIGKILL and codes[0] != 0, (codes, job.log()[-3000:])
    logged = logged_step(db)
    latest = json.loads((out / "checkpoints" / "latest").read_text())["tag"]
    complete = int(latest.removeprefix("step-"))
    assert complete % 4 == 0 and 8 <= complete <= logged < STEPS, (complete, logged)

    # What a kill in the middle of writing leaves, and a directory that lost its loop state.
    root = out / "checkpoints"
    (root / ".partial-step-99999999" / "model").mkdir(parents=True)
    (root / "step-99999998" / "model").mkdir(parents=True)

    again, codes = run_job(args, out, "resumed")
    assert codes == [0, 0], again.log()[-3000:]
    assert resumed_step(again.log()) == complete  # not the planted ones, not the last step logged
    assert not list(root.glob(".partial-*"))  # pruned at the first save
    assert sorted(p.name for p in root.iterdir() if p.is_dir())[-1] == "step-99999998"  # ignored, never used
    assert json.loads((root / "latest").read_text()) == {"tag": f"step-{STEPS:08d}"}
    assert_same_result(out, reference)


def test_reward_zero3_stops_when_one_rank_is_signalled_and_resumes_to_the_same_result(tiny_model, tmp_path):
    """SIGUSR1 to rank 1 only: the ranks agree (all-reduce) and both stop at the same step."""
    ref = tmp_path / "reference"
    job, codes = run_job(reward_args(tiny_model, ref), ref, "run")
    assert codes == [0, 0], job.log()[-3000:]

    out, db = tmp_path / "reward", tmp_path / "reward.db"
    args = reward_args(tiny_model, out)
    job = Job(args, out, "first")
    job.wait_for_step(db, 3)
    job.procs[1].send_signal(signal.SIGUSR1)
    codes = job.wait()
    assert codes == [EXIT_PREEMPTED, EXIT_PREEMPTED], job.log()[-3000:]
    stopped_at = int(job.log(1).split("stopped by signal 10 at step ")[1].split(";")[0])
    assert f"stopped by a signal to another rank at step {stopped_at};" in job.log(0)
    assert 3 <= stopped_at < REWARD_STEPS

    again, codes = run_job(args, out, "resumed")
    assert codes == [0, 0], again.log()[-3000:]
    assert resumed_step(again.log()) == stopped_at
    assert_same_result(out, ref, REWARD_STEPS)


@pytest.mark.parametrize(
    ("extra", "nproc", "culprit"),
    [
        (["--seed", "6"], WORLD, "--seed cannot change on resume"),
        ([], 1, "with 1 ranks set --per-device-batch-size and --grad-accum so that ranks x batch x accumulation = 4"),
    ],
)
def test_a_changed_config_is_refused_on_resume(tiny_model, reference, tmp_path, extra, nproc, culprit):
    import shutil

    out = tmp_path / "sft"
    shutil.copytree(reference, out)
    shutil.copy(f"{reference}.db", f"{out}.db")
    before = sorted(p.name for p in (out / "checkpoints").iterdir())
    args = sft_args(tiny_model, out, *extra)
    if nproc == 1:
        proc = subprocess.run(
            [sys.executable, "-m", "forgepipe.cli", *args],
            env=child_env(),
            capture_output=True,
            text=True,
            timeout=300,
        )
        code, log = proc.returncode, proc.stderr
    else:
        job, codes = run_job(args, out, "changed")
        code, log = codes[0], job.log()
        assert codes == [2, 2], log[-3000:]
    errors = [line for line in log.splitlines() if "error" in line.lower() or "Traceback" in line]
    assert code == 2 and len(errors) == 1, log[-3000:]
    assert errors[0].startswith("forgepipe: error: --") and culprit in errors[0]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == before


def test_config_changes_ignore_keys_of_another_forgepipe_version():
    from forgepipe.preflight import config_changes

    old = {"train.lr": 1e-3, "train.seed": 1, "ppo.hybrid_engine": False}  # a key since removed
    new = {"train.lr": 2e-3, "train.seed": 2, "dpo.beta": 0.1}  # a key added since
    honoured, refused = config_changes(old, new)
    assert honoured == {"train.lr": (1e-3, 2e-3)}
    assert refused == {"train.seed": (1, 2)}


def mlflow_record(db: Path) -> dict[str, list]:
    """Everything the store holds about its runs: status and times, tags, params, every metric point."""
    with sqlite3.connect(db) as con:
        return {table: sorted(con.execute(query).fetchall()) for table, query in {
            "runs": "SELECT run_uuid, status, start_time, end_time, lifecycle_stage FROM runs",
            "tags": "SELECT run_uuid, key, value FROM tags",
            "params": "SELECT run_uuid, key, value FROM params",
            "metrics": "SELECT run_uuid, key, step, timestamp, value FROM metrics",
        }.items()}


def test_the_same_command_on_a_finished_run_does_nothing(tiny_model, reference, tmp_path):
    """The finished run's own command again (the default --resume auto), at its 2 ranks: one line,
    exit 0 on every rank before DeepSpeed starts; its checkpoint, export, run file, config and MLflow
    record (status, end time, tags, metrics) untouched. (A larger --max-steps still extends a run:
    test_checkpoint_faults.py.)"""
    import shutil

    out = tmp_path / "sft"
    shutil.copytree(reference, out)  # copy2: the modification times come along
    shutil.copy(f"{reference}.db", f"{out}.db")
    files = {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in out.rglob("*") if p.is_file()}
    assert any(p.parent.name == "model" for p in files) and (out / "checkpoints" / f"step-{STEPS:08d}").is_dir()
    record = mlflow_record(Path(f"{out}.db"))

    job, codes = run_job(sft_args(tiny_model, out), out, "again")
    assert codes == [0, 0], job.log()[-3000:]
    said = [line for line in job.log(0).splitlines() if line.strip()]
    assert said == [f"forgepipe: {out} already finished at step {STEPS}: nothing to do; more --epochs (than 4) "
                    f"extend it, --overwrite starts afresh (its model: {out / 'model'})"], job.log()[-3000:]
    assert not job.log(1).strip()
    assert {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in out.rglob("*") if p.is_file()} == files
    assert mlflow_record(Path(f"{out}.db")) == record

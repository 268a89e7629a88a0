"""One run at a time in an output directory (issue 22 item 12), and file locks probed before a run
relies on them (item 9). Fast: the lock functions by hand, a real second process holding the lock
(and one killed with SIGKILL), and one CLI call refused before any model is loaded."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import SAMPLE_PAIRS, child_env

from forgepipe.errors import ForgeError
from forgepipe.layout import LOCK_FILE
from forgepipe.lock import OutputLock, check_locking, flock_problem, held_by, holder_record, mount_of

HOLDER = r"""
import sys, time
from forgepipe.lock import OutputLock, holder_record
lock = OutputLock.acquire(sys.argv[1], holder_record("sft"))
if len(sys.argv) > 2:  # a run with an MLflow run, as StageContext.begin records it
    from forgepipe.distributed import World
    from forgepipe.tracking import Tracker
    tracker = Tracker.start(world=World(), uri=sys.argv[2], experiment="e", run_name="killed", tags={"stage": "sft"})
    lock.update(run_id=tracker.run_id, tracking_uri=tracker.uri)
    print("READY", tracker.run_id, flush=True)
else:
    print("READY held", flush=True)
time.sleep(600)
"""


def hold(directory: Path, *uri: str) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(directory), *uri], env=child_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:  # DeepSpeed's import prints to stdout first
        if line.startswith("READY "):
            return proc, line.split()[1]
    raise AssertionError(proc.stderr.read()[-2000:])


def test_a_second_holder_is_refused_naming_the_first_and_the_file_goes_with_the_lock(tmp_path):
    out = tmp_path / "run"
    first = OutputLock.acquire(out, {**holder_record("sft"), "slurm_job_id": "4242"})
    assert held_by(out)["pid"] == os.getpid()
    with pytest.raises(ForgeError) as refused:
        OutputLock.acquire(out, holder_record("sft"))
    line = str(refused.value)
    assert line.startswith(f"--output-dir: {out} is in use by another run (host ")
    assert f"pid {os.getpid()}, started " in line and "Slurm job 4242, stage sft" in line and "\n" not in line
    first.release()
    assert not (out / LOCK_FILE).exists() and held_by(out) is None
    again = OutputLock.acquire(out, holder_record("sft"))
    assert again.stale is None  # released cleanly: nothing to tidy
    again.release()


def test_a_run_already_in_the_directory_refuses_the_cli_in_one_line(tmp_path, tiny_model):
    """Two identical runs into one --output-dir: the second is refused before it loads anything
    (they used to both finish, the second replacing the first's files and logging into its run)."""
    out = tmp_path / "sft"
    proc, _ = hold(out)
    try:
        result = subprocess.run(
            [sys.executable, "-m", "forgepipe", "sft", "--model", str(tiny_model), "--data", str(SAMPLE_PAIRS),
             "--output-dir", str(out), "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db", "--zero-stage", "2",
             "--dtype", "fp32", "--torch-adam", "--max-steps", "2"],
            env=child_env(), capture_output=True, text=True, timeout=300)
    finally:
        proc.kill()
        proc.wait()
    errors = [line for line in result.stderr.splitlines() if line.startswith("forgepipe: error:")]
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert len(errors) == 1 and f"{out} is in use by another run (host " in errors[0], result.stderr[-3000:]
    assert f"pid {proc.pid}, started " in errors[0]
    assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]  # nothing of the second run
    assert not (tmp_path / "mlflow.db").exists()


def test_a_run_killed_before_its_first_checkpoint_is_marked_killed_by_the_next_start(tmp_path):
    import mlflow

    from forgepipe.tracking import close_abandoned

    out, uri = tmp_path / "run", f"sqlite:///{tmp_path}/mlflow.db"
    proc, run_id = hold(out, uri)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    client = mlflow.MlflowClient(uri)
    assert client.get_run(run_id).info.status == "RUNNING"  # what a kill -9 leaves
    lock = OutputLock.acquire(out, holder_record("sft"))  # the next start in the directory
    assert lock.stale["run_id"] == run_id and lock.stale["pid"] == proc.pid
    assert close_abandoned(lock.stale, out) == run_id
    run = client.get_run(run_id)
    assert run.info.status == "KILLED" and run.info.end_time
    assert run.data.tags["forgepipe.ended"].startswith("killed: its process (host ") and str(out) in \
        run.data.tags["forgepipe.ended"]
    assert close_abandoned(lock.stale, out) is None  # ended already: left as it is
    lock.release()


def test_the_next_stage_context_marks_a_dead_runs_mlflow_run_killed(tmp_path, tiny_model):
    """Through StageContext, as every stage starts: the lock's stale record is acted on at entry."""
    import mlflow

    from forgepipe.config import build_config
    from forgepipe.stages.context import StageContext

    out, uri = tmp_path / "run", f"sqlite:///{tmp_path}/mlflow.db"
    proc, run_id = hold(out, uri)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    cfg = build_config("sft", None, {"model.name_or_path": str(tiny_model), "output_dir": str(out),
                                     "data.sources": [str(SAMPLE_PAIRS)], "tracking.uri": uri,
                                     "deepspeed.zero_stage": 2})
    with StageContext(cfg) as ctx:
        assert ctx.lock is not None and held_by(out)["pid"] == os.getpid()
    assert mlflow.MlflowClient(uri).get_run(run_id).info.status == "KILLED"
    assert held_by(out) is None and not (out / LOCK_FILE).exists()


# ---------------------------------------------------------------------------
# Filesystems without locks (item 9)

LUSTRE = "\n".join([
    "22 1 259:1 / / rw,relatime shared:1 - ext4 /dev/root rw",
    "40 22 0:40 / /lustre/orion rw,relatime shared:20 - lustre 10.0.0.1@o2ib:/orion rw,{opts},lazystatfs",
])


@pytest.mark.parametrize("opts, problem", [
    ("flock", None),
    ("localflock", "mounted with localflock (/lustre/orion): locks hold on one node only"),
    ("noflock", "mounted without flock (/lustre/orion): file locks fail there"),
    ("user_xattr", "mounted without flock (/lustre/orion): file locks fail there"),  # Lustre's default: no flock
])
def test_lustre_mount_options_say_whether_locks_hold(opts, problem, tmp_path, monkeypatch):
    info = LUSTRE.format(opts=opts)
    assert mount_of(Path("/lustre/orion/proj/run"), info)[:2] == ("/lustre/orion", "lustre")
    assert mount_of(Path("/home/x"), info)[:2] == ("/", "ext4")
    monkeypatch.setattr("forgepipe.lock._first_existing", lambda p: Path("/lustre/orion/proj"))
    monkeypatch.setattr("forgepipe.lock.tempfile.mkstemp", lambda **kw: (_ for _ in ()).throw(PermissionError()))
    found = flock_problem("/lustre/orion/proj/run", info)
    assert (found is None) if problem is None else (problem in found)


def test_a_filesystem_whose_flock_fails_is_refused_in_one_line_with_the_way_out(tmp_path, monkeypatch):
    """What Lustre without flock answers: ENOSYS from flock(); the probe file is removed."""
    import fcntl

    real = fcntl.flock

    def no_flock(fd, op):
        raise OSError(errno.ENOSYS, os.strerror(errno.ENOSYS))

    monkeypatch.setattr(fcntl, "flock", no_flock)
    out = tmp_path / "not" / "yet"
    with pytest.raises(ForgeError) as refused:
        check_locking(out, None)
    line = str(refused.value)
    assert line.startswith(f"--output-dir: {tmp_path} does not support flock() (Function not implemented")
    assert "FORGEPIPE_NO_OUTPUT_LOCK=1" in line and "Lustre mounted with flock" in line
    monkeypatch.setenv("FORGEPIPE_NO_OUTPUT_LOCK", "1")  # the output directory's way out: the store still needs locks
    with pytest.raises(ForgeError) as store:
        check_locking(out, tmp_path / "mlruns" / "mlflow.db")
    assert str(store.value).startswith(f"--tracking-uri: {tmp_path} does not support flock()")
    assert "an MLflow server (--tracking-uri http://" in str(store.value)
    assert list(tmp_path.iterdir()) == []  # the probe leaves nothing
    monkeypatch.setattr(fcntl, "flock", real)
    check_locking(out, tmp_path / "mlruns" / "mlflow.db")  # a local disk: locks work


def test_the_lock_record_is_json_naming_the_holder(tmp_path):
    lock = OutputLock.acquire(tmp_path, holder_record("reward"))
    lock.update(run_id="abc", tracking_uri="sqlite:////x.db")
    record = json.loads((tmp_path / LOCK_FILE).read_text())
    assert record["pid"] == os.getpid() and record["stage"] == "reward" and record["run_id"] == "abc"
    lock.release()

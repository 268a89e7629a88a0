"""The MLflow store: runs starting at once on a fresh ./mlruns, and a finished run's record."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
from conftest import child_env

from forgepipe.distributed import World
from forgepipe.tracking import Tracker

STARTER = r"""
import sys, time
from pathlib import Path
from forgepipe.distributed import World
from forgepipe.tracking import Tracker

uri, go, name = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
while not go.exists():
    time.sleep(0.001)
tracker = Tracker.start(world=World(), uri=uri, experiment="race", run_name=name)
tracker.log_metrics({"x": 1.0}, step=1)
tracker.finish()
"""


@pytest.mark.slow
def test_concurrent_first_opens_of_a_fresh_store(tmp_path):
    """Each process imports MLflow first, then all open the same new SQLite store at once; without
    the lock around the first open, schema creation races ('duplicate column name ...')."""
    uri, go = f"sqlite:///{tmp_path}/mlruns/mlflow.db", tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", STARTER, uri, str(go), f"run{i}"], env=child_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(4)]
    time.sleep(8)  # let every process finish its imports and wait at the line
    go.touch()
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    assert all(code == 0 for code, _ in results), [err[-1500:] for code, err in results if code]
    import mlflow

    client = mlflow.MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("race").experiment_id])
    assert sorted(r.info.run_name for r in runs) == ["run0", "run1", "run2", "run3"]
    assert {r.info.status for r in runs} == {"FINISHED"}


def test_a_failed_attempt_to_extend_a_finished_run_leaves_it_finished(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    first = Tracker.start(world=World(), uri=uri, experiment="e", run_name="r")
    first.finish("FINISHED")
    again = Tracker.start(world=World(), uri=uri, experiment="e", run_name="r", run_id=first.run_id)
    assert again.reopened_status == "FINISHED"
    again.finish("FAILED")
    run = again.client.get_run(first.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["forgepipe.last_resume"] == "FAILED"

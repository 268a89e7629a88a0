"""The MLflow store: runs starting at once on a fresh ./mlruns, and a finished run's record."""

from __future__ import annotations

import json
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


@pytest.fixture(scope="module")
def store_uri(tmp_path_factory) -> str:
    """One SQLite store for the record tests below (creating one takes seconds)."""
    return f"sqlite:///{tmp_path_factory.mktemp('store')}/mlflow.db"


def stage_config(stage: str, out, model: str = "forge-s"):
    from forgepipe.config import Config

    cfg = Config(stage=stage, output_dir=str(out))
    cfg.model.name_or_path = model
    cfg.deepspeed.zero_stage = 2
    cfg.tracking.experiment = "records"
    return cfg


def test_a_stage_run_is_named_tagged_and_its_metrics_carry_the_stage(store_uri, tmp_path):
    cfg = stage_config("reward", tmp_path / "rm")
    cfg.tracking.uri = store_uri
    tracker = Tracker.for_stage(cfg, World(world_size=1))
    tracker.log_metrics({"train/loss": 0.69, "eval/accuracy": 0.75, "perf/tokens_per_s": 900.0}, step=3)
    tracker.finish()
    run = tracker.client.get_run(tracker.run_id)
    assert run.info.run_name == "reward forge-s z2 1r"
    assert run.data.metrics == {"reward/loss": 0.69, "reward/eval_accuracy": 0.75, "perf/tokens_per_s": 900.0}
    tags = run.data.tags
    assert (tags["stage"], tags["model"], tags["zero"], tags["world_size"]) == ("reward", "forge-s", "z2", "1")
    assert tags["checkpoint_dir"] == str((tmp_path / "rm" / "checkpoints").resolve())
    assert tags["tracking_uri"] == store_uri


def test_training_data_is_an_mlflow_dataset_per_split(store_uri, tmp_path):
    import datasets

    data = tmp_path / "pairs.jsonl"
    data.write_text("{}\n")
    train = datasets.Dataset.from_dict({"prompt": ["a", "b", "c"]})
    held_out = datasets.Dataset.from_dict({"prompt": ["d"]})
    tracker = Tracker.start(world=World(), uri=store_uri, experiment="records", run_name="d", tags={"stage": "sft"})
    tracker.log_datasets([str(data)], {"train": train, "eval": held_out})
    run = tracker.client.get_run(tracker.run_id)
    inputs = {next(t.value for t in i.tags if t.key == "mlflow.data.context"): i.dataset
              for i in run.inputs.dataset_inputs}
    assert sorted(inputs) == ["evaluation", "training"]
    assert inputs["training"].name == "pairs.jsonl"
    assert json.loads(inputs["training"].source) == {"uri": str(data.resolve())}
    assert json.loads(inputs["training"].profile)["rows"] == {"train": 3, "eval": 1}
    assert inputs["training"].digest != inputs["evaluation"].digest
    assert (run.data.params["data.rows.train"], run.data.params["data.rows.eval"]) == ("3", "1")


def test_a_pipeline_parent_carries_the_config_and_each_childs_results(store_uri, tmp_path):
    from forgepipe.tracking import pipeline_params

    configs = {stage: stage_config(stage, tmp_path / stage) for stage in ("sft", "reward", "ppo")}
    params = pipeline_params(configs)
    assert params["deepspeed.zero_stage"] == 2 and "stage" not in params
    assert (params["sft.stage"], params["ppo.output_dir"]) == ("sft", str(tmp_path / "ppo"))
    assert params["ppo.ppo.kl_coef"] == 0.1 and "sft.ppo.kl_coef" not in params and "ppo.kl_coef" not in params

    parent = Tracker.start(world=World(), uri=store_uri, experiment="records", run_name="p", tags={"stage": "pipeline"})
    parent.log_params(params)
    child = Tracker.start(world=World(), uri=store_uri, experiment="records", run_name="c",
                          parent_run_id=parent.run_id, tags={"stage": "sft"})
    child.log_metrics({"train/loss": 3.0, "eval/loss": 3.5}, step=1)
    child.log_metrics({"train/loss": 2.0, "eval/loss": 2.5}, step=2)
    child.finish()
    parent.record_child("sft", child.run_id)
    run = parent.client.get_run(parent.run_id)
    assert run.data.metrics == {"sft/final_eval_loss": 2.5, "sft/final_loss": 2.0}
    assert run.data.tags["child.sft"] == child.run_id
    assert run.data.tags["child.sft.url"] == f"#/experiments/{run.info.experiment_id}/runs/{child.run_id}"
    assert run.data.params["deepspeed.zero_stage"] == "2"


# ---------------------------------------------------------------------------
# Many jobs, one store (issue 22 item 9): SQLite in rollback-journal mode, a locked store waited for

WRITER = r"""
import sys, time
from pathlib import Path
from types import SimpleNamespace
import forgepipe.tracking
from forgepipe.tracking import Tracker
from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore  # imported before the start line
forgepipe.tracking.environment_tags = lambda world: {}  # small processes: no torch, DeepSpeed, transformers
World = lambda: SimpleNamespace(is_main=True)
uri, go, name = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
print("READY", flush=True)
while not go.exists():
    time.sleep(0.005)
tracker = Tracker.start(world=World(), uri=uri, experiment="many", run_name=name, tags={"stage": "sft"})
tracker.log_params({"writer": name, "train.lr": 1e-5})
for step in range(1, 21):
    tracker.log_metrics({"train/loss": 1.0 / step}, step=step)
tracker.set_tags({"model_dir": f"/out/{name}/model"})
tracker.finish()
"""


def test_concurrent_writers_share_one_store_while_another_writer_holds_it(tmp_path):
    """Three jobs start and log into one SQLite store while a fourth process holds it locked for 6.5 s
    (a backup, a migration, a slow filesystem): every run lands whole. MLflow alone gives up after
    5 s on opening ('database is locked') and the run failed at its start; forgepipe waits
    (FORGEPIPE_STORE_WAIT_S). The store stays in rollback-journal mode, and intact."""
    import sqlite3

    import mlflow

    db, go = tmp_path / "mlruns" / "mlflow.db", tmp_path / "go"
    uri = f"sqlite:///{db}"
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, uri, str(go), f"w{i}"], env=child_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(3)]
    Tracker.start(world=World(), uri=uri, experiment="many", run_name="first").finish()  # the store exists
    for p in procs:
        assert any(line.startswith("READY") for line in p.stdout), p.stderr.read()[-2000:]
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    go.touch()
    time.sleep(6.5)
    holder.execute("COMMIT")
    holder.close()
    results = [(p.wait(timeout=120), p.stderr.read()) for p in procs]
    assert all(code == 0 for code, _ in results), [err[-1500:] for code, err in results if code]
    client = mlflow.MlflowClient(uri)
    runs = {r.info.run_name: r for r in client.search_runs([client.get_experiment_by_name("many").experiment_id])}
    assert sorted(runs) == ["first", "w0", "w1", "w2"]
    for name in ("w0", "w1", "w2"):
        run = runs[name]
        assert run.info.status == "FINISHED" and run.data.params["writer"] == name
        assert [m.step for m in client.get_metric_history(run.info.run_id, "sft/loss")] == list(range(1, 21))
    with sqlite3.connect(db) as con:
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_a_store_in_wal_mode_is_refused_in_one_line(tmp_path):
    import sqlite3

    from forgepipe.errors import ForgeError

    db = tmp_path / "mlflow.db"
    Tracker.start(world=World(), uri=f"sqlite:///{db}", experiment="e", run_name="r").finish()
    with sqlite3.connect(db) as con:
        con.execute("PRAGMA journal_mode=WAL")
    with pytest.raises(ForgeError) as refused:
        Tracker.start(world=World(), uri=f"sqlite:///{db}", experiment="e", run_name="r")
    assert str(refused.value) == (f"--tracking-uri: {db} is in SQLite's WAL journal mode, which is unsafe when jobs "
                                  f"on several nodes write it; switch it back first: sqlite3 {db} "
                                  "'PRAGMA journal_mode=DELETE'")


def test_a_resumed_tag_goes_when_a_later_resume_sets_the_value_back(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    run = Tracker.start(world=World(), uri=uri, experiment="e", run_name="r")
    run.log_params({"train.lr": 1e-5, "train.max_steps": 6})
    run.finish()
    again = Tracker.start(world=World(), uri=uri, experiment="e", run_name="r", run_id=run.run_id)
    again.log_params({"train.lr": 2e-5, "train.max_steps": 8})
    assert {k: v for k, v in again.client.get_run(run.run_id).data.tags.items() if k.startswith("resumed.")} == \
        {"resumed.train.lr": "2e-05", "resumed.train.max_steps": "8"}
    again.log_params({"train.lr": 1e-5, "train.max_steps": 10})
    assert {k: v for k, v in again.client.get_run(run.run_id).data.tags.items() if k.startswith("resumed.")} == \
        {"resumed.train.max_steps": "10"}


# ---------------------------------------------------------------------------
# A store that cannot be written in the middle of a run (issue 22 item 13): one warning, training goes on


def unwritable(db) -> None:
    """Every later write of the SQLite store fails, even for root (which chmod does not stop): a
    directory where SQLite puts its rollback journal (`<db>-journal`) gives 'disk I/O error'."""
    db.with_name(db.name + "-journal").mkdir()


def test_a_store_unwritable_mid_run_is_one_warning_and_the_writes_return(tmp_path, caplog, capfd):
    import logging

    import mlflow

    db = tmp_path / "mlflow.db"
    tracker = Tracker.start(world=World(), uri=f"sqlite:///{db}", experiment="e", run_name="r",
                            tags={"stage": "sft"})
    tracker.log_metrics({"train/loss": 3.0}, step=1)
    capfd.readouterr()
    unwritable(db)
    started = time.monotonic()
    with caplog.at_level(logging.WARNING):
        for step in range(2, 6):
            tracker.log_metrics({"train/loss": 1.0 / step}, step=step)  # each returns: training goes on
        tracker.log_params({"train.lr": 1e-5})
        tracker.set_tags({"model_dir": "/out/model"})
        tracker.log_dict({"a": 1}, "deepspeed/model.json")
        tracker.log_text("x", "config.yaml")
        tracker.log_table({"step": [2], "prompt": ["p"]}, "samples/eval.json")
        warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
        assert len(warned) == 1, warned
        assert warned[0].startswith(f"MLflow store sqlite:///{db} cannot be written (logging metrics: "
                                    "(sqlite3.OperationalError) disk I/O error); training goes on"), warned[0]
        caplog.clear()
        tracker.finish()
        ended = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert time.monotonic() - started < 10
    assert len(ended) == 1 and ended[0].startswith(f"MLflow run {tracker.run_id} in sqlite:///{db} is incomplete "
                                                   "and still says RUNNING: 8 writes were skipped after "
                                                   "logging metrics"), ended
    err = capfd.readouterr().err
    assert "Traceback" not in err and "SQLAlchemy database error" not in err, err[-3000:]

    # The store back (the filesystem remounted) before the run ends: ended, and tagged incomplete.
    db.with_name(db.name + "-journal").rmdir()
    client = mlflow.MlflowClient(f"sqlite:///{db}")
    assert client.get_run(tracker.run_id).info.status == "RUNNING"
    assert [m.step for m in client.get_metric_history(tracker.run_id, "sft/loss")] == [1]
    tracker.finish()
    run = mlflow.MlflowClient(f"sqlite:///{db}").get_run(tracker.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["forgepipe.record"].startswith("incomplete: 8 writes skipped after logging metrics: ")

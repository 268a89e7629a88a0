"""`forgepipe pipeline`: three stages in order, exports feeding the next, one MLflow parent run."""

from __future__ import annotations

import json

import pytest
from conftest import SAMPLE_PAIRS, mlflow_run, run_forgepipe

pytestmark = pytest.mark.slow


def pipeline_args(model, out, db, *extra):
    return ["pipeline", "--model", str(model), "--data", str(SAMPLE_PAIRS), "--output-dir", str(out),
            "--tracking-uri", f"sqlite:///{db}", "--dtype", "fp32", "--torch-adam", "--per-device-batch-size", "2",
            "--max-steps", "3", "--max-seq-len", "192", "--max-prompt-len", "128", "--max-new-tokens", "8", *extra]


def test_pipeline_two_ranks_zero3_parent_with_three_children(tiny_model, tmp_path):
    out, db = tmp_path / "pipe", tmp_path / "mlflow.db"
    proc = run_forgepipe(pipeline_args(tiny_model, out, db, "--zero-stage", "3"), nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]

    client, parent = mlflow_run(db, "pipeline tiny-gpt-neox z3 2r")
    assert parent.info.status == "FINISHED"
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(r.data.tags["stage"] for r in children) == ["ppo", "reward", "sft"]
    assert all(r.data.tags["world_size"] == "2" for r in children)
    by_stage = {r.data.tags["stage"]: r for r in children}
    # Each stage's export fed the next one.
    assert by_stage["reward"].data.params["model.name_or_path"] == str(tiny_model)
    assert by_stage["ppo"].data.params["model.name_or_path"] == str(out / "sft")
    assert by_stage["ppo"].data.params["ppo.reward_model"] == str(out / "reward")
    assert "ppo/score_mean" in by_stage["ppo"].data.metrics
    for stage in ("sft", "reward", "ppo"):
        summary = json.loads((out / stage / "forgepipe-run.json").read_text())
        assert summary["model_dir"] == str((out / stage / "model").resolve())
    assert parent.data.tags["ppo_model_dir"] == str((out / "ppo" / "model").resolve())
    assert parent.data.tags["child.ppo"] == by_stage["ppo"].info.run_id
    assert "ppo/final_score_mean" in parent.data.metrics  # each child's key results on the parent
    assert f"pipeline run {parent.info.run_id}" in proc.stdout  # the pipeline's summary names its parent

    # A rerun finds every stage done: one line, nothing trained again, the parent run untouched (its end time too).
    again = run_forgepipe(pipeline_args(tiny_model, out, db, "--zero-stage", "3"))
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"forgepipe: {out} already finished: sft, reward, ppo have their exports" in again.stdout
    runs = client.search_runs([parent.info.experiment_id])
    assert len(runs) == 4
    after = client.get_run(parent.info.run_id)
    assert (after.info.status, after.info.end_time) == ("FINISHED", parent.info.end_time)


def test_pipeline_bad_reward_data_fails_before_training(tiny_model, tmp_path):
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": f"document {i} about solvers"}) + "\n" for i in range(50)))
    out = tmp_path / "pipe"
    proc = run_forgepipe(pipeline_args(tiny_model, out, tmp_path / "m.db")[:3] + ["--data", str(docs)]
                         + pipeline_args(tiny_model, out, tmp_path / "m.db")[5:])
    assert proc.returncode == 2
    assert "no chosen/rejected pairs" in proc.stderr
    assert not out.exists()

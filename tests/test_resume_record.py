"""What a resume writes, and where (issue 22 item 12): a failed extension of a finished run leaves its
config.yaml, params, tags and end time as they were; a checkpoint of another directory starts a new
MLflow run; a `resumed.<key>` tag goes when a later resume sets the value back; an input file
rewritten in place is refused on resume (its digest), unless --allow-changed-inputs.

Fast: the finished run is its files (final checkpoint's loop state, run file, config.yaml) and a real
MLflow run in a real store; StageContext and RunRecord run in this process on one rank, with no
engine (a resume of no engines restores the loop state only)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import SAMPLE_PAIRS, child_env

from forgepipe.config import build_config
from forgepipe.digests import input_digests
from forgepipe.errors import ForgeError

STEPS = 6


def overrides(out: Path, data: Path, uri: str, **changes) -> dict:
    return {"model.name_or_path": "forge-s", "output_dir": str(out), "data.sources": [str(data)],
            "tracking.uri": uri, "deepspeed.zero_stage": 2, "train.max_steps": STEPS, "train.lr": 1e-5, **changes}


MODEL = "/models/forge-s"  # the resolved model path the fingerprint names


@pytest.fixture
def finished(tmp_path):
    """A run finished at step 6: what the stage leaves, and its FINISHED MLflow run with its params."""
    from forgepipe.distributed import World
    from forgepipe.tracking import Tracker

    data = tmp_path / "pairs.jsonl"
    shutil.copy(SAMPLE_PAIRS, data)
    out, uri = tmp_path / "sft", f"sqlite:///{tmp_path}/mlflow.db"
    cfg = build_config("sft", None, overrides(out, data, uri))
    cfg.deepspeed.zero_stage_resolved = 2
    tracker = Tracker.for_stage(cfg, World())
    tracker.log_params(cfg.flat())
    tracker.log_metrics({"train/loss": 1.0}, step=STEPS)
    tracker.finish()
    checkpoint = out / "checkpoints" / f"step-{STEPS:08d}"
    checkpoint.mkdir(parents=True)
    fingerprint = {"stage": "sft", "world_size": 1, "model": MODEL, "data": [str(data)], "config": cfg.flat(),
                   "inputs": input_digests(cfg.flat())}
    (checkpoint / "loop_state.json").write_text(json.dumps(
        {"step": STEPS, "epoch": 0, "position": 3, "run_id": tracker.run_id, "fingerprint": fingerprint, "files": {}}))
    (out / "checkpoints" / "latest").write_text(json.dumps({"tag": checkpoint.name}))
    (out / "model").mkdir()
    (out / "config.yaml").write_text(cfg.to_yaml())
    (out / "forgepipe-run.json").write_text(json.dumps(
        {"stage": "sft", "model_dir": str(out / "model"), "mlflow_run_id": tracker.run_id, "tracking_uri": uri,
         "steps": STEPS}))
    return out, data, uri, tracker.run_id


def mlflow_run(uri: str, run_id: str):
    import mlflow

    return mlflow.MlflowClient(uri).get_run(run_id)


def resumed_tags(run) -> dict[str, str]:
    return {k: v for k, v in run.data.tags.items() if k.startswith("resumed")}


def extend(out, data, uri, *, fail: bool, **changes):
    """An extension of the finished run through StageContext: the stage logs its own params and tags
    after begin(), as the recipes do; `fail`: it fails before training continues (a model that does
    not load), else training continues (resume) and the run ends."""
    from forgepipe.stages.context import StageContext

    cfg = build_config("sft", None, overrides(out, data, uri, **{"train.max_steps": 8, **changes}))
    with StageContext(cfg) as ctx:
        run = ctx.begin(models={"model": MODEL}, ds_configs={"model": {"zero_optimization": {"stage": 2}}})
        run.tracker.log_params({"train.total_steps": 8})
        run.tracker.set_tags({"attention": "sdpa"})
        if fail:
            raise ForgeError("model.safetensors cannot be loaded")
        run.resume({})
    return run


def test_a_failed_extension_of_a_finished_run_leaves_its_record_and_config(finished):
    out, data, uri, run_id = finished
    config, before = (out / "config.yaml").read_bytes(), mlflow_run(uri, run_id)
    with pytest.raises(ForgeError, match="cannot be loaded"):
        extend(out, data, uri, fail=True, **{"train.lr": 2e-5})
    after = mlflow_run(uri, run_id)
    assert (out / "config.yaml").read_bytes() == config  # it used to be rewritten with the extension's
    assert resumed_tags(after) == {}  # no resumed.train.max_steps, resumed.train.lr, resumed.changed
    assert "train.total_steps" not in after.data.params and "attention" not in after.data.tags
    assert after.data.params == before.data.params
    assert (after.info.status, after.info.end_time) == ("FINISHED", before.info.end_time)
    assert after.data.tags["forgepipe.last_resume"] == "FAILED"


def test_an_extension_that_trains_records_its_changes_and_a_later_resume_clears_them(finished):
    out, data, uri, run_id = finished
    extend(out, data, uri, fail=False, **{"train.lr": 2e-5})
    run = mlflow_run(uri, run_id)
    assert resumed_tags(run) == {"resumed.train.lr": "2e-05", "resumed.train.max_steps": "8",
                                 "resumed.changed": "train.lr, train.max_steps"}
    assert run.data.params["train.total_steps"] == "8" and run.data.tags["attention"] == "sdpa"
    assert "lr: 2.0e-05" in (out / "config.yaml").read_text()
    # The loop state a later checkpoint would save, as the next resume reads it: lr back to the first value.
    checkpoint = out / "checkpoints" / f"step-{STEPS:08d}"
    state = json.loads((checkpoint / "loop_state.json").read_text())
    state["fingerprint"]["config"]["train.lr"], state["fingerprint"]["config"]["train.max_steps"] = 2e-5, 8
    (checkpoint / "loop_state.json").write_text(json.dumps(state))
    extend(out, data, uri, fail=False, **{"train.max_steps": 10})
    tags = resumed_tags(mlflow_run(uri, run_id))
    assert "resumed.train.lr" not in tags  # set back: no stale tag
    assert tags["resumed.train.max_steps"] == "10" and tags["resumed.changed"] == "train.lr, train.max_steps"


def test_a_checkpoint_of_another_directory_starts_a_new_mlflow_run(finished, tmp_path):
    out, data, uri, run_id = finished
    from forgepipe.stages.context import StageContext

    before = mlflow_run(uri, run_id)
    other = tmp_path / "other"
    cfg = build_config("sft", None, overrides(other, data, uri, **{
        "train.max_steps": 8, "train.resume": str(out / "checkpoints" / f"step-{STEPS:08d}")}))
    with StageContext(cfg) as ctx:
        run = ctx.begin(models={"model": MODEL}, ds_configs={"model": {}})
        run.resume({})
        assert run.state.step == STEPS and run.state.run_id == run.tracker.run_id
        run.tracker.log_metrics({"train/loss": 0.5}, step=STEPS + 1)
    assert run.tracker.run_id != run_id
    new = mlflow_run(uri, run.tracker.run_id)
    assert new.data.tags["resumed_from"] == str((out / "checkpoints" / f"step-{STEPS:08d}").resolve())
    assert new.data.tags["resumed_from_run"] == run_id and new.data.tags["output_dir"] == str(other.resolve())
    assert new.data.metrics == {"sft/loss": 0.5} and new.info.status == "FINISHED"
    after = mlflow_run(uri, run_id)  # the other directory's run: untouched
    assert (after.data.metrics, after.data.tags, after.info.end_time) == (
        before.data.metrics, before.data.tags, before.info.end_time)


# ---------------------------------------------------------------------------
# Inputs rewritten in place


def rewrite(path: Path) -> None:
    path.write_text(path.read_text().replace("the", "teh", 1))


def test_a_data_file_rewritten_in_place_is_refused_on_resume_before_launch(finished):
    """Through the CLI: the pre-launch checks refuse it in one line, as a changed path is, before any
    rank starts; a copy with the same contents and a new time is accepted."""
    out, data, uri, _ = finished
    args = [sys.executable, "-m", "forgepipe", "sft", "--model", "forge-s", "--data", str(data), "--output-dir",
            str(out), "--tracking-uri", uri, "--zero-stage", "2", "--max-steps", "8", "--lr", "1e-5"]
    rewrite(data)
    proc = subprocess.run(args, env=child_env(), capture_output=True, text=True, timeout=120)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("forgepipe: error:")]
    assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert errors[0].startswith(f"forgepipe: error: --data: data file {data} changed since {out}/checkpoints/")
    assert "(sha256 " in errors[0] and "pass --allow-changed-inputs to resume on its new contents" in errors[0]


def test_check_resume_compares_digests_and_the_user_can_allow_a_change(finished, tmp_path):
    from forgepipe.distributed import World
    from forgepipe.preflight import check_resume_config
    from forgepipe.stages.record import check_resume

    out, data, uri, _ = finished
    checkpoint = out / "checkpoints" / f"step-{STEPS:08d}"
    cfg = build_config("sft", None, overrides(out, data, uri, **{"train.max_steps": 8}))
    shutil.copy(data, tmp_path / "copy")
    shutil.copy(tmp_path / "copy", data)  # the same contents, a new modification time: hashed, accepted
    check_resume_config(cfg)
    assert check_resume(cfg, World(), {"model": MODEL}, checkpoint).changed_inputs == ()
    rewrite(data)
    for check in (lambda: check_resume_config(cfg), lambda: check_resume(cfg, World(), {"model": MODEL}, checkpoint)):
        with pytest.raises(ForgeError, match=r"--data: data file .* changed since .* \(sha256 [0-9a-f]{12} then"):
            check()
    cfg.train.allow_changed_inputs = True
    check_resume_config(cfg)
    assert check_resume(cfg, World(), {"model": MODEL}, checkpoint).changed_inputs == (str(data),)


def test_a_chat_template_edited_in_place_is_refused_on_resume(finished, tmp_path):
    from forgepipe.distributed import World
    from forgepipe.stages.record import check_resume

    out, data, uri, _ = finished
    template = tmp_path / "chat.jinja"
    template.write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    checkpoint = out / "checkpoints" / f"step-{STEPS:08d}"
    state = json.loads((checkpoint / "loop_state.json").read_text())
    cfg = build_config("sft", None, overrides(out, data, uri, **{"data.chat_template": str(template)}))
    state["fingerprint"]["config"] = cfg.flat()
    state["fingerprint"]["inputs"] = input_digests(cfg.flat())
    (checkpoint / "loop_state.json").write_text(json.dumps(state))
    assert set(state["fingerprint"]["inputs"]) == {str(data), str(template)}
    check_resume(cfg, World(), {"model": MODEL}, checkpoint)
    template.write_text("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}")
    with pytest.raises(ForgeError, match=f"--chat-template: the chat template {template} changed since"):
        check_resume(cfg, World(), {"model": MODEL}, checkpoint)

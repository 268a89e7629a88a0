"""A finished run re-run with nothing to add (the same command, the default `--resume auto`) is
answered in one line with exit status 0 by the pre-launch checks, before any rank starts; a larger
--max-steps or more --epochs still extends it. Fast: the finished runs here are their files only
(run file, final checkpoint's loop state, config.yaml), written as the stages write them;
`test_resume.py::test_the_same_command_on_a_finished_run_does_nothing` re-runs a real one.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import click
import pytest
from conftest import child_env

from forgepipe.config import build_config
from forgepipe.errors import ForgeError
from forgepipe.preflight import AlreadyFinished, check_finished, check_output_dir, finished_line

RUN_ID = "0123456789abcdef"


def overrides(out: Path, **changes) -> dict:
    return {"model.name_or_path": "forge-s", "output_dir": str(out), "data.sources": ["/data/pairs.jsonl"],
            "train.max_steps": 6, **changes}


def finished_run(out: Path, steps: int = 6, final_checkpoint: bool = True, **changes) -> None:
    """What a run of overrides(out, **changes) that ended at `steps` leaves in `out`."""
    cfg = build_config("sft", None, overrides(out, **changes))
    if final_checkpoint:
        checkpoint = out / "checkpoints" / f"step-{steps:08d}"
        checkpoint.mkdir(parents=True)
        (checkpoint / "loop_state.json").write_text(json.dumps(
            {"step": steps, "run_id": RUN_ID, "fingerprint": {"stage": "sft", "config": cfg.flat()}, "files": {}}))
        (out / "checkpoints" / "latest").write_text(json.dumps({"tag": checkpoint.name}))
    (out / "model").mkdir(parents=True)
    (out / "config.yaml").write_text(cfg.to_yaml())
    (out / "forgepipe-run.json").write_text(json.dumps(
        {"stage": "sft", "model_dir": str(out / "model"), "mlflow_run_id": RUN_ID, "tracking_uri": "", "steps": steps}))


def line(out: Path, **changes) -> str | None:
    return finished_line(build_config("sft", None, overrides(out, **changes)))


def test_the_same_command_and_honoured_changes_have_nothing_to_do(tmp_path):
    finished_run(tmp_path)
    expected = (f"{tmp_path} already finished at step 6: nothing to do; --max-steps above 6 extends it, "
                f"--overwrite starts afresh (its model: {tmp_path / 'model'})")
    assert line(tmp_path) == expected
    assert line(tmp_path, **{"train.lr": 1e-3, "train.eval_every": 2}) == expected  # honoured, adds no step
    assert line(tmp_path, **{"train.max_steps": 4}) == expected  # already past it
    assert line(tmp_path, **{"train.resume": str(tmp_path / "checkpoints" / "step-00000006")}) == expected


@pytest.mark.parametrize("changes", [
    {"train.max_steps": 8},  # an extension
    {"train.max_steps": 0},  # the epochs, which may hold more steps than the 6 it stopped at
    {"train.resume": "never"}, {"overwrite": True},
    {"train.seed": 7},  # refused on resume: the stage's check says so
    {"model.name_or_path": "forge-m"}, {"data.sources": ["/data/other.jsonl"]},
])
def test_what_is_not_nothing_goes_on_as_before(tmp_path, changes):
    finished_run(tmp_path)
    assert line(tmp_path, **changes) is None


def test_an_extension_under_way_resumes(tmp_path):
    finished_run(tmp_path)
    later = tmp_path / "checkpoints" / "step-00000007"
    later.mkdir()
    (later / "loop_state.json").write_text(json.dumps({"step": 7, "run_id": RUN_ID}))
    assert line(tmp_path, **{"train.max_steps": 8}) is None
    assert line(tmp_path) is None  # its checkpoints go past the run file's step: continue from them


def test_a_run_that_ended_with_its_epochs(tmp_path):
    finished_run(tmp_path, steps=5, **{"train.max_steps": 0, "train.epochs": 2})
    assert line(tmp_path, **{"train.max_steps": 0, "train.epochs": 2}).startswith(
        f"{tmp_path} already finished at step 5: nothing to do; more --epochs (than 2) extend it")
    assert line(tmp_path, **{"train.max_steps": 100, "train.epochs": 2}) is not None  # the epochs end it at 5
    assert line(tmp_path, **{"train.max_steps": 0, "train.epochs": 3}) is None


def test_a_run_without_its_final_checkpoint(tmp_path):
    finished_run(tmp_path, final_checkpoint=False)
    assert line(tmp_path) == (f"{tmp_path} already finished at step 6: nothing to do; it has no final checkpoint "
                              f"to extend (--final-checkpoint was off), --overwrite starts afresh "
                              f"(its model: {tmp_path / 'model'})")
    check_output_dir(build_config("sft", None, overrides(tmp_path)))  # no error: check_run answers
    with pytest.raises(ForgeError, match="without its final checkpoint"):
        check_output_dir(build_config("sft", None, overrides(tmp_path, **{"train.max_steps": 8})))


def test_every_rank_exits_0_and_rank_0_says_so(tmp_path, monkeypatch, capsys):
    finished_run(tmp_path)
    cfg = build_config("sft", None, overrides(tmp_path))
    for rank in ("1", "0"):
        monkeypatch.setenv("RANK", rank)
        with pytest.raises(AlreadyFinished) as raised:
            check_finished(cfg)
        assert isinstance(raised.value, click.exceptions.Exit) and raised.value.exit_code == 0
        assert capsys.readouterr().out == ("" if rank == "1" else f"forgepipe: {raised.value.message}\n")


def test_the_command_answers_before_anything_starts(tmp_path):
    """The real CLI: exit 0, one line, nothing written or touched (not even the tracking store)."""
    out = tmp_path / "sft"
    finished_run(out)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    proc = subprocess.run([sys.executable, "-m", "forgepipe", "sft", "--model", "forge-s", "--output-dir", str(out),
                           "--data", "/data/pairs.jsonl", "--max-steps", "6",
                           "--tracking-uri", f"sqlite:///{tmp_path}/mlruns/mlflow.db"],
                          cwd=tmp_path, env=child_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.splitlines() == [f"forgepipe: {out} already finished at step 6: nothing to do; --max-steps "
                                        f"above 6 extends it, --overwrite starts afresh (its model: {out / 'model'})"]
    assert "Traceback" not in proc.stderr
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sft"]  # no store, no cache

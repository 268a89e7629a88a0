"""Checkpoints that never lose a result: an unreadable marker or a truncated newest checkpoint falls
back to the newest one that verifies (and says so), pruning keeps what this run wrote, a full
disk stops with one line and keeps the last good checkpoint, and a finished run can be extended
(--max-steps, --lr honoured and the LR schedule recomputed from the restored step)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import SAMPLE_PAIRS, child_env, metric_values, mlflow_run

from forgepipe.engine import lr_factor

pytestmark = pytest.mark.slow

LR = 1e-3


def cli(args: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "forgepipe", *args], env=child_env(), capture_output=True,
                          text=True, timeout=timeout)


def sft_args(model: Path, data: Path, out: Path, db: Path, *extra: str) -> list[str]:
    return ["sft", "--model", str(model), "--data", str(data), "--output-dir", str(out),
            "--tracking-uri", f"sqlite:///{db}", "--dtype", "fp32", "--torch-adam", "--zero-stage", "2",
            "--per-device-batch-size", "2", "--max-seq-len", "128", "--warmup-ratio", "0", "--lr", str(LR),
            "--log-every", "1", "--save-every", "2", "--keep-last", "3", "--max-steps", "6", *extra]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """The sample pairs plus 10 {prompt, response} rows: a mixed file that loses 10 of 310 rows."""
    path = tmp_path_factory.mktemp("data") / "mixed.jsonl"
    extra = "".join(json.dumps({"prompt": f"Say {i}", "response": str(i)}) + "\n" for i in range(10))
    path.write_text(SAMPLE_PAIRS.read_text() + extra)
    return path


@pytest.fixture(scope="module")
def finished(tiny_model, data, tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("finished")
    out, db = root / "sft", root / "mlflow.db"
    proc = cli(sft_args(tiny_model, data, out, db))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "mixed.jsonl: dropped 10 of 310 rows" in proc.stderr and "(e.g. " in proc.stderr
    return out, db


def copy_run(finished, tmp_path) -> tuple[Path, Path]:
    src, src_db = finished
    out, db = tmp_path / "sft", tmp_path / "mlflow.db"
    shutil.copytree(src, out)
    shutil.copy(src_db, db)
    return out, db


def test_dropped_rows_are_logged_to_mlflow(finished):
    out, db = finished
    client, run = mlflow_run(db)
    assert run.data.params["data.dropped_rows"] == "10"
    report = json.loads(Path(client.download_artifacts(run.info.run_id, "data/dropped_rows.json")).read_text())
    (source,) = report["sources"]
    assert source["rows"] == 310 and source["dropped"] == 10
    (reason,) = source["reasons"].values()
    assert reason["count"] == 10 and reason["example"].endswith("mixed.jsonl:301")


def test_unreadable_marker_and_truncated_newest_fall_back_and_pruning_keeps_this_runs_checkpoints(
        finished, tiny_model, data, tmp_path):
    out, db = copy_run(finished, tmp_path)
    root = out / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-00000002", "step-00000004", "step-00000006"]
    (root / "latest").write_text('{"tag": ')  # a marker cut short
    states = sorted((root / "step-00000006").rglob("*model_states.pt"))
    with open(states[0], "r+b") as f:  # the newest checkpoint truncated
        f.truncate(os.path.getsize(states[0]) // 2)
    # A higher-numbered checkpoint another run left: never pruned by this one, never resumed from.
    foreign = root / "step-00000100"
    shutil.copytree(root / "step-00000004", foreign)
    state = json.loads((foreign / "loop_state.json").read_text())
    (foreign / "loop_state.json").write_text(json.dumps({**state, "run_id": "another-run", "step": 100, "files": {}}))
    (root / "latest").write_text('{"tag": ')

    proc = cli(sft_args(tiny_model, data, out, db, "--max-steps", "8", "--keep-last", "1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"{root}/latest is unreadable" in proc.stderr
    assert f"{states[0]} is truncated" in proc.stderr
    assert "resuming from" in proc.stderr and "/step-00000100 instead" not in proc.stderr
    assert f"resumed from {root}/step-00000004 at step 4" in proc.stderr
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-00000008", "step-00000100"]
    assert json.loads((root / "latest").read_text()) == {"tag": "step-00000008"}
    client, run = mlflow_run(db)
    assert len(client.get_metric_history(run.info.run_id, "sft/loss")) == 8  # one run, no step twice


def test_extending_a_finished_run_honours_max_steps_and_lr(finished, tiny_model, data, tmp_path):
    out, db = copy_run(finished, tmp_path)
    proc = cli(sft_args(tiny_model, data, out, db, "--max-steps", "8", "--lr", str(2 * LR)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resume: --lr changed from 0.001 to 0.002: honoured" in proc.stderr
    assert "resume: --max-steps changed from 6 to 8: honoured" in proc.stderr
    client, run = mlflow_run(db)
    lrs = metric_values(client, run.info.run_id, "sft/lr")
    assert len(lrs) == 8
    for step in (1, 6):  # logged by the first run, kept
        assert lrs[step - 1] == pytest.approx(LR * lr_factor(step, 6, 0, 0.1))
    for step in (7, 8):  # the new --lr, on the new schedule's shape
        assert lrs[step - 1] == pytest.approx(2 * LR * lr_factor(step, 8, 0, 0.1))
    assert run.data.tags["resumed.changed"] == "train.lr, train.max_steps"
    assert "lr: 0.002" in (out / "config.yaml").read_text()
    assert json.loads((out / "forgepipe-run.json").read_text())["steps"] == 8


FULL_DISK = {  # what fills the disk -> (tmpfs size, extra args, what was being written, the checkpoint kept)
    "at a checkpoint": ("6m", ["--save-every", "1"], "checkpoint step-00000002", "step-00000001"),
    "at the export": ("4400k", ["--max-steps", "2"], "the model export", "step-00000002"),
}


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
@pytest.mark.parametrize("case", list(FULL_DISK))
def test_full_disk_is_one_line_and_keeps_the_last_good_checkpoint(case, tiny_model, data, tmp_path):
    size, extra, writing, kept = FULL_DISK[case]
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(disk)], check=True)
    try:
        out = disk / "sft"
        proc = cli(sft_args(tiny_model, data, out, tmp_path / "mlflow.db", "--keep-last", "1",
                            "--cache-dir", str(tmp_path / "cache"), *extra))
        assert proc.returncode == 2, proc.stderr[-3000:]
        errors = [line for line in proc.stderr.splitlines() if line.startswith("forgepipe: error:")]
        assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
        assert "no space left on " in errors[0] and f"while writing {writing}" in errors[0], errors[0]
        assert f"the last complete checkpoint is kept: {out}/checkpoints/{kept}" in errors[0]
        root = out / "checkpoints"
        assert sorted(p.name for p in root.iterdir()) == ["latest", kept]
        assert json.loads((root / "latest").read_text()) == {"tag": kept}
        assert not (out / "model.partial").exists() and not (out / "model").exists()
        from forgepipe.checkpoint import verify_checkpoint

        assert verify_checkpoint(root / kept) is None
    finally:
        subprocess.run(["umount", str(disk)], check=False)


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
def test_torch_writer_errors_on_a_nearly_full_disk_count_as_full(tmp_path):
    """Seen on an H200: a 4 GiB optimizer shard failed with 'unexpected pos' and some space still free."""
    from forgepipe.checkpoint import _disk_full

    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(disk)], check=True)
    try:
        (disk / "filler").write_bytes(b"\0" * (4 << 20))  # 4 MiB left: more than 1 MiB, less than a shard
        writer = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4027874560 vs 4027874448")
        writer.__context__ = RuntimeError("basic_ios::clear: iostream error")
        assert _disk_full(writer, disk / "checkpoints" / "step-1")
        assert not _disk_full(RuntimeError("CUDA error: an illegal memory access"), disk / "checkpoints")
        assert not _disk_full(writer, tmp_path / "checkpoints")  # plenty of space: some other fault
    finally:
        subprocess.run(["umount", str(disk)], check=False)

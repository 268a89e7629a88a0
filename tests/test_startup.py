"""Start-up: `torchrun -m forgepipe`, a stop signal before training, the evaluation bound, and a
tokenization cache that a killed run left temporary files in."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import SAMPLE_PAIRS, child_env, mlflow_run, torchrun

EXIT_PREEMPTED = 85


def sft_args(model: Path, out: Path, db: Path, *extra: str) -> list[str]:
    return ["sft", "--model", str(model), "--data", str(SAMPLE_PAIRS), "--output-dir", str(out),
            "--tracking-uri", f"sqlite:///{db}", "--dtype", "fp32", "--torch-adam", "--zero-stage", "2",
            "--per-device-batch-size", "2", "--max-seq-len", "128", "--max-steps", "2", *extra]


@pytest.mark.slow
def test_torchrun_module_eval_bound_and_orphaned_cache_files(tiny_model, tmp_path):
    out, db, cache = tmp_path / "sft", tmp_path / "mlflow.db", tmp_path / "cache"
    cache.mkdir()
    orphan = cache / "tmpk3j2x9q1"  # what datasets leaves when a run is killed mid-tokenization
    orphan.write_bytes(b"\0" * 1024)
    proc = subprocess.run(torchrun(1, "-m", "forgepipe", *sft_args(tiny_model, out, db, "--eval-max-samples", "3",
                                                                     "--cache-dir", str(cache))),
                          env=child_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "model" / "model.safetensors").is_file()
    assert not orphan.exists()
    assert sorted(p.suffix for p in cache.iterdir() if p.name != ".lock") == [".arrow", ".arrow"]
    _, run = mlflow_run(db)
    assert run.data.params["data.eval_samples"] == "3"


def test_a_stop_signal_during_start_up_stops_at_once(tiny_model, tmp_path):
    out, db = tmp_path / "sft", tmp_path / "mlflow.db"
    proc = subprocess.Popen([sys.executable, "-m", "forgepipe", *sft_args(tiny_model, out, db)], env=child_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(3.0)  # imports, pre-launch checks, tokenization: long before the first training step
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_PREEMPTED, stderr[-3000:]
    assert "stopped by signal 15 during start-up, before training; nothing to checkpoint yet" in stderr
    assert "train:" not in stderr  # no step was run
    assert not out.exists()

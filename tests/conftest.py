"""Shared fixtures: a tiny GPT-NeoX built from the bundled config, the bundled sample, CLI runners."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SAMPLE_PAIRS = REPO / "examples" / "data" / "sample_pairs.jsonl"
SAMPLE_DOCS = REPO / "examples" / "data" / "sample_docs.jsonl"
SHARED_DATA = REPO.parent / "shared" / "data"
HH_SAMPLE = SHARED_DATA / "hh-rlhf-harmless-sample.jsonl.gz"

# Quiet, offline, deterministic subprocesses.
CHILD_ENV = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    "TOKENIZERS_PARALLELISM": "false",
    "OMP_NUM_THREADS": "1",
    "PYTHONWARNINGS": "ignore",
}


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    from forgepipe.models.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny-gpt-neox", seed=0)


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_", "MASTER_", "SLURM_"))}
    env.update(CHILD_ENV)
    env.update(extra or {})
    return env


def free_port() -> int:
    """A port no one is listening on, so that multi-rank runs never collide."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
            "--master_port", str(free_port()), *args]


def run_forgepipe(args: list[str], *, nproc: int = 1, cwd: Path | None = None, timeout: int = 600,
                  env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run the real CLI in a fresh process (under torchrun for several ranks)."""
    if nproc > 1:
        cmd = torchrun(nproc, "-m", "forgepipe.cli", *args)
    else:
        cmd = [sys.executable, "-m", "forgepipe.cli", *args]
    return subprocess.run(cmd, cwd=cwd, env=child_env(env), capture_output=True, text=True, timeout=timeout)


def mlflow_run(db: Path, run_name: str | None = None):
    """The newest run of the store (or the one with `run_name`)."""
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{db}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()], order_by=["start_time DESC"])
    if run_name:
        runs = [r for r in runs if r.info.run_name == run_name]
    assert runs, f"no MLflow run in {db}"
    return client, runs[0]


def metric_values(client, run_id: str, key: str) -> list[float]:
    return [m.value for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]


def artifact_json(client, run_id: str, path: str) -> dict:
    local = client.download_artifacts(run_id, path)
    return json.loads(Path(local).read_text())

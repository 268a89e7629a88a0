"""The launch path on a real Slurm cluster: submit the project's sft.sbatch, srun two ranks.

Needs the localhost cluster of scripts/ci/slurm-up.sh (CI starts it). The container launcher is
swapped for a direct launch and the node shrunk to 2 CPU tasks; everything else is the script
that runs on Frontier.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = ROOT / ".venv" / "bin"
DATA = ROOT / "examples" / "data" / "sample_pairs.jsonl"

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


def cluster_up() -> str | None:
    """None when a node is ready, else why the test cannot run."""
    if not shutil.which("sinfo"):
        return "no Slurm here (start one with scripts/ci/slurm-up.sh)"
    out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True)
    if out.returncode != 0 or not re.search(r"^(idle|mixed)", out.stdout, flags=re.M):
        return f"the Slurm cluster is not up (sinfo: {(out.stdout + out.stderr).strip()!r}); run scripts/ci/slurm-up.sh"
    return None


@pytest.fixture(scope="module")
def slurm():
    reason = cluster_up()
    if reason:
        pytest.skip(reason)


def test_sft_batch_script_runs_two_ranks_under_srun(slurm, tmp_path):
    pytest.importorskip("forgepipe.cli")
    from forgepipe.models.tiny import make_tiny_model

    model = make_tiny_model(tmp_path / "tiny")
    db = tmp_path / "mlflow.db"
    env = {
        "PATH": f"{BIN}:/usr/bin:/bin",
        "HOME": os.environ.get("HOME", "/tmp"),
        "ACCOUNT": "ci",
        "NODES": "1",
        "WALLTIME": "10",
        "FORGEPIPE_LAUNCHER": "direct",
        "FORGEPIPE_DEVICE": "cpu",
        "GPUS_PER_NODE": "2",
        "CPUS_PER_TASK": "1",
        "MODEL": str(model),
        "DATA": str(DATA),
        "OUTPUT_DIR": str(tmp_path / "sft"),
        "TRACKING_URI": f"sqlite:///{db}",
        "LOG_DIR": str(tmp_path),
        "SBATCH_ARGS": "--wait",  # sbatch returns when the job ends, with the job's exit status
    }
    out = subprocess.run(
        [
            "bash",
            str(ROOT / "scripts" / "frontier" / "submit.sh"),
            "sft",
            "--torch-adam",
            "--dtype",
            "fp32",
            "--max-steps",
            "2",
            "--zero-stage",
            "2",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    full_logs = "\n".join(p.read_text(errors="replace") for p in tmp_path.glob("forgepipe-sft-*.out"))
    logs = full_logs[-8000:]  # for the failure messages
    assert out.returncode == 0, out.stdout + out.stderr + logs
    job_id = re.search(r"Submitted batch job (\d+)", out.stdout).group(1)
    job = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True).stdout
    if job:  # Slurm forgets finished jobs after MinJobAge; sbatch --wait already gave the status
        assert "JobState=COMPLETED" in job and "ExitCode=0:0" in job, job
    assert "srun -N 1 -n 2 --ntasks-per-node=2 -c1" in full_logs

    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{db}")
    runs = mlflow.search_runs(search_all_experiments=True)
    assert len(runs) == 1
    assert runs.iloc[0]["tags.world_size"] == "2"
    assert runs.iloc[0]["status"] == "FINISHED"

"""What a stage's output directory holds, by name: one place for every file the stages,
the pre-launch checks and the pipeline look for. No imports: the checks stay fast.

    <output-dir>/
        model/                  the export (Hugging Face format): what the next stage reads
        checkpoints/step-N/     resumable state; loop_state.json marks a complete one
        forgepipe-run.json      written last: the stage finished (model dir, MLflow run id)
        config.yaml             the resolved config of the run
        .forgepipe.lock         held (flock) by the run using the directory; see lock.py
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

RUN_FILE = "forgepipe-run.json"
MODEL_SUBDIR = "model"
CHECKPOINT_DIR = "checkpoints"
LOOP_STATE = "loop_state.json"
CONFIG_FILE = "config.yaml"
PROFILE_FILE = "flops_profile.txt"
LOCK_FILE = ".forgepipe.lock"


def checkpoint_step(checkpoint: Path) -> int:
    """The step a checkpoint directory's loop state records (-1: none or unreadable); no tensors read."""
    try:
        return int(json.loads((checkpoint / LOOP_STATE).read_text()).get("step", -1))
    except (OSError, ValueError, AttributeError):
        return -1


def share_with_group() -> None:
    """Let the group read (and enter) what this process creates: Frontier projects share their
    directories, and a umask of 077 would keep checkpoints, exports and the MLflow store from the
    rest of the project. Clears only the group's read and execute bits of the umask; write stays
    as the user set it. Called once at the start of a command."""
    current = os.umask(0)
    os.umask(current & ~0o050)


def resolve_stage_output(path: str) -> str:
    """A stage output directory stands for the model it exported (`<dir>/model`)."""
    candidate = Path(path) / MODEL_SUBDIR
    if (candidate / "config.json").is_file():
        return str(candidate)
    return path


@dataclass(frozen=True)
class StageResult:
    """What a finished stage hands on: to the user, to the pipeline and to the next stage."""

    stage: str
    model_dir: str
    run_id: str | None
    steps: int
    tracking_uri: str

    def to_dict(self) -> dict[str, Any]:
        """The run file's form (RUN_FILE)."""
        return {"stage": self.stage, "model_dir": self.model_dir, "mlflow_run_id": self.run_id,
                "tracking_uri": self.tracking_uri, "steps": self.steps}

    @classmethod
    def read(cls, output_dir: str | Path) -> StageResult:
        data = json.loads((Path(output_dir) / RUN_FILE).read_text())
        return cls(stage=data.get("stage", ""), model_dir=data["model_dir"], run_id=data.get("mlflow_run_id"),
                   steps=data.get("steps", 0), tracking_uri=data.get("tracking_uri") or "")

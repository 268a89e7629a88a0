"""MLflow tracking, on rank 0 only.

Default store: a SQLite database inside ./mlruns with artifacts beside it, so that
`mlflow ui --backend-store-uri sqlite:///mlruns/mlflow.db` shows every run. MLflow 3.x
refuses the plain file store unless MLFLOW_ALLOW_FILE_STORE=true, and its own default is a
SQLite file in the working directory; this keeps everything in one folder. `--tracking-uri`
and MLFLOW_TRACKING_URI override it.

Every run records its resolved config (flattened params), the DeepSpeed JSON (ZeRO++ block
included) as an artifact, metrics per step, and tags describing the environment. Other ranks
get a Tracker whose methods do nothing, so stages never test the rank themselves.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import platform
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from forgepipe.distributed import World

log = logging.getLogger(__name__)

DEFAULT_STORE_DIR = "mlruns"
MAX_PARAM_LENGTH = 6000  # MLflow's limit for a param value


def default_tracking_uri() -> str:
    store = Path(DEFAULT_STORE_DIR).resolve()
    return f"sqlite:///{store}/mlflow.db"


def resolve_tracking_uri(uri: str | None) -> str:
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()


def _artifact_root(uri: str) -> str | None:
    """Artifacts beside a SQLite store (<dir>/artifacts); None lets MLflow choose for servers."""
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///"):])
        return (db.parent / "artifacts").resolve().as_uri()
    return None


def git_commit() -> str:
    """The source commit: baked into container images as FORGEPIPE_GIT_COMMIT, else asked of git."""
    if os.environ.get("FORGEPIPE_GIT_COMMIT"):
        return os.environ["FORGEPIPE_GIT_COMMIT"]
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=10
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment_tags(world: World) -> dict[str, str]:
    import datasets
    import deepspeed
    import torch
    import transformers

    from forgepipe import __version__

    # The image's own name first: APPTAINER_CONTAINER is the path it ran from (a node-local copy
    # when the job stages it), which says little once the job is gone.
    image = (
        os.environ.get("FORGEPIPE_IMAGE")
        or os.environ.get("APPTAINER_CONTAINER")
        or os.environ.get("SINGULARITY_CONTAINER")
        or ""
    )
    tags = {
        "forgepipe_version": __version__,
        "git_commit": git_commit(),
        "torch_version": torch.__version__,
        "deepspeed_version": deepspeed.__version__,
        "transformers_version": transformers.__version__,
        "datasets_version": datasets.__version__,
        "python_version": platform.python_version(),
        "world_size": str(world.world_size),
        "num_nodes": str(world.num_nodes),
        "launcher": world.launcher,
        "hostname": socket.gethostname(),
        "device": "gpu" if torch.cuda.is_available() else "cpu",
    }
    if torch.cuda.is_available():
        tags["gpu_name"] = torch.cuda.get_device_name(0)
        tags["gpu_kind"] = os.environ.get("FORGEPIPE_GPU_KIND") or ("amd" if torch.version.hip else "nvidia")
        tags["hip_version" if torch.version.hip else "cuda_version"] = str(torch.version.hip or torch.version.cuda)
    if image:
        tags["container_image"] = image
    if os.environ.get("FORGEPIPE_IMAGE_BUILD"):
        tags["image_build"] = os.environ["FORGEPIPE_IMAGE_BUILD"]  # base, digest, torch, ROCm/CUDA, arch
    if os.environ.get("SLURM_JOB_ID"):
        tags["slurm_job_id"] = os.environ["SLURM_JOB_ID"]
    return tags


def environment_snapshot() -> dict[str, Any]:
    """The launch-relevant environment variables, logged as an artifact for later comparison."""
    prefixes = ("SLURM_", "NCCL_", "RCCL_", "FI_", "MIOPEN_", "HIP_", "ROCR_", "CUDA_", "OMP_", "FORGEPIPE_", "HSA_")
    return {k: v for k, v in sorted(os.environ.items()) if k.startswith(prefixes)}


class Tracker:
    """An MLflow run on rank 0; a no-op elsewhere (and when `enabled` is False)."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.run_id: str | None = None
        self.client = None
        # A resumed run repeats the steps after its last checkpoint; those steps were logged
        # already (with the same values, the run being deterministic), so they are not logged twice.
        self.skip_through_step = -1
        self.reopened_status: str | None = None  # the status of a run reopened for resuming

    @classmethod
    def start(
        cls,
        *,
        world: World,
        uri: str | None,
        experiment: str,
        run_name: str | None,
        run_id: str | None = None,
        parent_run_id: str | None = None,
        tags: dict[str, str] | None = None,
    ) -> Tracker:
        """Create (or, with run_id, reopen for resuming) a run. Only rank 0 talks to MLflow."""
        tracker = cls(enabled=world.is_main)
        if not tracker.enabled:
            return tracker
        import mlflow

        uri = resolve_tracking_uri(uri)
        mlflow.set_tracking_uri(uri)
        try:
            return cls._open(tracker, uri, experiment, run_name, run_id, parent_run_id, tags, world)
        except Exception as exc:
            from forgepipe.errors import ForgeError

            if isinstance(exc, ForgeError):
                raise
            # An unusable store (read-only, corrupt, a server that went away): one line, not a traceback.
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
            raise ForgeError(f"--tracking-uri: {uri}: {first}") from None

    @classmethod
    def _open(cls, tracker, uri, experiment, run_name, run_id, parent_run_id, tags, world) -> Tracker:
        from mlflow.tracking import MlflowClient

        with store_lock(uri):
            # Several runs starting at once on a fresh store would race on creating its schema (and
            # on creating the experiment): the first open happens under a file lock.
            client = MlflowClient(tracking_uri=uri)
            tracker.client = client
            if run_id:
                from mlflow.exceptions import MlflowException

                try:
                    tracker.reopened_status = client.get_run(run_id).info.status
                except MlflowException:
                    from forgepipe.errors import ForgeError

                    raise ForgeError(f"--tracking-uri: the run being resumed ({run_id}) is not in {uri}; "
                                     "give the store it was started in") from None
                client.update_run(run_id, status="RUNNING")
                tracker.run_id = run_id
                tracker.skip_through_step = tracker.last_logged_step()
                return tracker
            exp = client.get_experiment_by_name(experiment)
            exp_id = exp.experiment_id if exp else client.create_experiment(
                experiment, artifact_location=_artifact_root(uri) and f"{_artifact_root(uri)}/{experiment}"
            )
        all_tags = {**environment_tags(world), **(tags or {})}
        if parent_run_id:
            all_tags["mlflow.parentRunId"] = parent_run_id
        run = client.create_run(exp_id, run_name=run_name, tags=all_tags)
        tracker.run_id = run.info.run_id
        return tracker

    # Each method below is a no-op when disabled.

    def log_params(self, params: dict[str, Any]) -> None:
        if not self.enabled:
            return
        from mlflow.entities import Param

        # MLflow params are write-once: a resumed run keeps the values it started with (a
        # changed one, e.g. a longer --max-steps, is recorded as a tag instead).
        existing = self.client.get_run(self.run_id).data.params
        items = []
        for k, v in params.items():
            value = json.dumps(v) if isinstance(v, (list, dict)) else str(v)
            if k not in existing:
                items.append(Param(k, value))
            elif existing[k] != value[:MAX_PARAM_LENGTH]:
                self.client.set_tag(self.run_id, f"resumed.{k}", value[:MAX_PARAM_LENGTH])
        items = [Param(p.key, p.value[:MAX_PARAM_LENGTH]) for p in items]
        for i in range(0, len(items), 100):  # MLflow's batch limit
            self.client.log_batch(self.run_id, params=items[i:i + 100])

    def last_logged_step(self) -> int:
        """The highest step of any metric of the run (-1 when none)."""
        run = self.client.get_run(self.run_id)
        steps = [m.step for key in run.data.metrics for m in self.client.get_metric_history(self.run_id, key)]
        return max(steps, default=-1)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if not self.enabled or not metrics or step <= self.skip_through_step:
            return
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        self.client.log_batch(self.run_id, metrics=batch)

    def set_tags(self, tags: dict[str, Any]) -> None:
        if not self.enabled:
            return
        for k, v in tags.items():
            self.client.set_tag(self.run_id, k, str(v))

    def log_dict(self, data: dict[str, Any], artifact_file: str) -> None:
        if not self.enabled:
            return
        self.client.log_dict(self.run_id, data, artifact_file)

    def log_text(self, text: str, artifact_file: str) -> None:
        if not self.enabled:
            return
        self.client.log_text(self.run_id, text, artifact_file)

    def log_artifacts(self, local_dir: str | Path, artifact_path: str) -> None:
        if not self.enabled:
            return
        self.client.log_artifacts(self.run_id, str(local_dir), artifact_path)

    def log_artifacts_file(self, path: str | Path, artifact_path: str | None = None) -> None:
        if not self.enabled:
            return
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_environment(self) -> None:
        if not self.enabled:
            return
        self.log_dict(environment_snapshot(), "environment.json")
        try:
            freeze = subprocess.run(
                [sys.executable, "-m", "pip", "freeze"], capture_output=True, text=True, timeout=60
            ).stdout
        except (OSError, subprocess.SubprocessError):
            freeze = ""
        if freeze:
            self.log_text(freeze, "requirements-frozen.txt")

    def finish(self, status: str = "FINISHED") -> None:
        if not self.enabled or self.run_id is None:
            return
        if status != "FINISHED" and self.reopened_status == "FINISHED":
            # A failed or stopped attempt to extend a finished run: the run stays what it was.
            self.client.set_tag(self.run_id, "forgepipe.last_resume", status)
            status = "FINISHED"
        self.client.set_terminated(self.run_id, status=status)

    def discard(self) -> None:
        """Delete a run created by this process that never trained (bad input found after start)."""
        if not self.enabled or self.run_id is None:
            return
        with contextlib.suppress(Exception):
            self.client.delete_run(self.run_id)


@contextlib.contextmanager
def store_lock(uri: str):
    """An exclusive lock beside a SQLite store (`<db>.lock`), held while the store is first opened;
    other URIs need none. Creates the store's directory."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    db = Path(uri[len("sqlite:///"):])
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_name(db.name + ".lock"), "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Write JSON beside the target and rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as f:
        json.dump(data, f, indent=2, default=str)
        tmp = f.name
    os.replace(tmp, path)

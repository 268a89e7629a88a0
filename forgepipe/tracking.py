"""MLflow tracking, on rank 0 only.

Default store: a SQLite database inside ./mlruns with artifacts beside it, so that
`mlflow ui --backend-store-uri sqlite:///mlruns/mlflow.db` shows every run. MLflow 3.x
refuses the plain file store unless MLFLOW_ALLOW_FILE_STORE=true, and its own default is a
SQLite file in the working directory; this keeps everything in one folder. `--tracking-uri`
and MLFLOW_TRACKING_URI override it.

Every run records its resolved config (flattened params), the DeepSpeed JSON (ZeRO++ block
included) as an artifact, metrics per step, and tags describing the environment. Other ranks
get a Tracker whose methods do nothing, so stages never test the rank themselves.

What the MLflow UI shows (its charts group metrics by the part of the name before the first '/'):
- metric names carry the stage, so a chart never overlays unlike quantities (SFT's cross-entropy
  of ~6 with the reward model's pairwise loss of ~0.69). Stages log `train/<x>` and `eval/<x>`;
  the Tracker of a stage run records them as `<stage>/<x>` and `<stage>/eval_<x>` (`sft/loss`,
  `sft/eval_loss`, `reward/eval_accuracy`, `ppo/lr`). Names already under the stage (`ppo/kl`)
  and the quantities that mean the same in every stage (`perf/`, `mem/`, `time/`) stay as logged.
- run names say what the run is (`sft forge-s z3++ 16r`, see run_name_for) unless --run-name is
  given; tags carry stage, model, world size, ZeRO config, GPU kind, image, Slurm job, and the
  absolute output, checkpoint and export directories.
- the training data is an MLflow dataset input per split (the UI's Dataset column).
- a pipeline's parent run carries the config shared by its stages, each child's key results as
  its own metrics and a link to each child (record_child).

Many jobs, one store: a project's runs share one SQLite store (the default ./mlruns/mlflow.db in the
project directory) in SQLite's rollback-journal mode, never WAL (whose shared-memory index is not
shared between nodes on Lustre or NFS: a WAL store is refused, check_sqlite_store), on a filesystem
whose locks hold across nodes (lock.flock_problem). A store that another writer holds locked (a
backup, a migration, a slow filesystem, many jobs at once) is waited for, STORE_WAIT_S at most,
rather than failing the run: the first open, and every write after it (MLflow's own wait is 5-20 s).
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
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from forgepipe.config import Config
    from forgepipe.distributed import World  # not imported at run time: `forgepipe runs` needs no torch

log = logging.getLogger(__name__)

DEFAULT_STORE_DIR = "mlruns"
MAX_PARAM_LENGTH = 6000  # MLflow's limit for a param value
STORE_WAIT_ENV = "FORGEPIPE_STORE_WAIT_S"
STORE_WAIT_S = 600.0  # how long a locked store is waited for before the run fails (STORE_WAIT_ENV)


def store_wait_s() -> float:
    try:
        return float(os.environ.get(STORE_WAIT_ENV) or STORE_WAIT_S)
    except ValueError:
        return STORE_WAIT_S


def is_locked_error(exc: BaseException) -> bool:
    """A store that another writer holds: SQLite's 'database is locked' (through SQLAlchemy and MLflow)."""
    text = str(exc).lower()
    return "database is locked" in text or "database table is locked" in text


def while_locked(fn, *args, **kwargs):
    """fn(*args, **kwargs), called again while the store is locked by another writer (with a growing
    pause, store_wait_s() in all); any other error, or the last one, is raised."""
    import time

    deadline, pause = time.monotonic() + store_wait_s(), 0.2
    while True:
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            if not is_locked_error(exc) or time.monotonic() + pause > deadline:
                raise
            log.debug("MLflow store locked by another writer; again in %.1f s", pause)
            time.sleep(pause)
            pause = min(pause * 2, 2.0)


def sqlite_path(uri: str) -> Path | None:
    """The database file of a sqlite:/// URI (None for other stores and in-memory ones)."""
    if not uri.startswith("sqlite:///"):
        return None
    path = uri[len("sqlite:///"):].split("?", 1)[0]
    return None if path in ("", ":memory:") else Path(path)


def check_sqlite_store(db: Path) -> None:
    """A store in WAL mode is refused (its file header says so, bytes 18-19 = 2): WAL's shared-memory
    index is per node, so two nodes writing one store on Lustre or NFS corrupt it."""
    from forgepipe.errors import ForgeError

    try:
        with open(db, "rb") as f:
            head = f.read(20)
    except OSError:
        return
    if len(head) == 20 and head.startswith(b"SQLite format 3\x00") and 2 in (head[18], head[19]):
        raise ForgeError(f"{db} is in SQLite's WAL journal mode, which is unsafe when jobs on several nodes "
                         f"write it; switch it back first: sqlite3 {db} 'PRAGMA journal_mode=DELETE'",
                         key="tracking.uri")


def default_tracking_uri() -> str:
    store = Path(DEFAULT_STORE_DIR).resolve()
    return f"sqlite:///{store}/mlflow.db"


def absolute_uri(uri: str) -> str:
    """A local store named relative to the working directory, made absolute: the URI is written into
    forgepipe-run.json and the run's tags, and must still find the store from another directory
    (a Slurm job's, the next stage's, `forgepipe runs`). Server URIs are returned as they are."""
    if uri.startswith("sqlite:///"):
        path = uri[len("sqlite:///"):]
        return uri if path.startswith("/") or path == ":memory:" else f"sqlite:///{Path(path).resolve()}"
    if uri.startswith("file://"):
        return uri
    if uri.startswith("file:"):
        return Path(uri[len("file:"):]).resolve().as_uri()
    if "://" not in uri and ":" not in uri.split("/")[0]:
        return str(Path(uri).resolve())  # a plain directory: MLflow's file store
    return uri


def resolve_tracking_uri(uri: str | None) -> str:
    """--tracking-uri, else $MLFLOW_TRACKING_URI, else ./mlruns/mlflow.db; always absolute."""
    return absolute_uri(uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri())


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
    if os.environ.get("FORGEPIPE_BASE_IMAGE_DIGEST"):  # the base image's digest as pulled (containers/build-args.sh)
        tags["base_image_digest"] = os.environ["FORGEPIPE_BASE_IMAGE_DIGEST"]
    if os.environ.get("SLURM_JOB_ID"):
        tags["slurm_job_id"] = os.environ["SLURM_JOB_ID"]
    return tags


def stage_metric_name(stage: str | None, key: str) -> str:
    """The name a stage's metric is recorded under: `train/x` -> `<stage>/x`, `eval/x` ->
    `<stage>/eval_x`; other names (`ppo/kl`, `perf/...`, `mem/...`, `time/...`) unchanged.
    Without a stage (a bare Tracker), names are kept as logged."""
    head, sep, tail = key.partition("/")
    if not stage or not sep:
        return key
    if head == "train":
        return f"{stage}/{tail}"
    if head == "eval":
        return f"{stage}/eval_{tail}"
    return key


def short_model_name(name_or_path: str) -> str:
    """A model as a person names it: the catalog name, or the last part of its path (a stage's
    output directory rather than its `model` subdirectory)."""
    path = Path(name_or_path.rstrip("/"))
    if path.name == "model" and path.parent.name:
        path = path.parent
    return path.name or name_or_path


def zero_label(cfg: Config) -> str:
    """ZeRO stage with its options in a few characters: z0, z2+off, z3++ (ZeRO++), z3+qw."""
    d = cfg.deepspeed
    label = f"z{d.zero_stage if d.zero_stage_resolved is None else d.zero_stage_resolved}"  # auto: as resolved
    if d.zeropp:
        label += "++"
    else:
        label += "+qw" if d.quantized_weights else ""
        label += "+qg" if d.quantized_gradients else ""
    if d.offload and d.offload != "none":
        label += f"+off{'' if d.offload == 'cpu' else '-' + d.offload}"
    return label


def run_name_for(cfg: Config, world: World, stage: str | None = None) -> str:
    """The run's name in the MLflow UI: the user's --run-name, else what the run is, e.g.
    `sft forge-s z3++ 16r` (stage, model, ZeRO, ranks), so that reruns are told apart by what
    changed rather than all being `sft-sft`. `stage` names a pipeline's parent by its SFT config."""
    if cfg.tracking.run_name:
        return cfg.tracking.run_name
    return (f"{stage or cfg.stage} {short_model_name(cfg.model.name_or_path)} {zero_label(cfg)} "
            f"{world.world_size}r")


def run_tags(cfg: Config) -> dict[str, str]:
    """Tags a stage run starts with (the environment's are added by Tracker.start): what to filter
    and group by in the UI, and where the run's files are, as absolute paths."""
    out = Path(cfg.output_dir).resolve()
    return {
        "stage": cfg.stage,
        "model": short_model_name(cfg.model.name_or_path),
        "zero": zero_label(cfg),
        "dtype": str(cfg.train.dtype),
        "output_dir": str(out),
        "checkpoint_dir": str(out / "checkpoints"),
    }


def pipeline_tags(configs: dict[str, Config]) -> dict[str, str]:
    """A pipeline parent's tags: what its first stage starts from, and the pipeline's directory."""
    first = configs["sft"]
    return {"stage": "pipeline", "model": short_model_name(first.model.name_or_path), "zero": zero_label(first),
            "dtype": str(first.train.dtype), "output_dir": str(Path(first.output_dir).resolve().parent)}


def pipeline_params(configs: dict[str, Config]) -> dict[str, Any]:
    """A pipeline parent run's params: every config key, once where all stages agree, and as
    `<stage>.<key>` where they differ (model, output_dir, stage...), so that the parent alone says
    how the whole pipeline was configured. A stage's own section (`ppo.*`, `reward.*`, `dpo.*`) is
    given under that stage's name only."""
    own = {"ppo", "reward", "dpo"}  # config sections only their own stage reads
    flats = {stage: {k: v for k, v in cfg.flat().items() if k.split(".")[0] not in own - {stage}}
             for stage, cfg in configs.items()}
    keys = sorted({k for flat in flats.values() for k in flat})
    params: dict[str, Any] = {}
    for key in keys:
        values = [flat[key] for flat in flats.values() if key in flat]
        if len(values) == len(flats) and all(v == values[0] for v in values):
            params[key] = values[0]
        else:
            params.update({f"{stage}.{key}": flat[key] for stage, flat in flats.items() if key in flat})
    return params


# The figures of a finished child run that its pipeline parent records as its own metrics:
# (child stage, the child's metric candidates, newest name first) -> the parent's metric.
CHILD_RESULTS: list[tuple[str, tuple[str, ...], str]] = [
    ("sft", ("sft/eval_loss", "eval/loss"), "sft/final_eval_loss"),
    ("sft", ("sft/loss", "train/loss"), "sft/final_loss"),
    ("reward", ("reward/eval_accuracy", "eval/accuracy"), "reward/final_eval_accuracy"),
    ("reward", ("reward/loss", "train/loss"), "reward/final_loss"),
    ("ppo", ("ppo/reward_mean",), "ppo/final_reward_mean"),
    ("ppo", ("ppo/score_mean",), "ppo/final_score_mean"),
    ("ppo", ("ppo/kl",), "ppo/final_kl"),
    ("ppo", ("ppo/eval_score",), "ppo/final_eval_score"),
    ("ppo", ("ppo/eval_win_rate",), "ppo/final_eval_win_rate"),
    ("ppo", ("ppo/eval_kl",), "ppo/final_eval_kl"),
    ("dpo", ("dpo/eval_accuracy", "eval/accuracy"), "dpo/final_eval_accuracy"),
    ("dpo", ("dpo/eval_loss", "eval/loss"), "dpo/final_eval_loss"),
]


def dataset_digest(splits: dict[str, Any]) -> str:
    """A short fingerprint of the rows a run trained and evaluated on: the `datasets` fingerprints
    of its splits (which follow the source files' contents and the split), hashed together."""
    import hashlib

    parts = [f"{name}:{getattr(ds, '_fingerprint', None) or len(ds)}" for name, ds in sorted(splits.items())
             if ds is not None]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:12]


def environment_snapshot() -> dict[str, Any]:
    """The launch-relevant environment variables, logged as an artifact for later comparison."""
    prefixes = ("SLURM_", "NCCL_", "RCCL_", "FI_", "MIOPEN_", "HIP_", "ROCR_", "CUDA_", "OMP_", "FORGEPIPE_", "HSA_")
    return {k: v for k, v in sorted(os.environ.items()) if k.startswith(prefixes)}


def first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]


class _DropStoreErrors(logging.Filter):
    """MLflow's SQL store logs every database error with its traceback (some 40 lines) before raising
    it; the Tracker says what failed in one line instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < logging.ERROR


_MLFLOW_DB_LOG = "mlflow.store.db.utils"


@contextlib.contextmanager
def quiet_store_errors():
    logger, drop = logging.getLogger(_MLFLOW_DB_LOG), _DropStoreErrors()
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


def recorded(what: str):
    """A Tracker write (what: its words in the warning): a no-op when the Tracker is disabled, and
    never fatal. A store that cannot be written in the middle of a run (a full or read-only
    filesystem, a server that went away, a corrupt database) does not end the training: the first
    failed write logs one warning naming the store and the error, the writes after it are skipped
    without a word (each would wait and fail again), and finish() says the run's record is
    incomplete. The checkpoints and the export, the run's product, are written as usual."""
    import functools

    def wrap(fn):
        @functools.wraps(fn)
        def method(self, *args, **kwargs):
            if not self.enabled:
                return None
            if self.write_error is not None:
                self.skipped_writes += 1
                return None
            try:
                with quiet_store_errors():
                    return fn(self, *args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - the record of a run is never a reason to lose the run
                self.write_failed(what, exc)
                return None
        return method
    return wrap


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
        self.reopened_end_time: int | None = None  # and its end time (kept when an extension fails)
        self.stage: str | None = None  # prefixes the metric names (stage_metric_name)
        self.uri: str | None = None  # the store, absolute
        self._held: list[tuple[str, tuple, dict]] | None = None  # writes held back (hold())
        self.write_error: str | None = None  # the first write the store refused (recorded()), in words
        self.skipped_writes = 0  # the writes skipped after it

    def write_failed(self, what: str, exc: BaseException) -> None:
        self.write_error = f"{what}: {first_line(exc)}"
        log.warning("MLflow store %s cannot be written (%s); training goes on, checkpoints and the export are "
                    "written as usual, and this run's further MLflow records are skipped: run %s will be "
                    "incomplete", self.uri, self.write_error, self.run_id)

    def hold(self) -> None:
        """Hold back the run's params, tags and artifacts from here on (a reopened run, until training
        continues: an extension that fails before leaves the run as it was); metrics are not held."""
        self._held = []

    def unhold(self) -> list[tuple[str, tuple, dict]]:
        """Stop holding; the held writes, for replay()."""
        held, self._held = self._held or [], None
        return held

    def replay(self, held: list[tuple[str, tuple, dict]]) -> None:
        for name, args, kwargs in held:
            getattr(self, name)(*args, **kwargs)

    def _holding(self, name: str, *args, **kwargs) -> bool:
        if self._held is None:
            return False
        self._held.append((name, args, kwargs))
        return True

    @classmethod
    def for_stage(cls, cfg: Config, world: World, *, run_id: str | None = None,
                  parent_run_id: str | None = None, tags: dict[str, str] | None = None) -> Tracker:
        """A stage's run: named by run_name_for, tagged by run_tags and `tags` (or reopened for resuming)."""
        return cls.start(world=world, uri=cfg.tracking.uri, experiment=cfg.tracking.experiment,
                         run_name=run_name_for(cfg, world), run_id=run_id, parent_run_id=parent_run_id,
                         tags={**run_tags(cfg), **(tags or {})})

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
        tracker.stage = (tags or {}).get("stage")
        if not tracker.enabled:
            return tracker
        import mlflow

        uri = resolve_tracking_uri(uri)
        tracker.uri = uri
        mlflow.set_tracking_uri(uri)
        try:
            if sqlite_path(uri) is not None:
                check_sqlite_store(sqlite_path(uri))
            return while_locked(cls._open, tracker, uri, experiment, run_name, run_id, parent_run_id, tags, world)
        except Exception as exc:
            from forgepipe.errors import ForgeError

            if isinstance(exc, ForgeError):
                raise
            # An unusable store (read-only, corrupt, a server that went away): one line, not a traceback.
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
            raise ForgeError(f"{uri}: {first}", key="tracking.uri") from None

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
                    info = client.get_run(run_id).info
                except MlflowException as exc:
                    if is_locked_error(exc):
                        raise
                    from forgepipe.errors import ForgeError

                    raise ForgeError(f"the run being resumed ({run_id}) is not in {uri}; "
                                     "give the store it was started in", key="tracking.uri") from None
                tracker.reopened_status, tracker.reopened_end_time = info.status, info.end_time
                client.update_run(run_id, status="RUNNING")
                tracker.run_id = run_id
                tracker.skip_through_step = tracker.last_logged_step()
                return tracker
            exp = client.get_experiment_by_name(experiment)
            exp_id = exp.experiment_id if exp else client.create_experiment(
                experiment, artifact_location=_artifact_root(uri) and f"{_artifact_root(uri)}/{experiment}"
            )
        all_tags = {**environment_tags(world), "tracking_uri": uri, **(tags or {})}
        if parent_run_id:
            all_tags["mlflow.parentRunId"] = parent_run_id
        if tracker.run_id is None:  # not created yet by an attempt that met a locked store
            run = client.create_run(exp_id, run_name=run_name, tags=all_tags)
            tracker.run_id = run.info.run_id
        return tracker

    # Each method below is a no-op when disabled.

    @recorded("logging params")
    def log_params(self, params: dict[str, Any]) -> None:
        if not self.enabled:
            return
        if self._holding("log_params", params):
            return
        from mlflow.entities import Param

        # MLflow params are write-once: a resumed run keeps the values it started with (a
        # changed one, e.g. a longer --max-steps, is recorded as a tag `resumed.<key>` instead, and
        # that tag goes again when a later resume sets the value back).
        data = while_locked(self.client.get_run, self.run_id).data
        existing, tags = data.params, data.tags
        items = []
        for k, v in params.items():
            value = json.dumps(v) if isinstance(v, (list, dict)) else str(v)
            if k not in existing:
                items.append(Param(k, value))
            elif existing[k] != value[:MAX_PARAM_LENGTH]:
                if tags.get(f"resumed.{k}") != value[:MAX_PARAM_LENGTH]:
                    while_locked(self.client.set_tag, self.run_id, f"resumed.{k}", value[:MAX_PARAM_LENGTH])
            elif f"resumed.{k}" in tags:
                while_locked(self.client.delete_tag, self.run_id, f"resumed.{k}")
        items = [Param(p.key, p.value[:MAX_PARAM_LENGTH]) for p in items]
        for i in range(0, len(items), 100):  # MLflow's batch limit
            while_locked(self.client.log_batch, self.run_id, params=items[i:i + 100])

    def last_logged_step(self) -> int:
        """The highest step of any metric of the run (-1 when none)."""
        run = self.client.get_run(self.run_id)
        steps = [m.step for key in run.data.metrics for m in self.client.get_metric_history(self.run_id, key)]
        return max(steps, default=-1)

    @recorded("logging metrics")
    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if not self.enabled or not metrics or step <= self.skip_through_step:
            return
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(stage_metric_name(self.stage, k), float(v), now, step) for k, v in metrics.items()]
        while_locked(self.client.log_batch, self.run_id, metrics=batch)

    @recorded("logging the datasets")
    def log_datasets(self, sources: list[str], splits: dict[str, Any]) -> None:
        """The data the run trained on as MLflow dataset inputs, one per split (context `training`,
        `evaluation`): name = the sources' file names, source = their absolute paths (or Hub
        names), digest = dataset_digest of the split, profile = the rows of every split. The UI's
        Dataset column then says what each run read."""
        if not self.enabled:
            return
        if self._holding("log_datasets", sources, splits):
            return
        from mlflow.entities import Dataset, DatasetInput, InputTag

        present = {split: ds for split, ds in splits.items() if ds is not None}
        rows = {split: len(ds) for split, ds in present.items()}
        name = "+".join(short_model_name(s) for s in sources) or "data"
        local = all(Path(s).exists() for s in sources)
        located = [str(Path(s).resolve()) if Path(s).exists() else s for s in sources]
        source = json.dumps({"uri": located[0] if len(located) == 1 else located})
        profile = json.dumps({"rows": rows, "stage": self.stage})
        context = {"train": "training", "eval": "evaluation"}
        inputs = [
            DatasetInput(Dataset(name=name, digest=dataset_digest({split: ds}), source_type="local" if local else "hub",
                                 source=source, profile=profile),
                         tags=[InputTag("mlflow.data.context", context.get(split, split))])
            for split, ds in present.items()
        ]
        self.client.log_inputs(self.run_id, datasets=inputs)
        self.log_params({f"data.rows.{split}": n for split, n in rows.items()})

    @recorded("recording a pipeline stage")
    def record_child(self, stage: str, child_run_id: str | None) -> None:
        """On a pipeline's parent run: the child's key results as the parent's own metrics
        (CHILD_RESULTS, at the child's last step) and a link to the child (tags `child.<stage>`,
        its id, and `child.<stage>.url`, the UI's address of it relative to the server)."""
        if not self.enabled or not child_run_id:
            return
        if self._holding("record_child", stage, child_run_id):
            return
        child = self.client.get_run(child_run_id)
        metrics = {}
        for child_stage, candidates, parent_key in CHILD_RESULTS:
            found = next((k for k in candidates if k in child.data.metrics), None)
            if child_stage == stage and found:
                metrics[parent_key] = child.data.metrics[found]
        if metrics:
            import time

            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, 0) for k, v in metrics.items()])
        self.set_tags({f"child.{stage}": child_run_id,
                       f"child.{stage}.url": f"#/experiments/{child.info.experiment_id}/runs/{child_run_id}"})

    @recorded("setting tags")
    def set_tags(self, tags: dict[str, Any]) -> None:
        if not self.enabled:
            return
        if self._holding("set_tags", tags):
            return
        for k, v in tags.items():
            while_locked(self.client.set_tag, self.run_id, k, str(v))

    @recorded("deleting tags")
    def delete_tags(self, keys) -> None:
        """Remove the run's tags of these names (those it has)."""
        if not self.enabled:
            return
        if self._holding("delete_tags", keys):
            return
        present = while_locked(self.client.get_run, self.run_id).data.tags
        for key in keys:
            if key in present:
                while_locked(self.client.delete_tag, self.run_id, key)

    @recorded("logging an artifact")
    def log_dict(self, data: dict[str, Any], artifact_file: str) -> None:
        if not self.enabled:
            return
        if self._holding("log_dict", data, artifact_file):
            return
        self.client.log_dict(self.run_id, data, artifact_file)

    @recorded("logging an artifact")
    def log_text(self, text: str, artifact_file: str) -> None:
        if not self.enabled:
            return
        if self._holding("log_text", text, artifact_file):
            return
        self.client.log_text(self.run_id, text, artifact_file)

    @recorded("logging a table")
    def log_table(self, data: dict[str, list], artifact_file: str) -> None:
        """MLflow's table artifact (the UI's evaluation view), through the Tracker so that a store that
        fails is one warning (recorded())."""
        if self._holding("log_table", data, artifact_file):
            return
        self.client.log_table(self.run_id, data=data, artifact_file=artifact_file)

    @recorded("logging artifacts")
    def log_artifacts(self, local_dir: str | Path, artifact_path: str) -> None:
        if not self.enabled:
            return
        if self._holding("log_artifacts", local_dir, artifact_path):
            return
        self.client.log_artifacts(self.run_id, str(local_dir), artifact_path)

    @recorded("logging an artifact")
    def log_artifacts_file(self, path: str | Path, artifact_path: str | None = None) -> None:
        if not self.enabled:
            return
        if self._holding("log_artifacts_file", path, artifact_path):
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
        end_time = None
        try:
            with quiet_store_errors():
                if self.write_error is not None:  # tried again: the store may be back (a filesystem remounted)
                    while_locked(self.client.set_tag, self.run_id, "forgepipe.record",
                                 f"incomplete: {self.skipped_writes} writes skipped after {self.write_error}")
                if status != "FINISHED" and self.reopened_status == "FINISHED":
                    # A failed or stopped attempt to extend a finished run: the run stays what it was, its
                    # end time too.
                    while_locked(self.client.set_tag, self.run_id, "forgepipe.last_resume", status)
                    status, end_time = "FINISHED", self.reopened_end_time
                while_locked(self.client.set_terminated, self.run_id, status=status, end_time=end_time)
        except Exception as exc:  # noqa: BLE001 - said in one line; the run's files are complete
            if self.write_error is None:
                self.write_error = f"ending the run: {first_line(exc)}"
            log.warning("MLflow run %s in %s is incomplete and still says RUNNING: %d writes were skipped after "
                        "%s, and ending it as %s failed too (%s); its checkpoints and export are complete",
                        self.run_id, self.uri, self.skipped_writes, self.write_error, status, first_line(exc))
            return
        if self.write_error is not None:
            log.warning("MLflow run %s in %s is incomplete: %d writes were skipped after %s; it is ended as %s, "
                        "tagged forgepipe.record, and its checkpoints and export are complete", self.run_id,
                        self.uri, self.skipped_writes, self.write_error, status)

    def discard(self) -> None:
        """Delete a run created by this process that never trained (bad input found after start)."""
        if not self.enabled or self.run_id is None:
            return
        with contextlib.suppress(Exception):
            self.client.delete_run(self.run_id)


def close_abandoned(record: dict[str, Any] | None, directory: str | Path) -> str | None:
    """The MLflow run a process that died in `directory` left RUNNING (named by the record it left in
    the directory's lock file, lock.OutputLock.stale), marked KILLED with a tag saying how it was
    found; returns its id when it did so. A run that ended, or a store that cannot be reached, is
    left as it is (a warning)."""
    if not record or not record.get("run_id") or not record.get("tracking_uri"):
        return None
    run_id, uri = record["run_id"], record["tracking_uri"]
    try:
        from mlflow.tracking import MlflowClient

        if sqlite_path(uri) is not None and not sqlite_path(uri).is_file():
            return None
        client = MlflowClient(tracking_uri=uri)
        if while_locked(client.get_run, run_id).info.status != "RUNNING":
            return None
        import time

        from forgepipe.lock import holder_words

        while_locked(client.set_tag, run_id, "forgepipe.ended",
                     f"killed: its process ({holder_words(record)}) died without ending the run; found by the "
                     f"next start in {directory} at {time.strftime('%Y-%m-%d %H:%M:%S')}")
        while_locked(client.set_terminated, run_id, status="KILLED")
    except Exception as exc:  # noqa: BLE001 - a record to tidy, never a reason to fail this run
        log.warning("could not mark MLflow run %s (left RUNNING by a process that died) as KILLED: %s", run_id,
                    (str(exc).splitlines() or [type(exc).__name__])[0][:200])
        return None
    log.warning("MLflow run %s was left RUNNING by a process that died in %s (%s): marked KILLED", run_id,
                directory, holder_words(record))
    return run_id


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


def group_readable(path: str | Path) -> None:
    """The mode a plain file gets under the current umask (with group read, see layout.share_with_group),
    for files made by tempfile, which creates them 0600 whatever the umask."""
    current = os.umask(0)
    os.umask(current)
    os.chmod(path, (0o666 & ~current) | 0o040)


def share_tree(root: str | Path) -> None:
    """Add group read (and, for directories, enter) to everything under `root`: some writers create
    their files 0600 whatever the umask (safetensors' model.safetensors in an export). Run on rank 0
    over a finished export; group write is never added."""
    import stat

    root = Path(root)
    for path in [root, *root.rglob("*")]:
        if path.is_symlink():
            continue
        mode = stat.S_IMODE(path.stat().st_mode)
        wanted = mode | stat.S_IRGRP | (stat.S_IXGRP if path.is_dir() else 0)
        if wanted != mode:
            os.chmod(path, wanted)


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Write JSON beside the target and rename it into place (readable by the group)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as f:
        json.dump(data, f, indent=2, default=str)
        tmp = f.name
    group_readable(tmp)
    os.replace(tmp, path)

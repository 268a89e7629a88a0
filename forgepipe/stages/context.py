"""Where a stage runs: the launched world, the stop signals, the process group, the output directory.

A recipe reads:

    with StageContext(cfg, parent_run_id) as ctx:      # launch checks, process group, seed
        ... load the tokenizer and the data (ctx.world, ctx.cache_dir) ...
        run = ctx.begin(models, ds_configs)            # resume checks, output dir, MLflow run
        engine = run.build_engine(...); run.resume({"model": engine})
        ... train (loop.drive) and export ...
        return run.finish(model_dir)                   # -> StageResult

Leaving the context closes the run record with the run's status; a stage that failed on bad input
before training leaves nothing behind (no output directory, no MLflow run).

For the life of the context rank 0 holds the output directory's lock (lock.py): a second run into
the same directory is refused in one line naming the first, and a run that died there without
ending its MLflow run (kill -9, a lost node) has that run marked KILLED by the next start.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import torch

from forgepipe import distributed as dist
from forgepipe.checkpoint import find_latest
from forgepipe.config import Config
from forgepipe.data.ledger import stage_line
from forgepipe.deepspeed_config import validate_launch
from forgepipe.errors import ForgeError
from forgepipe.layout import CHECKPOINT_DIR, CONFIG_FILE, MODEL_SUBDIR, PROFILE_FILE, RUN_FILE
from forgepipe.lock import NO_LOCK_ENV, OutputLock, check_locking, holder_record
from forgepipe.preflight import check_output_dir, earlier_run, resolve_zero_stage
from forgepipe.signals import STOP, Preempted, StartupStop, StopRequest
from forgepipe.stages.record import RunRecord, check_resume
from forgepipe.tracking import close_abandoned, resolve_tracking_uri, sqlite_path

log = logging.getLogger(__name__)


class StageContext:
    """One stage's launch: see the module docstring."""

    def __init__(self, cfg: Config, parent_run_id: str | None = None, stop: StopRequest = STOP):
        self.cfg, self.parent_run_id, self.stop = cfg, parent_run_id, stop
        self.output_dir = Path(cfg.output_dir)
        self.cache_dir = cfg.data.cache_dir or str(self.output_dir / ".cache")
        self.world = dist.World()
        self.record: RunRecord | None = None
        self.lock: OutputLock | None = None  # the output directory's, on rank 0
        self._created_output = self._created_cache = self._owns_process_group = False

    def __enter__(self) -> StageContext:
        # A signal from here until training starts stops the stage at once: tokenizing or loading
        # models can take many minutes, and there is nothing to checkpoint yet.
        self.stop.startup()
        check_output_dir(self.cfg)
        self.world = dist.detect_world()
        validate_launch(self.cfg, self.world, has_gpu=torch.cuda.is_available())
        self._created_output = not self.output_dir.exists()
        self._created_cache = not Path(self.cache_dir).exists()
        self._owns_process_group = not dist.is_initialized()  # a pipeline keeps one for all stages
        dist.init_distributed(self.world, timeout_minutes=self.cfg.train.dist_timeout_minutes)
        try:
            self._lock_output_dir()
            resolve_zero_stage(self.cfg, self.world)  # --zero-stage auto, before any DeepSpeed JSON is built
        except BaseException:
            self._release_lock()
            if self._created_output and self.world.is_main:
                shutil.rmtree(self.output_dir, ignore_errors=True)
            if self._owns_process_group:
                dist.teardown()
            raise
        torch.manual_seed(self.cfg.train.seed)
        return self

    def _lock_output_dir(self) -> None:
        """Rank 0 checks that file locks hold in the output and store directories and takes the output
        directory's lock; a refusal (one line naming the run holding it) reaches every rank. Collective.
        A run that died here and left its MLflow run RUNNING has it marked KILLED."""
        dist.barrier()  # every rank is past the pre-launch checks: the lock below is this launch's own
        refusal = None
        if self.world.is_main:
            try:
                check_locking(self.output_dir, sqlite_path(resolve_tracking_uri(self.cfg.tracking.uri)))
                if os.environ.get(NO_LOCK_ENV) != "1":
                    self.lock = OutputLock.acquire(self.output_dir, holder_record(self.cfg.stage))
            except ForgeError as exc:
                refusal = str(exc)
        refusal = dist.broadcast_object(refusal)
        if refusal:
            raise ForgeError(refusal)
        if self.lock is not None and self.lock.stale:
            close_abandoned(self.lock.stale, self.output_dir)

    def _release_lock(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def find_resume(self) -> Path | None:
        mode = self.cfg.train.resume
        if self.cfg.overwrite or mode == "never":
            return None
        return find_latest(self.output_dir) if mode == "auto" else Path(mode)

    def begin(self, models: dict[str, str], ds_configs: dict[str, dict]) -> RunRecord:
        """The data and models are known: check the resume, prepare the output directory, and open
        the run record (the MLflow run). `models` are the resolved paths the stage starts from.
        First, one line says what data the stage trains on (data/ledger.py)."""
        line = stage_line(self.cfg.stage)
        if line and self.world.is_main:
            log.info("%s", line)
        resumed = check_resume(self.cfg, self.world, models, self.find_resume())
        if self.cfg.overwrite and self.world.is_main:
            self._remove_earlier_outputs()
        dist.barrier()
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.record = RunRecord.open(self.cfg, self.world, models, resumed, self.parent_run_id, ds_configs)
        if self.lock is not None:  # a process that dies from here on leaves its run to be marked KILLED
            self.lock.update(run_id=self.record.tracker.run_id, tracking_uri=self.record.tracker.uri)
        return self.record

    def _remove_earlier_outputs(self) -> None:
        """--overwrite: what an earlier run left goes first (its MLflow record stays as it was)."""
        found = earlier_run(self.output_dir)
        removed = []
        for name in (MODEL_SUBDIR, CHECKPOINT_DIR, RUN_FILE, CONFIG_FILE, PROFILE_FILE, MODEL_SUBDIR + ".partial"):
            path = self.output_dir / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
            else:
                continue
            removed.append(name)
        if removed:
            log.warning("--overwrite: removed %s of %s from %s", ", ".join(removed), found or "an earlier run",
                        self.output_dir)

    def __exit__(self, exc_type, exc, tb) -> None:
        self.stop.remember()  # a second signal during the clean-up below must not interrupt it
        failed = exc_type is not None
        status = "FINISHED" if not failed else "KILLED" if issubclass(exc_type, Preempted) else "FAILED"
        training = self.record is not None and self.record.training
        bad_input = failed and not training and issubclass(exc_type, (ForgeError, StartupStop))
        if self.record is not None:
            if bad_input and self.record.tracker.reopened_status is None:
                self.record.tracker.discard()  # a new run that never trained: no MLflow record of it
            else:
                self.record.tracker.finish(status)
        if bad_input and self.world.is_main:
            # Failed before training started (bad input): leave nothing behind.
            if self._created_output:
                shutil.rmtree(self.output_dir, ignore_errors=True)
            elif self._created_cache:
                shutil.rmtree(self.cache_dir, ignore_errors=True)
        try:
            if self._owns_process_group:
                dist.teardown()
        finally:
            self._release_lock()

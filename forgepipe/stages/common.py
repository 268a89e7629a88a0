"""What every stage does around its own work: checks, output directory, tracking, resume, export.

A stage recipe reads as: `with StageRun(cfg) as run:` -> check inputs -> `run.begin(...)`
(output dir + MLflow run) -> build engines -> `run.resume(...)` -> train -> `run.export(...)`.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from forgepipe import distributed as dist
from forgepipe.checkpoint import find_latest, load_checkpoint, read_loop_state
from forgepipe.config import Config
from forgepipe.deepspeed_config import PROFILE_FILE, validate_launch
from forgepipe.engine import initialize, zero3_loading
from forgepipe.errors import ForgeError
from forgepipe.loop import STOP, LoopSettings, LoopState, StopRequest
from forgepipe.tracking import Tracker, write_json_atomic

log = logging.getLogger(__name__)

RUN_FILE = "forgepipe-run.json"  # what a stage leaves for the next one (and for resuming)
MODEL_SUBDIR = "model"


def resolve_stage_output(path: str) -> str:
    """A stage output directory stands for the model it exported (`<dir>/model`)."""
    candidate = Path(path) / MODEL_SUBDIR
    if (candidate / "config.json").is_file():
        return str(candidate)
    return path


def loop_settings(cfg: Config) -> LoopSettings:
    t = cfg.train
    return LoopSettings(
        epochs=t.epochs, max_steps=t.max_steps, micro_batch=t.per_device_batch_size, grad_accum=t.grad_accum,
        seed=t.seed, log_every=t.log_every, eval_every=t.eval_every, save_every=t.save_every,
        save_every_minutes=t.save_every_minutes, keep_last=t.keep_last, peak_tflops=t.peak_tflops,
    )


@dataclass
class StageRun:
    """One stage's run: the world, the output directory, the MLflow run and the loop state."""

    cfg: Config
    parent_run_id: str | None = None
    world: dist.World = field(default_factory=dist.World)
    tracker: Tracker = field(default_factory=lambda: Tracker(enabled=False))
    state: LoopState = field(default_factory=LoopState)
    resume_from: Path | None = None
    stop: StopRequest = field(default_factory=lambda: STOP)
    _created_output: bool = False
    _begun: bool = False
    _owns_process_group: bool = False

    @property
    def output_dir(self) -> Path:
        return Path(self.cfg.output_dir)

    def __enter__(self) -> StageRun:
        # First: Slurm's walltime warning may come while the run is still starting up, and
        # SIGUSR1's default action would kill the process instead of stopping it at a step.
        self.stop.install()
        if not self.cfg.output_dir:
            raise ForgeError("--output-dir: required")
        self.world = dist.detect_world()
        validate_launch(self.cfg, self.world, has_gpu=torch.cuda.is_available())
        self._created_output = not self.output_dir.exists()
        self.resume_from = self._find_resume()
        self._owns_process_group = not dist.is_initialized()  # a pipeline keeps one for all stages
        dist.init_distributed(self.world, timeout_minutes=self.cfg.train.dist_timeout_minutes)
        torch.manual_seed(self.cfg.train.seed)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        status = "FINISHED" if exc_type is None else "KILLED" if exc_type.__name__ == "Preempted" else "FAILED"
        self.tracker.finish(status)
        if exc_type is not None and not self._begun and self._created_output and self.world.is_main:
            # Failed before training started (bad input): leave nothing behind.
            shutil.rmtree(self.output_dir, ignore_errors=True)
        if self._owns_process_group:
            dist.teardown()

    def _find_resume(self) -> Path | None:
        mode = self.cfg.train.resume
        if mode == "never":
            return None
        if mode != "auto":
            return Path(mode)
        return find_latest(self.output_dir)

    @property
    def cache_dir(self) -> str:
        return self.cfg.data.cache_dir or str(self.output_dir / ".cache")

    def begin(self, fingerprint: dict[str, Any], ds_configs: dict[str, dict]) -> None:
        """Create the output directory and the MLflow run (or reopen it when resuming)."""
        cfg = self.cfg
        fingerprint = {**fingerprint, "stage": cfg.stage, "world_size": self.world.world_size}
        run_id = None
        if self.resume_from is not None:
            previous = read_loop_state(self.resume_from)
            changed = {k: (previous.get("fingerprint", {}).get(k), v) for k, v in fingerprint.items()
                       if previous.get("fingerprint", {}).get(k) != v}
            if changed:
                key, (old, new) = next(iter(changed.items()))
                raise ForgeError(
                    f"--resume: {self.resume_from} was written with {key}={old!r}, this run has {new!r}; "
                    "use a new --output-dir or --resume never"
                )
            run_id = previous.get("run_id")
        self.state.fingerprint = fingerprint
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self._begun = True
        self.tracker = Tracker.start(
            world=self.world, uri=cfg.tracking.uri, experiment=cfg.tracking.experiment,
            run_name=cfg.tracking.run_name or f"{cfg.stage}-{self.output_dir.name}",
            run_id=run_id, parent_run_id=self.parent_run_id, tags={"stage": cfg.stage},
        )
        self.state.run_id = dist.broadcast_object(self.tracker.run_id)
        self.tracker.log_params(cfg.flat())  # on a resumed run, changed values become resumed.* tags
        if run_id is None:
            for name, ds_json in ds_configs.items():
                self.tracker.log_dict(ds_json, f"deepspeed/{name}.json")
            self.tracker.log_text(cfg.to_yaml(), "config.yaml")
            self.tracker.log_environment()
        if self.world.is_main:
            (self.output_dir / "config.yaml").write_text(cfg.to_yaml())

    def data_fingerprint(self, model_path: str) -> dict[str, Any]:
        """What a supervised stage's resume must match (StageRun.begin adds stage and world size)."""
        d = self.cfg.data
        return {"model": model_path, "data": list(d.sources), "split": d.split, "seed": self.cfg.train.seed,
                "max_seq_len": d.max_seq_len}

    def build_engine(self, ds_json: dict, build_model, *, total_steps: int | None = None):
        """A DeepSpeed engine around `build_model()`, loaded straight into ZeRO-3 partitions at
        stage 3; trained with the config's schedule when the JSON has an optimizer, frozen otherwise."""
        with zero3_loading(ds_json):
            model = build_model()
        t = self.cfg.train
        return initialize(model, ds_json, weight_decay=t.weight_decay, total_steps=total_steps or 0,
                          warmup_ratio=t.warmup_ratio, min_lr_ratio=t.min_lr_ratio)

    def resume(self, engines: dict[str, Any]) -> None:
        """Restore engines, RNG and loop state from the checkpoint found at start, if any."""
        if self.resume_from is None:
            return
        loaded = LoopState.from_dict(load_checkpoint(engines, self.resume_from))
        loaded.fingerprint = self.state.fingerprint
        loaded.run_id = self.state.run_id
        self.state = loaded
        log.info("resumed from %s at step %d", self.resume_from, self.state.step)

    def finish(self, model_dir: Path, extra: dict[str, Any] | None = None) -> None:
        """Record where the model is, for the user, MLflow and the next stage."""
        summary = {
            "stage": self.cfg.stage,
            "model_dir": str(model_dir.resolve()),
            "mlflow_run_id": self.state.run_id,
            "tracking_uri": self.cfg.tracking.uri,
            "steps": self.state.step,
            **(extra or {}),
        }
        if self.world.is_main:
            write_json_atomic(self.output_dir / RUN_FILE, summary)
        self.tracker.set_tags({"model_dir": summary["model_dir"]})
        profile = self.output_dir / PROFILE_FILE
        if profile.is_file():
            self.tracker.log_artifacts_file(profile)
        if self.cfg.tracking.log_checkpoints:
            self.tracker.log_artifacts(model_dir, "model")

"""What every stage does around its own work: checks, output directory, tracking, resume, export.

A stage recipe reads as: `with StageRun(cfg) as run:` -> check inputs -> `run.begin(...)`
(output dir + MLflow run) -> build engines -> `run.resume(...)` -> train -> `run.export(...)`.
"""

from __future__ import annotations

import contextlib
import io
import logging
import shutil
import signal
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
from forgepipe.loop import STOP, LoopSettings, LoopState, Preempted, StopRequest
from forgepipe.preflight import check_output_dir, earlier_run, option_name, resume_changes
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


class StartupStop(Preempted):
    """A stop signal before training started: nothing to checkpoint, the run stops at once."""


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
    _created_cache: bool = False
    _begun: bool = False
    _training: bool = False
    _old_world: int | None = None  # the world size of the checkpoint resumed from, when it differs

    def _universal(self) -> bool:
        return self._old_world is not None
    _owns_process_group: bool = False

    @property
    def output_dir(self) -> Path:
        return Path(self.cfg.output_dir)

    def __enter__(self) -> StageRun:
        # First: Slurm's walltime warning may come while the run is still starting up, and
        # SIGUSR1's default action would kill the process instead of stopping it at a step.
        self.stop.install()
        self._startup_signals()
        check_output_dir(self.cfg)
        self.world = dist.detect_world()
        validate_launch(self.cfg, self.world, has_gpu=torch.cuda.is_available())
        self._created_output = not self.output_dir.exists()
        self._created_cache = not Path(self.cache_dir).exists()
        self.resume_from = None if self.cfg.overwrite else self._find_resume()
        self._owns_process_group = not dist.is_initialized()  # a pipeline keeps one for all stages
        dist.init_distributed(self.world, timeout_minutes=self.cfg.train.dist_timeout_minutes)
        torch.manual_seed(self.cfg.train.seed)
        return self

    def _startup_signals(self) -> None:
        """Until the loop starts (StageRun.resume), a stop signal stops at once: tokenizing or
        loading models can take many minutes, and there is nothing to checkpoint yet."""
        from forgepipe import signals

        if signals.received is not None and self.stop.signal is None:
            self.stop.signal = signals.received
        if self.stop.signal is not None:  # arrived while the command line was read
            raise StartupStop(f"stopped by signal {self.stop.signal} during start-up, before training")

        def handler(signum, frame):
            self.stop.signal = signum
            raise StartupStop(f"stopped by signal {signum} during start-up, before training")

        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, handler)

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None and issubclass(exc_type, StartupStop):
            self.stop.install()
        status = "FINISHED" if exc_type is None else "KILLED" if issubclass(exc_type, Preempted) else "FAILED"
        before_training = exc_type is not None and not self._training
        bad_input = before_training and issubclass(exc_type, (ForgeError, StartupStop))
        if bad_input and self.tracker.reopened_status is None:
            self.tracker.discard()  # a new run that never trained: no MLflow record of it
        else:
            self.tracker.finish(status)
        if bad_input and self.world.is_main:
            # Failed before training started (bad input): leave nothing behind.
            if self._created_output:
                shutil.rmtree(self.output_dir, ignore_errors=True)
            elif self._created_cache:
                shutil.rmtree(self.cache_dir, ignore_errors=True)
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
        flat = cfg.flat()
        fingerprint = {**fingerprint, "stage": cfg.stage, "world_size": self.world.world_size}
        run_id = None
        honoured: dict[str, tuple] = {}
        if self.resume_from is not None:
            previous = read_loop_state(self.resume_from)
            before = previous.get("fingerprint", {})
            changed = {k: (before.get(k), v) for k, v in fingerprint.items()
                       if before.get(k) != v and not (k == "world_size" and before.get("config"))}
            if changed:
                key, (old, new) = next(iter(changed.items()))
                raise ForgeError(
                    f"--resume: {self.resume_from} was written with {key}={old!r}, this run has {new!r}; "
                    "use a new --output-dir or --overwrite"
                )
            if before.get("config"):
                honoured = resume_changes(before, flat, self.world.world_size, str(self.resume_from))
            run_id = previous.get("run_id")
        self.state.fingerprint = {**fingerprint, "config": flat}
        if cfg.overwrite and self.world.is_main:
            self._remove_earlier_outputs()
        dist.barrier()
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self._begun = True
        self.tracker = Tracker.start(
            world=self.world, uri=cfg.tracking.uri, experiment=cfg.tracking.experiment,
            run_name=cfg.tracking.run_name or f"{cfg.stage}-{self.output_dir.name}",
            run_id=run_id, parent_run_id=self.parent_run_id, tags={"stage": cfg.stage},
        )
        self.state.run_id = dist.broadcast_object(self.tracker.run_id)
        self.tracker.log_params(flat)  # on a resumed run, changed values become resumed.* tags
        for key, (old, new) in honoured.items():
            log.warning("resume: %s changed from %r to %r: honoured (LR schedule recomputed from step %d)",
                        option_name(key), old, new, read_loop_state(self.resume_from).get("step", 0))
        self._old_world = honoured.get("world_size", (None, None))[0]
        if honoured:
            self.tracker.set_tags({"resumed.changed": ", ".join(sorted(honoured))})
        self._log_dropped_rows()
        if run_id is None:
            for name, ds_json in ds_configs.items():
                self.tracker.log_dict(ds_json, f"deepspeed/{name}.json")
            self.tracker.log_text(cfg.to_yaml(), "config.yaml")
            self.tracker.log_environment()
        if self.world.is_main:
            (self.output_dir / "config.yaml").write_text(cfg.to_yaml())

    def _remove_earlier_outputs(self) -> None:
        """--overwrite: what an earlier run left goes first (its MLflow record stays as it was)."""
        found = earlier_run(self.output_dir)
        removed = []
        for name in (MODEL_SUBDIR, "checkpoints", RUN_FILE, "config.yaml", PROFILE_FILE, MODEL_SUBDIR + ".partial"):
            path = self.output_dir / name
            if path.is_dir():
                shutil.rmtree(path)
                removed.append(name)
            elif path.exists():
                path.unlink()
                removed.append(name)
        if removed:
            log.warning("--overwrite: removed %s of %s from %s", ", ".join(removed), found or "an earlier run",
                        self.output_dir)

    def _log_dropped_rows(self) -> None:
        from forgepipe.data import DROP_REPORTS

        sources = list(self.cfg.data.sources) + list(self.cfg.data.unsupervised_sources)
        reports = [DROP_REPORTS[s].to_dict() for s in sources if s in DROP_REPORTS]
        if not reports:
            return
        dropped = sum(r["dropped"] for r in reports)
        total = sum(r["rows"] for r in reports)
        self.tracker.log_params({"data.dropped_rows": dropped, "data.dropped_fraction": round(dropped / max(total, 1), 6)})
        if dropped:
            self.tracker.log_dict({"sources": reports}, "data/dropped_rows.json")

    def data_fingerprint(self, model_path: str) -> dict[str, Any]:
        """What a supervised stage's resume must match (StageRun.begin adds stage and world size)."""
        d = self.cfg.data
        return {"model": model_path, "data": list(d.sources), "split": d.split, "seed": self.cfg.train.seed,
                "max_seq_len": d.max_seq_len}

    def build_engine(self, ds_json: dict, build_model, *, total_steps: int | None = None):
        """A DeepSpeed engine around `build_model()`, loaded straight into ZeRO-3 partitions at
        stage 3; trained with the config's schedule when the JSON has an optimizer, frozen otherwise."""
        if "optimizer" in ds_json and total_steps == 0:
            raise ForgeError(
                "--per-device-batch-size: the training data is shorter than one optimizer step "
                f"({self.world.world_size} ranks x {self.cfg.train.per_device_batch_size} x {self.cfg.train.grad_accum}); "
                "use a smaller batch or more data"
            )
        if self._universal() and "optimizer" in ds_json:
            # Resuming at another world size: DeepSpeed loads the universal form of the checkpoint.
            ds_json = {**ds_json, "checkpoint": {**ds_json.get("checkpoint", {}), "load_universal": True}}
        with zero3_loading(ds_json):
            model = build_model()
        t = self.cfg.train
        engine = initialize(model, ds_json, weight_decay=t.weight_decay, total_steps=total_steps or 0,
                            warmup_ratio=t.warmup_ratio, min_lr_ratio=t.min_lr_ratio)
        engine.forgepipe_lr = ds_json.get("optimizer", {}).get("params", {}).get("lr")  # for recompute_schedule
        return engine

    def resume(self, engines: dict[str, Any]) -> None:
        """Restore engines, RNG and loop state from the checkpoint found at start, if any."""
        self._training = True
        self.stop.install()  # from here on a signal stops at the next step boundary, with a checkpoint
        if self.resume_from is None:
            return
        engine_dir = None
        if self._universal():
            engine_dir = universal_checkpoint(self.resume_from, sorted(engines), self._old_world)
        loaded = LoopState.from_dict(load_checkpoint(engines, self.resume_from, engine_dir=engine_dir))
        if self._universal():
            for engine in engines.values():
                unshare_optimizer_steps(engine)
        loaded.fingerprint = self.state.fingerprint
        loaded.run_id = self.state.run_id
        if self._universal():
            # The data position in micro-batches of this run's shape: the same samples consumed.
            before = read_loop_state(self.resume_from)["fingerprint"]["config"]
            field_name = "position" if hasattr(loaded, "position") else "micro_in_epoch"  # micro-batches
            consumed = getattr(loaded, field_name) * self._old_world * before["train.per_device_batch_size"]
            per_micro = self.world.world_size * self.cfg.train.per_device_batch_size
            setattr(loaded, field_name, consumed // per_micro)
            log.warning("resume: %d ranks -> %d through DeepSpeed's universal checkpoint; %d samples of epoch %d "
                        "consumed", self._old_world, self.world.world_size, consumed, loaded.epoch)
            self.tracker.set_tags({"resumed.world_size": f"{self._old_world}->{self.world.world_size}"})
        self.state = loaded
        for engine in engines.values():
            recompute_schedule(engine)
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


def recompute_schedule(engine) -> None:
    """After a checkpoint is loaded: the LR of this run's config at the restored step.

    DeepSpeed restores the scheduler's base LRs (and the optimizer's group LRs) from the
    checkpoint, i.e. the old --lr; the schedule's shape (warm-up, total steps) is the new run's
    already, its lambda being rebuilt from the config. A changed --lr or --max-steps is thus
    honoured from the resumed step on."""
    scheduler = getattr(engine, "lr_scheduler", None)
    optimizer = getattr(engine, "optimizer", None)
    lambdas = getattr(scheduler, "lr_lambdas", None)
    if scheduler is None or optimizer is None or not lambdas:
        return
    new_lr = getattr(engine, "forgepipe_lr", None)
    if new_lr is None:
        return
    scheduler.base_lrs = [new_lr for _ in scheduler.base_lrs]
    for group, fn in zip(optimizer.param_groups, lambdas, strict=False):
        group["initial_lr"] = new_lr
        group["lr"] = new_lr * fn(scheduler.last_epoch)
    scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]


def universal_checkpoint(checkpoint: Path, engines: list[str], old_world: int) -> Path:
    """`<checkpoint>/universal/<engine>`: each engine's ZeRO state in DeepSpeed's universal format,
    converted on first use (ds_to_universal, on rank 0; written aside and renamed). Collective."""
    root = checkpoint / "universal"
    if dist.is_main_process():
        for name in engines:
            target = root / name
            if (target / "zero").is_dir():
                continue
            import argparse

            from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

            partial = root / f".partial-{name}"
            shutil.rmtree(partial, ignore_errors=True)
            log.warning("converting %s (written by %d ranks) to DeepSpeed's universal checkpoint in %s",
                        checkpoint / name, old_world, target)
            with contextlib.redirect_stdout(io.StringIO()) as printed:  # it prints its progress
                ds_to_universal(argparse.Namespace(
                    input_folder=str(checkpoint / name), output_folder=str(partial), num_extract_workers=1,
                    num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True))
            log.debug("ds_to_universal: %s", printed.getvalue())
            shutil.rmtree(target, ignore_errors=True)
            partial.rename(target)
    dist.barrier()
    return root


def unshare_optimizer_steps(engine) -> None:
    """DeepSpeed 0.19.8's ZeRO-3 universal load gives every parameter group's Adam state the same
    `step` tensor object; torch's Adam increments it in place once per group, so the step count
    (and the bias correction) would run ahead. Each group gets its own copy."""
    inner = getattr(getattr(engine, "optimizer", None), "optimizer", None)
    for state in getattr(inner, "state", {}).values():
        if isinstance(state, dict) and torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()

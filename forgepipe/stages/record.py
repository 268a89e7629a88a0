"""A stage's run record: its MLflow run, what a resume must match, the loop state, the engines
restored from a checkpoint, and the result the stage hands on.

`StageContext.begin()` opens it once the data is known; the recipe then builds its engines
through it (`build_engine`), restores them (`resume`), trains, and closes it with `finish()`,
which returns the StageResult.

A resume of this directory's own checkpoint reopens its MLflow run, but writes nothing to it or to
config.yaml until training continues (`resume()` succeeded): an extension that fails before that
(a model that does not load, an engine that does not fit) leaves the finished run's config.yaml,
params and tags as they were. A checkpoint of another directory (`--resume OTHER/checkpoints/step-N`)
starts a new MLflow run, tagged with where it came from: the other directory's run is not its own.
"""

from __future__ import annotations

import contextlib
import io
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from forgepipe import distributed as dist
from forgepipe.checkpoint import load_checkpoint, read_loop_state
from forgepipe.config import Config
from forgepipe.digests import changed_inputs, changed_line, input_digests
from forgepipe.engine import initialize, zero3_loading
from forgepipe.errors import ForgeError
from forgepipe.layout import CONFIG_FILE, PROFILE_FILE, RUN_FILE, StageResult
from forgepipe.loop import LoopState
from forgepipe.options import label
from forgepipe.preflight import resume_changes
from forgepipe.signals import STOP, StopRequest
from forgepipe.tracking import Tracker, resolve_tracking_uri, share_tree, write_json_atomic

log = logging.getLogger(__name__)


def identity(cfg: Config, world: dist.World, models: dict[str, str]) -> dict[str, Any]:
    """What a checkpoint must have been written with to be resumed at all: the stage, the resolved
    model paths and the data sources. Every other config key is compared by `resume_changes`
    (preflight.py), which honours the keys it declares and refuses the rest."""
    return {"stage": cfg.stage, "world_size": world.world_size, **models, "data": list(cfg.data.sources)}


@dataclass(frozen=True)
class Resumed:
    """A checkpoint found fit to resume: its MLflow run, its step, and the changes honoured."""

    checkpoint: Path
    run_id: str | None
    step: int
    honoured: dict[str, tuple]
    old_config: dict[str, Any]  # the checkpoint's flattened config
    own: bool = True  # a checkpoint of this output directory: its MLflow run continues
    old_inputs: dict[str, Any] | None = None  # the checkpoint's input digests (digests.py)
    changed_inputs: tuple[str, ...] = ()  # inputs changed in place, resumed on with --allow-changed-inputs

    @property
    def continued_run_id(self) -> str | None:
        """The MLflow run this run continues: the checkpoint's, when it is this directory's own."""
        return self.run_id if self.own else None

    @property
    def old_world(self) -> int | None:
        """The checkpoint's world size when it differs from this run's (a universal-checkpoint load)."""
        return self.honoured.get("world_size", (None, None))[0]


def check_resume(cfg: Config, world: dist.World, models: dict[str, str], checkpoint: Path | None) -> Resumed | None:
    """Refuse a checkpoint of another run, or one whose config changed in a way that cannot be
    honoured (preflight.resume_changes); before anything is written."""
    if checkpoint is None:
        return None
    previous = read_loop_state(checkpoint)
    before, now = previous.get("fingerprint", {}), identity(cfg, world, models)
    for key, value in now.items():
        if before.get(key) != value and not (key == "world_size" and before.get("config")):
            raise ForgeError(f"{checkpoint} was written with {key}={before.get(key)!r}, this run has {value!r}; "
                             f"use a new {label('output_dir')} or {label('overwrite')}", key="train.resume")
    honoured = resume_changes(before, cfg.flat(), world.world_size, str(checkpoint)) if before.get("config") else {}
    changes = changed_inputs(before.get("inputs"), cfg.flat())
    if changes and not cfg.train.allow_changed_inputs:
        raise ForgeError(changed_line(changes, str(checkpoint)))
    for path, key, old, new in changes:
        log.warning("resume: %s %s changed since %s was written (sha256 %s then, %s now): resuming on its new "
                    "contents (%s)", label(key), path, checkpoint, old[:12], new[:12], label("train.allow_changed_inputs"))
    own = Path(checkpoint).resolve().parent.parent == Path(cfg.output_dir).resolve()
    return Resumed(checkpoint, previous.get("run_id"), previous.get("step", 0), honoured, before.get("config") or {},
                   own=own, old_inputs=before.get("inputs"), changed_inputs=tuple(c[0] for c in changes))


class RunRecord:
    """One stage's MLflow run, loop state and resume; see the module docstring for the order."""

    def __init__(self, cfg: Config, world: dist.World, tracker: Tracker, state: LoopState,
                 resumed: Resumed | None, stop: StopRequest = STOP):
        self.cfg, self.world, self.tracker, self.state = cfg, world, tracker, state
        self.resumed = resumed
        self.stop = stop
        self.training = False  # set by resume(): from then on a failure is a failed run, not bad input
        self._pending: dict[str, dict] | None = None  # a reopened run's record, written once training continues

    @property
    def resume_from(self) -> Path | None:
        return self.resumed.checkpoint if self.resumed else None

    @classmethod
    def open(cls, cfg: Config, world: dist.World, models: dict[str, str], resumed: Resumed | None,
             parent_run_id: str | None, ds_configs: dict[str, dict]) -> RunRecord:
        """Start the MLflow run (or reopen the resumed one) and log what the run is; a reopened run's
        record is written once training continues (resume())."""
        flat = cfg.flat()
        continued = resumed.continued_run_id if resumed else None
        tags = {} if resumed is None or resumed.own else {
            "resumed_from": str(Path(resumed.checkpoint).resolve()), "resumed_from_run": str(resumed.run_id)}
        tracker = Tracker.for_stage(cfg, world, run_id=continued, parent_run_id=parent_run_id, tags=tags)
        inputs = dist.broadcast_object(input_digests(flat, resumed.old_inputs if resumed else None)
                                       if world.is_main else None)
        state = LoopState(fingerprint={**identity(cfg, world, models), "config": flat, "inputs": inputs},
                          run_id=dist.broadcast_object(tracker.run_id))
        if resumed and resumed.honoured:
            for key, (old, new) in resumed.honoured.items():
                log.warning("resume: %s changed from %r to %r: honoured (LR schedule recomputed from step %d)",
                            label(key), old, new, resumed.step)
        record = cls(cfg, world, tracker, state, resumed)
        if continued is None:
            record._write_record(ds_configs)  # a new run: recorded now (discarded if it fails on bad input)
        else:
            record._pending = ds_configs
            tracker.hold()  # the stage's own params and tags too, until training continues
        return record

    def _write_record(self, ds_configs: dict[str, dict]) -> None:
        """The run's params (a resumed run's changed values as resumed.* tags), what a resume changed,
        its config.yaml (in MLflow for a new run, in the output directory), its DeepSpeed JSON."""
        cfg, tracker, resumed = self.cfg, self.tracker, self.resumed
        tracker.log_params(cfg.flat())
        if resumed is not None:
            changed = {"resumed.changed": ", ".join(sorted(resumed.honoured)),
                       "resumed.changed_inputs": ", ".join(resumed.changed_inputs)}
            tracker.set_tags({k: v for k, v in changed.items() if v})
            tracker.delete_tags([k for k, v in changed.items() if not v])  # a later resume changed nothing
        log_dropped_rows(cfg, tracker)
        if self.resumed is None or self.resumed.continued_run_id is None:
            for name, ds_json in ds_configs.items():
                tracker.log_dict(ds_json, f"deepspeed/{name}.json")
            tracker.log_text(cfg.to_yaml(), "config.yaml")
            tracker.log_environment()
        if self.world.is_main:
            Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
            (Path(cfg.output_dir) / CONFIG_FILE).write_text(cfg.to_yaml())

    def build_engine(self, ds_json: dict, build_model, *, total_steps: int | None = None):
        """A DeepSpeed engine around `build_model()`, loaded straight into ZeRO-3 partitions at
        stage 3; trained with the config's schedule when the JSON has an optimizer, frozen otherwise."""
        t = self.cfg.train
        if "optimizer" in ds_json and total_steps == 0:
            raise ForgeError(
                "the training data is shorter than one optimizer step "
                f"({self.world.world_size} ranks x {t.per_device_batch_size} x {t.grad_accum}); "
                "use a smaller batch or more data", key="train.per_device_batch_size")
        if self.resumed and self.resumed.old_world is not None and "optimizer" in ds_json:
            # Resuming at another world size: DeepSpeed loads the universal form of the checkpoint.
            ds_json = {**ds_json, "checkpoint": {**ds_json.get("checkpoint", {}), "load_universal": True}}
        with zero3_loading(ds_json):
            model = build_model()
        self._tag_attention(model)
        engine = initialize(model, ds_json, weight_decay=t.weight_decay, total_steps=total_steps or 0,
                            warmup_ratio=t.warmup_ratio, min_lr_ratio=t.min_lr_ratio)
        engine.forgepipe_lr = ds_json.get("optimizer", {}).get("params", {}).get("lr")  # for recompute_schedule
        if t.compile and "optimizer" in ds_json:
            # In place (nn.Module.compile): parameter names, checkpoints and exports are unchanged.
            # Dynamic shapes: every batch has its own length (dynamic padding, grouping).
            engine.compile(compile_kwargs={"dynamic": True})
            log.info("torch.compile (dynamic shapes): the first steps include the compilation")
        return engine

    def _tag_attention(self, model) -> None:
        """MLflow tag `attention`: the attention implementation(s) the run's models use (models/attention.py),
        so that a Frontier run reads against a GPU workstation's."""
        name = getattr(getattr(model, "config", None), "_attn_implementation", None)
        if name is None:
            return
        self._attention = sorted({*getattr(self, "_attention", []), name})
        self.tracker.set_tags({"attention": ",".join(self._attention)})

    def resume(self, engines: dict[str, Any]) -> None:
        """Training starts: restore engines, RNG and loop state from the checkpoint, if any."""
        self.training = True
        self.stop.remember()  # from here on a signal stops at the next step boundary, with a checkpoint
        if self.resume_from is None:
            return
        old_world = self.resumed.old_world
        engine_dir = universal_checkpoint(self.resume_from, sorted(engines), old_world) if old_world else None
        loaded = LoopState.from_dict(load_checkpoint(engines, self.resume_from, engine_dir=engine_dir))
        loaded.fingerprint, loaded.run_id = self.state.fingerprint, self.state.run_id
        if self._pending is not None:  # training continues: now the reopened run's record is written
            held = self.tracker.unhold()
            self._write_record(self._pending)
            self.tracker.replay(held)
            self._pending = None
        if old_world:
            for engine in engines.values():
                unshare_optimizer_steps(engine)
            self._rescale_position(loaded, old_world)
        self.state = loaded
        for engine in engines.values():
            recompute_schedule(engine)
        log.info("resumed from %s at step %d", self.resume_from, self.state.step)

    def _rescale_position(self, loaded: LoopState, old_world: int) -> None:
        """The data position in micro-batches of this run's shape: the same samples consumed."""
        consumed = loaded.position * old_world * self.resumed.old_config["train.per_device_batch_size"]
        loaded.position = consumed // (self.world.world_size * self.cfg.train.per_device_batch_size)
        log.warning("resume: %d ranks -> %d through DeepSpeed's universal checkpoint; %d samples of epoch %d "
                    "consumed", old_world, self.world.world_size, consumed, loaded.epoch)
        self.tracker.set_tags({"resumed.world_size": f"{old_world}->{self.world.world_size}"})

    def finish(self, model_dir: Path) -> StageResult:
        """Record where the model is, for the user, MLflow and the next stage; the stage's result."""
        result = StageResult(stage=self.cfg.stage, model_dir=str(Path(model_dir).resolve()),
                             run_id=self.state.run_id, steps=self.state.step,
                             tracking_uri=resolve_tracking_uri(self.cfg.tracking.uri))
        output_dir = Path(self.cfg.output_dir)
        if self.world.is_main:
            share_tree(model_dir)  # safetensors writes model.safetensors 0600 whatever the umask
            write_json_atomic(output_dir / RUN_FILE, result.to_dict())  # written last: the stage finished
        self.tracker.set_tags({"model_dir": result.model_dir})
        if (output_dir / PROFILE_FILE).is_file():
            self.tracker.log_artifacts_file(output_dir / PROFILE_FILE)
        if self.cfg.tracking.log_checkpoints:
            self.tracker.log_artifacts(model_dir, "model")
        return result


def log_dropped_rows(cfg: Config, tracker: Tracker) -> None:
    """How many rows of the run's sources no format fitted (data.DROP_REPORTS), as params and a file."""
    from forgepipe.data import DROP_REPORTS

    sources = list(cfg.data.sources) + list(cfg.data.unsupervised_sources)
    reports = [DROP_REPORTS[s].to_dict() for s in sources if s in DROP_REPORTS]
    if not reports:
        return
    dropped = sum(r["dropped"] for r in reports)
    total = sum(r["rows"] for r in reports)
    tracker.log_params({"data.dropped_rows": dropped, "data.dropped_fraction": round(dropped / max(total, 1), 6)})
    if dropped:
        tracker.log_dict({"sources": reports}, "data/dropped_rows.json")


def recompute_schedule(engine) -> None:
    """After a checkpoint is loaded: the LR of this run's config at the restored step.

    DeepSpeed restores the scheduler's base LRs (and the optimizer's group LRs) from the
    checkpoint, i.e. the old --lr; the schedule's shape (warm-up, total steps) is the new run's
    already, its lambda being rebuilt from the config. A changed --lr or --max-steps is thus
    honoured from the resumed step on."""
    scheduler = getattr(engine, "lr_scheduler", None)
    optimizer = getattr(engine, "optimizer", None)
    lambdas = getattr(scheduler, "lr_lambdas", None)
    new_lr = getattr(engine, "forgepipe_lr", None)
    if scheduler is None or optimizer is None or not lambdas or new_lr is None:
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

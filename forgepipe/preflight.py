"""Checks of everything a run names (output directory, tracking store, models, data files), done
before DeepSpeed is imported, any rank is started or anything is written.

Each failure is one ForgeError line naming the option, file or line. The checks read files with
plain Python (json, yaml): no `datasets`, `transformers` or DeepSpeed import, so bad input is
answered in seconds. The stages repeat the checks that need the real loaders (tokenization,
model loading), so nothing here is the only guard.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import logging
import math
import os
import socket
import stat
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import click
import yaml

from forgepipe.config import STAGES, Config, data_share, flatten, parse_split, whole_split
from forgepipe.data.paths import JSON_SUFFIXES, PARQUET_SUFFIXES, file_suffix, looks_like_path
from forgepipe.errors import ForgeError
from forgepipe.layout import (
    CHECKPOINT_DIR,
    CONFIG_FILE,
    LOOP_STATE,
    MODEL_SUBDIR,
    RUN_FILE,
    StageResult,
    checkpoint_step,
    resolve_stage_output,
)
from forgepipe.options import label

log = logging.getLogger(__name__)

FULL_SCAN_BYTES = 256 << 20  # larger JSON files: only their first SCAN_LINES lines are read here
SCAN_LINES = 1000
TRACKING_TIMEOUT_S = 3.0


# ---------------------------------------------------------------------------
# Output directory and earlier runs


def _first_existing(path: Path) -> Path:
    for p in [path, *path.parents]:
        if p.exists():
            return p
    return Path("/")


def check_writable_dir(path: Path, option: str) -> None:
    """`path` is, or can be made, a writable directory (no parent is a file)."""
    existing = _first_existing(path)
    if existing.is_file() or (existing.exists() and not existing.is_dir()):
        what = "is a file" if existing == path else f"has a parent that is a file ({existing})"
        raise ForgeError(f"{option}: {path} {what}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ForgeError(f"{option}: {existing} is not writable")
    probe_creatable(path, existing, option)


def probe_creatable(path: Path, existing: Path, option: str) -> None:
    """`path` (not there yet) can be created under `existing`, its first existing parent: tried with
    an empty directory made there and removed at once. os.access says yes to root everywhere, and to
    anyone on /proc, /sys or a read-only mount point's parent, where the mkdir fails."""
    if existing == path:
        return
    import tempfile

    try:
        os.rmdir(tempfile.mkdtemp(prefix=".forgepipe-probe-", dir=existing))
    except OSError as exc:
        raise ForgeError(f"{option}: {path} cannot be created: {existing} takes no new directory "
                         f"({exc.strerror or type(exc).__name__})") from None


def earlier_run(output_dir: Path) -> str | None:
    """What an earlier run left in `output_dir`: a finished run (its run file), checkpoints, or None."""
    run_file = output_dir / RUN_FILE
    if run_file.is_file():
        try:
            run_id = json.loads(run_file.read_text()).get("mlflow_run_id")
        except (OSError, ValueError):
            run_id = None
        return f"a finished run (MLflow run {run_id})" if run_id else "a finished run"
    root = output_dir / CHECKPOINT_DIR
    if root.is_dir() and any(p.is_dir() and (p / LOOP_STATE).is_file() for p in root.iterdir()):
        return "checkpoints of an earlier run"
    return None


def last_checkpoint_step(output_dir: Path) -> int:
    """The step of the newest complete checkpoint in `output_dir` (-1: none); reads no tensors."""
    root = output_dir / CHECKPOINT_DIR
    return max([checkpoint_step(p) for p in root.iterdir()] if root.is_dir() else [], default=-1)


def check_output_dir(cfg: Config) -> None:
    """--output-dir is usable, and an earlier run in it is only replaced when the user says so."""
    if not cfg.output_dir:
        raise ForgeError("required", key="output_dir")
    out = Path(cfg.output_dir)
    check_writable_dir(out, "--output-dir")
    resume = cfg.train.resume
    if resume not in ("auto", "never"):
        state = Path(resume) / LOOP_STATE
        if not state.is_file():
            raise ForgeError(f"{resume} is not a complete forgepipe checkpoint (no {LOOP_STATE})", key="train.resume")
        try:
            json.loads(state.read_text())
        except (OSError, ValueError) as exc:
            raise ForgeError(f"{state} is unreadable ({type(exc).__name__})", key="train.resume") from None
        check_resume_checkpoint(Path(resume))
    if resume == "auto" and not cfg.overwrite and (out / RUN_FILE).is_file():
        steps = StageResult.read(out).steps
        if last_checkpoint_step(out) < steps and finished_line(cfg) is None:  # else: nothing to do (check_run)
            check_damaged_final(out, steps)
            raise ForgeError(
                f"{out} holds a run that finished at step {steps} without its final checkpoint "
                f"({label('train.final_checkpoint')} was off): nothing to continue it from. Its export is in "
                f"{out / MODEL_SUBDIR}; pass --overwrite to train it again, or choose another --output-dir",
                key="output_dir")
    if resume == "never" and not cfg.overwrite:
        found = earlier_run(out)
        if found:
            raise ForgeError(
                f"{out} holds {found}; --resume never would mix or replace it. Pass --overwrite "
                "to remove it first, --resume auto to continue it, or choose another --output-dir",
                key="output_dir",
            )


def newest_intact_checkpoint(root: Path, below: int | None = None) -> tuple[int, Path] | None:
    """(step, directory) of the newest checkpoint under `root` that verifies (checkpoint_verify), of
    a step below `below` when given; None when there is none."""
    from forgepipe.checkpoint_verify import verify_checkpoint

    found = sorted(((checkpoint_step(p), p) for p in root.iterdir() if p.is_dir()) if root.is_dir() else [],
                   key=lambda sp: (sp[0], sp[1].name), reverse=True)
    return next(((step, p) for step, p in found if step >= 0 and (below is None or step < below)
                 and verify_checkpoint(p) is None), None)


def check_resume_checkpoint(checkpoint: Path) -> None:
    """--resume DIR names a checkpoint whose files are all there, whole and sound (sizes and contents:
    checkpoint_verify), refused before launch otherwise, naming the file and the newest intact
    checkpoint beside it (DeepSpeed would fail on it after every rank started)."""
    from forgepipe.checkpoint_verify import verify_checkpoint

    problem = verify_checkpoint(checkpoint)
    if problem is None:
        return
    intact = newest_intact_checkpoint(checkpoint.parent, below=checkpoint_step(checkpoint))
    hint = f"; the newest intact checkpoint before it is {intact[1]} (step {intact[0]})" if intact else ""
    raise ForgeError(f"{checkpoint} cannot be resumed from: {problem}{hint}", key="train.resume")


def damaged_final_line(out: Path, steps: int) -> str | None:
    """When the final checkpoint (step-<steps>) of the run finished in `out` is there but damaged (its
    loop state unreadable, a file truncated or corrupt): what is wrong, and how to continue from the
    newest intact checkpoint. Never advice to --overwrite: that would delete the run's export and
    its intact checkpoints."""
    from forgepipe.checkpoint_verify import verify_checkpoint

    final = out / CHECKPOINT_DIR / f"step-{steps:08d}"
    problem = verify_checkpoint(final) if final.is_dir() else None
    if problem is None:
        return None
    intact = newest_intact_checkpoint(out / CHECKPOINT_DIR, below=steps)
    where = (f"--resume {intact[1]} continues from its newest intact checkpoint (step {intact[0]})" if intact
             else "it has no intact checkpoint to continue from; train again into another --output-dir")
    return f"its final checkpoint is damaged ({problem}); {where}. Its export is in {out / MODEL_SUBDIR}"


def check_damaged_final(out: Path, steps: int) -> None:
    """A damaged final checkpoint is said as such, not as a run without one (damaged_final_line)."""
    line = damaged_final_line(out, steps)
    if line:
        raise ForgeError(f"{out} holds a run that finished at step {steps}, but {line}", key="output_dir")


# On resume, a changed option is either honoured or refused. Honoured: the LR schedule's inputs
# (recomputed from the checkpoint's step), when to log/evaluate/save, and settings that change
# speed or memory but not the numbers. Everything else, compared on the flattened config, is
# refused (fingerprints add the resolved model paths and the world size).
HONOURED_ON_RESUME = {
    "train.lr", "train.max_steps", "train.epochs", "train.warmup_ratio", "train.min_lr_ratio", "ppo.critic_lr",
    "train.log_every", "train.eval_every", "train.save_every", "train.save_every_minutes", "train.keep_last",
    "train.peak_tflops", "train.eval_generations", "train.eval_max_new_tokens", "ppo.eval_prompts",
    "data.eval_max_samples", "data.max_dropped_fraction", "model.gradient_checkpointing",
    "ppo.critic_gradient_checkpointing", "tracking.log_checkpoints", "deepspeed.flops_profiler",
    "deepspeed.profile_step", "deepspeed.param_persistence_threshold", "deepspeed.max_live_parameters",
    "deepspeed.prefetch_bucket_size", "deepspeed.allgather_bucket_size", "deepspeed.reduce_bucket_size",
    "deepspeed.overlap_comm", "deepspeed.contiguous_gradients", "dpo.precompute_ref", "train.final_checkpoint",
    "train.compile", "deepspeed.check_grad_overflow",
}
# Not part of what was trained: never compared.
NOT_COMPARED = {"train.resume", "overwrite", "output_dir", "data.cache_dir", "tracking.run_name", "model.catalog",
                "train.allow_changed_inputs",  # the inputs' contents are compared by digest (digests.py)
                "tracking.uri", "tracking.experiment",  # a moved store is fine; the run must be in it (tracking.py)
                "model.name_or_path", "ppo.reward_model", "ppo.critic_model", "data.sources", "dpo.ref_model"}


# ZeRO stage settings and where launch records what they resolved to (--zero-stage auto).
RESOLVED_STAGE = {"deepspeed.zero_stage": "deepspeed.zero_stage_resolved",
                  "ppo.critic_zero_stage": "ppo.critic_zero_stage_resolved",
                  "ppo.ref_zero_stage": "ppo.ref_zero_stage_resolved"}


def effective_stages(flat: dict[str, Any]) -> dict[str, Any]:
    """A flattened config with each ZeRO stage setting replaced by the stage it ran at (the resolved
    value where there is one; PPO's None follows the actor) and the resolved keys dropped: a run is
    compared by the stages its engines ran at, so `auto` resolving as before (or an explicit 3 where
    an older run had the default 3) is no change. "auto" not resolved yet (preflight, before launch)
    compares as equal to anything; StageContext.begin compares again once it is resolved."""
    out = {k: v for k, v in flat.items() if k not in RESOLVED_STAGE.values()}
    for key, resolved in RESOLVED_STAGE.items():
        if key in flat:
            value = flat.get(resolved) if flat.get(resolved) is not None else flat[key]
            if value is None and key != "deepspeed.zero_stage":
                value = out.get("deepspeed.zero_stage")
            out[key] = value
    return out


def config_changes(old: dict[str, Any], new: dict[str, Any]) -> tuple[dict[str, tuple], dict[str, tuple]]:
    """(honoured, refused) changes between two flattened configs: key -> (old, new). A key only one
    side has came or went with a forgepipe upgrade between the two runs: nothing the user changed.
    ZeRO stages compare as run (effective_stages)."""
    honoured, refused = {}, {}
    old, new = effective_stages(old), effective_stages(new)
    for key in sorted(set(old) & set(new)):
        if key in RESOLVED_STAGE and "auto" in (old[key], new[key]):
            continue
        if key in NOT_COMPARED or old[key] == new[key]:
            continue
        (honoured if key in HONOURED_ON_RESUME else refused)[key] = (old[key], new[key])
    return honoured, refused


WORLD_SIZE_STAGES = ("sft", "reward", "dpo")  # resumable at another world size (universal checkpoint)


def resume_changes(before: dict[str, Any], flat: dict[str, Any], world_size: int,
                   where: str) -> dict[str, tuple]:
    """The honoured changes between a checkpoint's fingerprint (`before`) and this run's flattened
    config at `world_size`; a change that cannot be honoured is a ForgeError naming the option.

    Another world size is honoured for the supervised stages at ZeRO 1-3 (the checkpoint goes
    through DeepSpeed's universal format) when the samples per optimizer step stay the same, so
    the data order, the schedule and the loss curve continue: the batch or gradient accumulation
    may change to keep it."""
    old_config = before.get("config") or {}
    honoured, refused = config_changes(old_config, flat)
    old_world = before.get("world_size")
    if old_world is not None and old_world != world_size:
        stage = flat.get("stage")
        zero = effective_stages(flat).get("deepspeed.zero_stage")  # "auto": checked again once resolved
        if stage not in WORLD_SIZE_STAGES or not old_config:
            raise ForgeError(f"{where} was written with world_size={old_world!r}, this run has "
                             f"{world_size!r}; stage {stage} resumes at the same number of ranks only", key="train.resume")
        if zero == 0:
            raise ForgeError(f"{where} was written by {old_world} ranks, this run has {world_size}; "
                             "another world size needs --zero-stage 1, 2 or 3 (DeepSpeed's universal checkpoint)", key="train.resume")
        old_step = old_world * old_config["train.per_device_batch_size"] * old_config["train.grad_accum"]
        new_step = world_size * flat["train.per_device_batch_size"] * flat["train.grad_accum"]
        if old_step != new_step:
            raise ForgeError(
                f"{where} was written by {old_world} ranks x batch "
                f"{old_config['train.per_device_batch_size']} x accumulation {old_config['train.grad_accum']} = "
                f"{old_step} samples a step; with {world_size} ranks set --per-device-batch-size and --grad-accum "
                f"so that ranks x batch x accumulation = {old_step}",
                key="train.grad_accum",
            )
        for key in ("train.per_device_batch_size", "train.grad_accum"):
            if key in refused:
                honoured[key] = refused.pop(key)
        honoured["world_size"] = (old_world, world_size)
    if refused:
        key, (old, new) = next(iter(refused.items()))
        if key in RESOLVED_STAGE:
            raise ForgeError(f"{where} was written at ZeRO stage {old!r}, this run has {new!r}; pass {label(key)} {old} "
                             "to resume it, or start afresh with --overwrite", key="train.resume")
        raise ForgeError(f"{label(key)} cannot change on resume ({where} was written with "
                         f"{old!r}, this run has {new!r}); keep it, or start afresh with --overwrite", key="train.resume")
    return honoured


def check_resume_config(cfg: Config) -> None:
    """A changed option that cannot be honoured on resume is refused here already (StageContext.begin
    checks again, with the resolved model paths and the world size)."""
    if cfg.overwrite or cfg.train.resume == "never":
        return
    if cfg.train.resume == "auto":
        root = Path(cfg.output_dir) / CHECKPOINT_DIR
        try:
            checkpoint = root / json.loads((root / "latest").read_text())["tag"]
        except (OSError, ValueError, KeyError, TypeError):
            return  # no marker, or an unreadable one: the stage finds what to resume from, and says so
    else:
        checkpoint = Path(cfg.train.resume)
    try:
        before = json.loads((checkpoint / LOOP_STATE).read_text()).get("fingerprint", {})
    except (OSError, ValueError, AttributeError):
        return
    if isinstance(before, dict) and before.get("config"):
        resume_changes(before, cfg.flat(), world_size_from_env(), str(checkpoint))
    if isinstance(before, dict) and before.get("inputs") and not cfg.train.allow_changed_inputs:
        from forgepipe.digests import changed_inputs, changed_line

        changes = changed_inputs(before["inputs"], cfg.flat())
        if changes:
            raise ForgeError(changed_line(changes, str(checkpoint)))


# A stage re-run into the output directory of a run that finished, with nothing to add to it (the
# same command, or `--resume` of its final checkpoint), is answered here in one line, exit 0:
# resuming would re-evaluate, rewrite the checkpoint and the export, and move the MLflow run's end
# time. Raising --max-steps or --epochs extends the run as before.
INPUT_KEYS = ("model.name_or_path", "ppo.reward_model", "ppo.critic_model", "dpo.ref_model", "data.sources")


class AlreadyFinished(click.exceptions.Exit):
    """check_run's answer to a launch with nothing to do: click ends the command with status 0."""

    def __init__(self, message: str):
        super().__init__(0)
        self.message = message


def finished_config(output_dir: Path, run_id: str | None, steps: int) -> dict[str, Any] | None:
    """The flattened config a finished run ended with: its final checkpoint's (the one at its last
    step), else its config.yaml (a run without a final checkpoint); None when unreadable."""
    root = output_dir / CHECKPOINT_DIR
    for path in sorted(root.iterdir()) if root.is_dir() else []:
        try:
            state = json.loads((path / LOOP_STATE).read_text())
        except (OSError, ValueError):
            continue
        if isinstance(state, dict) and state.get("step") == steps and state.get("run_id") == run_id:
            config = (state.get("fingerprint") or {}).get("config")
            if isinstance(config, dict) and config:
                return config
    try:
        config = yaml.safe_load((output_dir / CONFIG_FILE).read_text())
    except (OSError, yaml.YAMLError):
        return None
    return flatten(config) if isinstance(config, dict) else None


def _same_input(old: Any, new: Any) -> bool:
    """The same model or data source(s), spelled alike or naming the same file or directory."""
    if old == new:
        return True
    if isinstance(old, list) and isinstance(new, list):
        return len(old) == len(new) and all(_same_input(a, b) for a, b in zip(old, new, strict=True))
    if isinstance(old, str) and isinstance(new, str) and Path(old).exists() and Path(new).exists():
        return Path(resolve_stage_output(old)).resolve() == Path(resolve_stage_output(new)).resolve()
    return False


def finished_line(cfg: Config) -> str | None:
    """What to answer when --output-dir holds a run that finished and this launch would add no step
    to it: resuming it (auto, or its final checkpoint given), with the same stage, models, data and
    unchanged settings, and --max-steps/--epochs not raised past its end. None: start, resume or
    extend as usual (the stage's own checks refuse what cannot be resumed)."""
    out, resume = Path(cfg.output_dir), cfg.train.resume
    if cfg.overwrite or resume == "never" or not (out / RUN_FILE).is_file():
        return None
    try:
        result = StageResult.read(out)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    steps = result.steps
    final = last_checkpoint_step(out)
    if final > steps:
        return None  # an extension under way: resume it
    if resume != "auto" and (Path(resume).resolve().parent != (out / CHECKPOINT_DIR).resolve()
                             or checkpoint_step(Path(resume)) != steps):
        return None  # another checkpoint to resume from: the user's choice
    old, new = finished_config(out, result.run_id, steps), cfg.flat()
    if not old or config_changes(old, new)[1] or not all(_same_input(old.get(k), new.get(k)) for k in INPUT_KEYS):
        return None
    old_max, old_epochs = int(old.get("train.max_steps") or 0), int(old.get("train.epochs") or 1)
    by_epochs = old_max <= 0 or steps < old_max  # the run ended with its epochs: `steps` are all of them
    t = cfg.train
    if not (0 < t.max_steps <= steps or (by_epochs and t.epochs <= old_epochs)):
        return None
    damaged = damaged_final_line(out, steps) if final < steps else None
    if damaged:
        return f"{out} already finished at step {steps}: nothing to do; but {damaged}"
    if final < steps:
        more = f"it has no final checkpoint to extend ({label('train.final_checkpoint')} was off)"
    elif by_epochs:
        more = f"more {label('train.epochs')} (than {old_epochs}) extend it"
    else:
        more = f"{label('train.max_steps')} above {steps} extends it"
    return (f"{out} already finished at step {steps}: nothing to do; {more}, {label('overwrite')} starts afresh "
            f"(its model: {out / MODEL_SUBDIR})")


def rank_from_env() -> int:
    for key in ("RANK", "SLURM_PROCID"):
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    return 0


def check_finished(cfg: Config) -> None:
    """A launch that would add nothing to a finished run: one line (rank 0) and AlreadyFinished
    (exit 0) on every rank, before anything starts or is written; the run's files and MLflow record
    stay as they were. File-based, so every rank of a launch gives the same answer."""
    line = finished_line(cfg)
    if line is None:
        return
    if rank_from_env() == 0:
        click.echo(f"forgepipe: {line}")
    raise AlreadyFinished(line)



# ---------------------------------------------------------------------------
# --zero-stage auto: the inputs of deepspeed_config.plan_zero_stages, read before DeepSpeed starts

SAFETENSORS_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}


def safetensors_numel(path: Path) -> int:
    """The number of values in a .safetensors file, from its JSON header alone (no tensor is read)."""
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    return sum(math.prod(t["shape"]) for k, t in header.items() if k != "__metadata__")


def count_parameters(name: str, catalog: str | None, trust_remote_code: bool = False) -> int | None:
    """A model's parameter count before it is loaded: exactly from its safetensors headers; else from
    the size of its .bin weights over config.json's dtype; else (a Hub id, .bin-less directory) from
    its config built on the meta device (engine.parameter_count); None when none of these works."""
    try:
        path = _model_dir(name, catalog, "model")
    except ForgeError:
        return None
    try:
        if path is not None:
            files = sorted(path.glob("*.safetensors"))
            if files:
                return sum(safetensors_numel(f) for f in files)
            weights = sorted(path.glob("pytorch_model*.bin"))
            if weights:
                config = json.loads((path / "config.json").read_text())
                per_value = SAFETENSORS_DTYPE_BYTES.get(str(config.get("torch_dtype")), 4)
                return sum(w.stat().st_size for w in weights) // per_value
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        from forgepipe.engine import parameter_count

        config = AutoConfig.from_pretrained(str(path or name), trust_remote_code=trust_remote_code)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
        return parameter_count(model)
    except Exception as exc:  # noqa: BLE001 - any failure means "unknown": auto then takes stage 3
        log.debug("parameter count of %s unknown: %s", name, exc)
        return None


def model_counts(cfg: Config) -> dict[str, int | None]:
    """Parameter counts of the models a stage's engines hold (plan_zero_stages' keys)."""
    m, p = cfg.model, cfg.ppo
    names = {"model": m.name_or_path}
    if cfg.stage == "dpo" and cfg.dpo.ref_model:
        names["ref"] = cfg.dpo.ref_model
    if cfg.stage == "ppo":
        names |= {"critic": p.critic_model or p.reward_model, "reward": p.reward_model}
    by_name: dict[str, int | None] = {}
    for name in set(names.values()):
        by_name[name] = count_parameters(name, m.catalog, m.trust_remote_code) if name else None
    return {key: by_name[name] for key, name in names.items()}


def device_memory(world: Any) -> tuple[int, str]:
    """(bytes, what) of the memory one rank's models live in. On a GPU its total memory
    (torch.cuda.get_device_properties). Without one, the host's physical memory shared by the
    ranks on the node: the total rather than what is free now, so that every rank, and a resumed
    run, resolve to the same stage."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory, "device"
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return total // max(1, world.local_world_size), "rank of host memory"


def resolve_zero_stage(cfg: Config, world: Any) -> None:
    """Apply --zero-stage auto (deepspeed_config.plan_zero_stages) before DeepSpeed starts: the stages
    go into `deepspeed.zero_stage_resolved` and PPO's `ppo.*_zero_stage_resolved` (logged to MLflow
    with the config, and what build_ds_config reads), and one line says why. Rank 0's answer is every
    rank's. Explicit stages are recorded as given."""
    from forgepipe import distributed as dist
    from forgepipe.deepspeed_config import AUTO_MEMORY_FRACTION, plan_zero_stages

    ds, p = cfg.deepspeed, cfg.ppo
    uses_auto = "auto" in (ds.zero_stage, p.critic_zero_stage, p.ref_zero_stage) if cfg.stage == "ppo" \
        else ds.zero_stage == "auto"
    plan = None
    if uses_auto:
        device_bytes, device = device_memory(world)
        plan = dist.broadcast_object(plan_zero_stages(cfg, world, model_counts(cfg), device_bytes, device))
    if plan is None:
        ds.zero_stage_resolved = ds.zero_stage
        if cfg.stage == "ppo":
            p.critic_zero_stage_resolved = ds.zero_stage if p.critic_zero_stage is None else p.critic_zero_stage
            p.ref_zero_stage_resolved = ds.zero_stage if p.ref_zero_stage is None else p.ref_zero_stage
        return
    ds.zero_stage_resolved = plan.model
    if cfg.stage == "ppo":
        p.critic_zero_stage_resolved, p.ref_zero_stage_resolved = plan.critic, plan.ref
    log.info(plan.line)
    if not plan.fits and "unknown" not in plan.line:
        log.warning("the models' state per rank exceeds %d%% of the memory even at ZeRO stage %d; "
                    "--offload cpu or more ranks would make room", round(AUTO_MEMORY_FRACTION * 100), plan.model)


# ---------------------------------------------------------------------------
# Tracking store


def check_tracking(uri: str | None) -> None:
    """The MLflow store is creatable and writable (SQLite/file) or answers within seconds (HTTP)."""
    from forgepipe.tracking import resolve_tracking_uri

    uri = resolve_tracking_uri(uri)
    parsed = urlparse(uri)
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///"):])
        check_writable_dir(db.parent, "--tracking-uri")
        if db.exists():
            if not db.is_file():
                raise ForgeError(f"{db} is not a file", key="tracking.uri")
            if not os.access(db, os.R_OK | os.W_OK):
                raise ForgeError(f"{db} is not writable", key="tracking.uri")
            with open(db, "rb") as f:
                head = f.read(16)
            if head and head != b"SQLite format 3\x00":
                raise ForgeError(f"{db} is not an SQLite database", key="tracking.uri")
    elif parsed.scheme in ("http", "https"):
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
        try:
            socket.create_connection((parsed.hostname or "", port), timeout=TRACKING_TIMEOUT_S).close()
        except OSError as exc:
            raise ForgeError(f"{uri} is unreachable ({exc.strerror or type(exc).__name__}, "
                             f"waited {TRACKING_TIMEOUT_S:g} s)", key="tracking.uri") from None
        check_mlflow_server(uri)
    elif parsed.scheme in ("", "file"):
        check_writable_dir(Path(parsed.path or uri), "--tracking-uri")


def check_mlflow_server(uri: str) -> None:
    """An MLflow tracking server answers GET /health with 200 (MLflow's client would otherwise retry
    for minutes before failing). Servers behind authentication (credentials in the environment)
    are left to MLflow."""
    import urllib.error
    import urllib.request

    if any(os.environ.get(k) for k in ("MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_USERNAME", "DATABRICKS_TOKEN")):
        return
    url = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=TRACKING_TIMEOUT_S) as response:
            status = response.status
    except urllib.error.HTTPError as exc:
        status = exc.code
    except (OSError, ValueError) as exc:
        raise ForgeError(f"{uri} does not answer ({getattr(exc, 'reason', exc)}, "
                         f"waited {TRACKING_TIMEOUT_S:g} s)", key="tracking.uri") from None
    if status != 200:
        raise ForgeError(f"{uri} is not an MLflow tracking server (GET /health: HTTP {status})", key="tracking.uri")


# ---------------------------------------------------------------------------
# Models


def _model_dir(name: str, catalog: str | None, option: str) -> Path | None:
    """The local directory a model option names (a stage output stands for its export), or None
    for a Hub id."""
    from forgepipe.models.catalog import resolve_model

    try:
        resolved = resolve_model(name, catalog)
    except ForgeError as exc:
        raise ForgeError(f"{option}: {exc}") from None
    path = Path(resolved)
    if not path.is_dir():
        return None
    if (path / MODEL_SUBDIR / "config.json").is_file():
        path = path / MODEL_SUBDIR
    return path


def model_kind(path: Path, option: str) -> tuple[str, str]:
    """("causal_lm" | "scalar" | "classifier", what it is in words) from a model directory's files."""
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ForgeError(f"{option}: {path} has no config.json (not a model directory or stage output)")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ForgeError(f"{option}: {config_file} is unreadable ({type(exc).__name__})") from None
    check_weight_files(path, option)
    stage = None
    meta = path / "forgepipe.json"
    if meta.is_file():
        try:
            stage = json.loads(meta.read_text()).get("stage")
        except (OSError, ValueError):
            stage = None
    archs = config.get("architectures") or []
    if any(a.endswith("ForSequenceClassification") for a in archs):
        labels = config.get("num_labels") or len(config.get("id2label") or {}) or 2
        if labels == 1:
            return "scalar", "a reward model export (sequence classifier with a scalar head, no LM head)"
        return "classifier", f"a sequence classifier with {labels} labels"
    words = {"sft": "an SFT export", "ppo": "a PPO export", "dpo": "a DPO export"}.get(stage, "a base model")
    return "causal_lm", f"{words} (causal LM)"


SAFETENSORS_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8,
                     "U32": 4, "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
SAFETENSORS_MAX_HEADER = 100 << 20  # safetensors' own limit


def safetensors_problem(path: Path) -> str | None:
    """Why `path` is not a complete .safetensors file, from its header and size alone (no tensor is
    read), or None: the 8-byte header length fits the file, the header is a UTF-8 JSON object of
    {dtype, shape, data_offsets} entries, each tensor's bytes match its shape and dtype, and the
    tensors cover the data exactly (a truncated or padded file does not)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return f"{size} bytes, shorter than a header"
            (length,) = struct.unpack("<Q", head)
            if length > min(size - 8, SAFETENSORS_MAX_HEADER):
                return f"its header length {length} exceeds the file's {size} bytes"
            header = json.loads(f.read(length).decode("utf-8"))
    except OSError as exc:
        return f"unreadable ({exc.strerror or type(exc).__name__})"
    except (UnicodeDecodeError, ValueError):
        return "its header is not UTF-8 JSON"
    if not isinstance(header, dict):
        return "its header is not a JSON object"
    data, end = size - 8 - length, 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, stop = (int(v) for v in entry["data_offsets"])
            numel = math.prod(int(d) for d in entry["shape"])
            dtype = str(entry["dtype"])
        except (TypeError, KeyError, ValueError):
            return f"its header entry {name!r} is not {{dtype, shape, data_offsets}}"
        if not 0 <= begin <= stop or (dtype in SAFETENSORS_BYTES and stop - begin != numel * SAFETENSORS_BYTES[dtype]):
            return f"its header entry {name!r} does not fit its shape and dtype"
        end = max(end, stop)
    if end != data:
        return (f"truncated: its header describes {end} bytes of tensors, the file holds {data}" if end > data
                else f"{data - end} bytes past the tensors its header describes")
    return None


def check_weight_files(path: Path, option: str) -> None:
    """A local model directory's safetensors weights are whole, and a sharded model's index names
    shards that are there: checked from headers and sizes before any rank starts (a corrupt file
    otherwise fails in transformers' loader, after DeepSpeed started)."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ForgeError(f"{option}: {index} is unreadable ({type(exc).__name__})") from None
        missing = sorted(s for s in shards if not (path / s).is_file())
        if missing:
            raise ForgeError(f"{option}: {path / missing[0]} is missing (named in {index.name})")
    for file in sorted(path.glob("*.safetensors")):
        problem = safetensors_problem(file)
        if problem:
            raise ForgeError(f"{option}: {file} is not a complete safetensors file ({problem}); "
                             "copy or export the model again")


def check_causal_lm(name: str, catalog: str | None, option: str, stage: str) -> None:
    """A model that must be a causal LM (a reward export's LM head would start random)."""
    path = _model_dir(name, catalog, option)
    if path is not None:
        kind, what = model_kind(path, option)
        if kind != "causal_lm":
            need = "a base model or an SFT export" if stage == "sft" else "an SFT export or a base model"
            raise ForgeError(f"{option}: {path} is {what}; its language-model head would start random. "
                             f"Stage {stage} needs {need}")


def check_models(cfg: Config) -> None:
    """Every model option names a model of the kind its stage needs (before any is loaded)."""
    catalog = cfg.model.catalog
    if cfg.stage in ("sft", "ppo", "dpo"):
        option = "--actor" if cfg.stage == "ppo" else "--model"
        check_causal_lm(cfg.model.name_or_path, catalog, option, cfg.stage)
    if cfg.stage == "dpo" and cfg.dpo.ref_model:
        check_causal_lm(cfg.dpo.ref_model, catalog, "--ref", cfg.stage)
    if cfg.stage == "reward":
        path = _model_dir(cfg.model.name_or_path, catalog, "--model")
        if path is not None:
            kind, what = model_kind(path, "--model")
            if kind == "classifier":
                raise ForgeError(f"{path} is {what}, not a scalar reward model (num_labels 1)", key="model.name_or_path")
    check_tokenizer(cfg)
    if cfg.stage == "ppo":
        if not cfg.ppo.reward_model:
            raise ForgeError("required", key="ppo.reward_model")
        path = _model_dir(cfg.ppo.reward_model, catalog, "--reward")
        if path is not None:
            kind, what = model_kind(path, "--reward")
            if kind != "scalar":
                raise ForgeError(f"{path} is {what}, not a reward model export (no scalar head); "
                                 "give the output of `forgepipe reward`", key="ppo.reward_model")
        if cfg.ppo.critic_model:
            path = _model_dir(cfg.ppo.critic_model, catalog, "--critic")
            if path is not None and model_kind(path, "--critic")[0] == "classifier":
                raise ForgeError(f"{path} is {model_kind(path, '--critic')[1]}, not a scalar model", key="ppo.critic_model")


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "spiece.model", "tiktoken.model")


def check_tokenizer(cfg: Config) -> None:
    """A local --tokenizer directory (the model's own without one) must hold a tokenizer: transformers
    otherwise fails on every rank after DeepSpeed started, asking for sentencepiece."""
    if not cfg.model.tokenizer:
        return
    path = Path(cfg.model.tokenizer).expanduser()
    if path.is_dir() and not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise ForgeError(f"{path} holds no tokenizer (none of {', '.join(TOKENIZER_FILES[:3])}, ...)",
                         key="model.tokenizer")


# ---------------------------------------------------------------------------
# Data files


def _lines(path: Path, limit: int | None) -> Iterator[tuple[int, str]]:
    """(line number, text) of a UTF-8 text file (gzip too); a non-UTF-8 line is a ForgeError."""
    from forgepipe.data.formats import read_errors, read_failure

    opener = gzip.open if path.name.lower().endswith(".gz") else open
    number = 0
    try:
        with opener(path, "rb") as f:
            for number, raw in enumerate(f, start=1):
                if limit is not None and number > limit:
                    return
                try:
                    yield number, raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise ForgeError(f"{path}:{number}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at column "
                                     f"{exc.start + 1})") from None
    except read_errors() as exc:  # a gzip stream cut short (EOFError) or corrupt, an I/O error
        raise ForgeError(read_failure(path, exc, number)) from None


def read_records(path: Path, limit: int | None = None) -> list[dict[str, Any]]:
    """The records of a JSON-lines (or JSON array) file, each checked: one line per error."""
    name = path.name.lower()
    if name.endswith((".json", ".json.gz")):
        text = "".join(line for _, line in _lines(path, None))
        stripped = text.lstrip()
        if stripped.startswith("["):
            try:
                data = json.loads(text)
            except json.JSONDecodeError as exc:
                raise ForgeError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg} at column {exc.colno})") from None
            bad = next((i for i, r in enumerate(data) if not isinstance(r, dict)), None)
            if bad is not None:
                raise ForgeError(f"{path}: record {bad + 1} is not a JSON object")
            return data
    records = []
    for number, line in _lines(path, limit):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ForgeError(f"{path}:{number}: invalid JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(value, dict):
            raise ForgeError(f"{path}:{number}: invalid JSON (expected an object, got {type(value).__name__})")
        records.append(value)
    return records


def world_size_from_env() -> int:
    for key in ("WORLD_SIZE", "SLURM_NTASKS"):
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    return 1


SPECIAL_FILES = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
                 (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


def source_kind_problem(path: Path, source: str) -> str | None:
    """Why `path` cannot be a data source when it exists but is neither a regular file nor a directory
    (a FIFO, a socket, a device), else None. Said from stat() alone: opening a FIFO blocks until a
    writer comes, and the open() is retried through Slurm's stop signal."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return None  # not there (or unreadable): the checks that follow say so
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return None
    what = next((name for test, name in SPECIAL_FILES if test(mode)), "not a regular file")
    return f"data source '{source}': {what}, not a regular file or directory; write the data to a file first"


def check_source_kind(path: Path, source: str) -> None:
    problem = source_kind_problem(path, source)
    if problem:
        raise ForgeError(problem)


SAVED_DATASET_FILES = ("dataset_info.json", "state.json")  # Dataset.save_to_disk
SAVED_DICT_FILE = "dataset_dict.json"  # DatasetDict.save_to_disk: {"splits": [...]}, a saved Dataset per split


def _saved_dataset_problem(path: Path) -> str | None:
    """What is missing or unreadable in a directory written by Dataset.save_to_disk, else None."""
    missing = [name for name in SAVED_DATASET_FILES if not (path / name).is_file()]
    if missing:
        return f"{path} has no {' or '.join(missing)}"
    try:
        state = json.loads((path / "state.json").read_text(encoding="utf-8"))
        files = [f["filename"] for f in state.get("_data_files", [])]
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
        return f"{path / 'state.json'} is unreadable ({type(exc).__name__})"
    if not files:
        return f"{path / 'state.json'} names no data files"
    absent = [name for name in files if not (path / name).is_file()]
    if absent:
        return f"{path / absent[0]} is missing ({len(absent)} of {len(files)} data files are)"
    return None


def data_dir_problem(path: Path, source: str) -> str | None:
    """Why a directory given as a data source cannot be read, from its file names and small JSON
    files alone (reading it with datasets in the stage took 23-91 s to say so), else None.

    Read: a directory written by Dataset.save_to_disk (dataset_info.json, state.json, its .arrow
    files) or DatasetDict.save_to_disk (dataset_dict.json and one such directory per split)."""
    where = f"data source '{source}'"
    if (path / SAVED_DICT_FILE).is_file():
        try:
            splits = json.loads((path / SAVED_DICT_FILE).read_text(encoding="utf-8"))["splits"]
            assert isinstance(splits, list) and all(isinstance(s, str) for s in splits)
        except (OSError, ValueError, TypeError, KeyError, AssertionError):
            return f"{where}: {path / SAVED_DICT_FILE} is unreadable (not a DatasetDict's split list)"
        if not splits:
            return f"{where}: the saved DatasetDict has no splits"
        for split in splits:
            problem = _saved_dataset_problem(path / split)
            if problem:
                return f"{where}: a saved DatasetDict whose split '{split}' is incomplete: {problem}"
        return None
    if any((path / name).exists() for name in SAVED_DATASET_FILES):
        problem = _saved_dataset_problem(path)
        return f"{where}: a saved data set that is incomplete: {problem}" if problem else None
    try:
        names = sorted(p.name for p in path.iterdir())
    except OSError as exc:
        return f"{where}: the directory cannot be read ({exc.strerror or type(exc).__name__})"
    data_files = [n for n in names if file_suffix(Path(n)) in JSON_SUFFIXES + PARQUET_SUFFIXES]
    if data_files:
        shown = ", ".join(data_files[:3]) + (f" and {len(data_files) - 3} more" if len(data_files) > 3 else "")
        return (f"{where}: a directory of data files ({shown}), not a data set saved by datasets' save_to_disk; "
                f"give the files themselves: --data {path / data_files[0]}" + (" --data ..." if len(data_files) > 1
                                                                                else ""))
    if not names:
        return f"{where}: an empty directory, not a data set saved by datasets' save_to_disk"
    return (f"{where}: a directory, but not one written by datasets' save_to_disk (no "
            f"{SAVED_DICT_FILE}, nor {' and '.join(SAVED_DATASET_FILES)}) and no data files (.jsonl, .json, "
            ".parquet, .jsonl.gz, .json.gz)")


def check_data_dir(path: Path, source: str) -> None:
    problem = data_dir_problem(path, source)
    if problem:
        raise ForgeError(problem)


def check_source(source: str, stage: str, cfg: Config, keep: tuple[str, ...] = ()) -> int | None:
    """Check one data source; returns the stage's usable training rows when the whole file was read."""
    from forgepipe.data.formats import (
        DropReport,
        check_dropped,
        detect_format,
        normalise_row,
        require_pairs_columns,
    )
    from forgepipe.data.split import stage_share, train_eval

    path = Path(source).expanduser()
    check_source_kind(path, source)
    if path.is_dir():
        check_data_dir(path, source)
        return None  # a saved data set: datasets reads it (and says the rest) in the stage
    if not path.exists():
        if looks_like_path(source):
            raise ForgeError(f"data source '{source}': file not found")
        if os.environ.get("HF_DATASETS_OFFLINE") == "1" or os.environ.get("HF_HUB_OFFLINE") == "1":
            raise ForgeError(f"data source '{source}': not a local file or directory, and the Hub is off "
                             "(HF_DATASETS_OFFLINE/HF_HUB_OFFLINE)")
        return None
    suffix = file_suffix(path)
    if suffix in PARQUET_SUFFIXES:
        return None
    if suffix not in JSON_SUFFIXES:
        raise ForgeError(f"data source '{source}': unknown file type {suffix or '(none)'} "
                         "(expected .jsonl, .json, .parquet, .jsonl.gz, .json.gz)")
    whole = path.stat().st_size <= FULL_SCAN_BYTES
    records = read_records(path, None if whole else SCAN_LINES)
    columns = list(dict.fromkeys(k for r in records for k in r))
    if not records:
        raise ForgeError(f"{source}: no records")
    fmt = detect_format(columns, source)
    share = data_share(stage)  # dpo reads the reward share: preference pairs
    if share == "reward":
        require_pairs_columns(columns, source, stage)
    for k in keep:
        if k not in columns:
            raise ForgeError(f"{source}: no field {k!r} (fields: {', '.join(columns)})")
    report = DropReport(source, total=len(records))
    usable = []
    for index, record in enumerate(records):
        row, why = normalise_row(record, fmt)
        if why:
            report.add(why, index)
        else:
            usable.append(row)
    check_dropped(report, cfg.data.max_dropped_fraction)
    if share == "reward" and usable and all(row[1] == row[2] for row in usable):
        raise ForgeError(f"{source}: all {len(usable)} pairs have the same chosen and rejected text: nothing to "
                         "prefer")  # else the stage, having dropped them all, would blame the batch size
    if not whole:
        return None
    shares = parse_split(cfg.data.split)
    indices = stage_share(len(usable), shares, STAGES.index(share), cfg.train.seed)
    if not indices:
        raise ForgeError(f"{source}: --data-split {cfg.data.split} leaves stage {stage} no rows "
                         f"(the source has {len(usable)} usable rows)")
    if stage == "ppo":
        indices = [i for i in indices if usable[i][0]]
    train, _ = train_eval(indices, cfg.data.eval_fraction, cfg.train.seed)
    return len(train)


def check_data(cfg: Config, required: bool = True) -> None:
    """Every --data source exists, is UTF-8, parses, has a known format and enough usable rows."""
    if not cfg.data.sources:
        if required:
            raise ForgeError("at least one data source is required", key="data.sources")
        return
    keep = (cfg.reward.margin_field,) if cfg.stage == "reward" and cfg.reward.margin_field else ()
    counts = [check_source(s, cfg.stage, cfg, keep) for s in cfg.data.sources]
    documents = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, split=whole_split("sft")))
    for source in cfg.data.unsupervised_sources:  # PPO-ptx documents are read whole, never split
        check_source(source, "sft", documents)
    if any(c is None for c in counts):
        return
    total = sum(counts)
    if total == 0:
        raise ForgeError(f"{', '.join(cfg.data.sources)}: no rows with a prompt for stage {cfg.stage} "
                         "({text} sources have none)")
    world = world_size_from_env()
    t = cfg.train
    if cfg.stage == "ppo":
        per_step = world * (cfg.ppo.generation_batch_size or t.per_device_batch_size)
        option = "--generation-batch-size"
    else:
        per_step = world * t.per_device_batch_size * t.grad_accum
        option = "--per-device-batch-size"
    if cfg.data.packing and cfg.stage == "sft":
        return  # packing changes the count; the stage checks after tokenization
    if total < per_step:
        raise ForgeError(f"{option}: {total} training rows of stage {cfg.stage} are fewer than one step "
                         f"({per_step} = {world} ranks x batch); use a smaller batch or more data")


def check_run(cfg: Config) -> None:
    """Everything above, for a stage about to start."""
    check_output_dir(cfg)
    check_resume_config(cfg)
    check_finished(cfg)
    check_tracking(cfg.tracking.uri)
    check_models(cfg)
    check_data(cfg)


def check_shown(cfg: Config) -> None:
    """`forgepipe config show`: the same checks for whatever the command line names."""
    if cfg.output_dir:
        check_output_dir(cfg)
        check_resume_config(cfg)
    check_tracking(cfg.tracking.uri)
    if cfg.model.name_or_path and (cfg.stage != "ppo" or cfg.ppo.reward_model):
        check_models(cfg)
    check_data(cfg, required=False)


def finished_stage(cfg: Config) -> StageResult | None:
    """What a stage already finished (its run file), unless resuming is off: a pipeline skips
    that stage, whatever the world size or options of this launch."""
    if cfg.train.resume == "never" or cfg.overwrite or not (Path(cfg.output_dir) / RUN_FILE).is_file():
        return None
    return StageResult.read(cfg.output_dir)


def check_pipeline_finished(configs: dict[str, Config]) -> None:
    """A pipeline whose every stage finished is answered in one line, exit 0, before its parent MLflow
    run is reopened (which moved its end time): the stages skip finished work, so nothing would run."""
    results = [finished_stage(cfg) for cfg in configs.values()]
    if not all(results):
        return
    root = Path(next(iter(configs.values())).output_dir).parent
    line = (f"{root} already finished: {', '.join(configs)} have their exports (the last: {results[-1].model_dir}); "
            "nothing to do; --overwrite starts afresh")
    if rank_from_env() == 0:
        click.echo(f"forgepipe: {line}")
    raise AlreadyFinished(line)


def check_pipeline(configs: dict[str, Config]) -> None:
    """The pipeline (configs in stage order): the stages that start from given models in full
    (unless finished); the last stage (ppo, or dpo) starts from the exports of the ones before it,
    so its output directory and data (and a DPO --ref given) are what can be checked now."""
    *first, last = configs
    check_pipeline_finished(configs)
    for stage in first:
        if not finished_stage(configs[stage]):
            check_run(configs[stage])
    cfg = configs[last]
    check_output_dir(cfg)
    check_data(cfg)
    if cfg.stage == "dpo" and cfg.dpo.ref_model:
        check_causal_lm(cfg.dpo.ref_model, cfg.model.catalog, "--ref", "dpo")

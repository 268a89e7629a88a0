"""Checkpoints (DeepSpeed state + loop state) and Hugging Face exports.

Nothing half-written ever looks complete:
- a checkpoint is written to `checkpoints/.partial-<tag>/`, renamed to `checkpoints/<tag>/` once every
  rank has finished, and only then does the `checkpoints/latest` marker (replaced atomically) move to it;
- its `loop_state.json` lists every file of the checkpoint with its size, so a truncated or missing
  file is found before DeepSpeed reads it, and each file's contents are checked too (a torch archive's
  directory and CRCs of its pickle and small records: garbage of the right size is found);
  `verify_checkpoint`, in checkpoint_verify.py (no torch: the pre-launch checks use it); resuming
  falls back to the newest checkpoint that verifies when the marker or the newest checkpoint does
  not, and says so in one warning line;
- pruning (`--keep-last`) orders checkpoints by step and only ever removes ones written by the same
  run (MLflow run id), never the one just written;
- a full disk stops the run with "no space left on <path>", the partial files removed and the last
  complete checkpoint kept;
- an export is written to `<dir>.partial/` and renamed to `<dir>/` when complete;
- the checkpoint this process resumed from is never rewritten when no step was taken since (a rerun
  after the export failed, a full disk say, finds its final checkpoint intact and exports only:
  rewriting it first needed its size again in free space, and failed where the export would fit).

A checkpoint holds one DeepSpeed checkpoint per engine (PPO has two), the loop state (step,
epoch, position in the epoch, MLflow run id, ...) and each rank's RNG states.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from forgepipe.checkpoint_verify import read_state, verify_checkpoint
from forgepipe.distributed import all_reduce_sum, barrier, current_rank, is_main_process
from forgepipe.errors import ForgeError
from forgepipe.layout import CHECKPOINT_DIR, LOOP_STATE, RUN_FILE, checkpoint_step
from forgepipe.models.load import merge_lora
from forgepipe.tracking import write_json_atomic

log = logging.getLogger(__name__)

LATEST_MARKER = "latest"
PARTIAL_PREFIX = ".partial-"


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / CHECKPOINT_DIR


def rng_state() -> dict[str, Any]:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# torch.save's zip writer reports a full disk as a stream error, not ENOSPC: "basic_ios::clear:
# iostream error", then "[enforce fail at inline_container.cc] unexpected pos A vs B".
TORCH_WRITER_ERRORS = ("iostream error", "unexpected pos", "PytorchStreamWriter failed writing")


def _disk_full(exc: BaseException, path: Path) -> bool:
    """Whether a failed write ran out of space (torch reports it as a RuntimeError, not ENOSPC).

    A multi-GiB shard that does not fit fails with up to its own size still free (seen on an H200
    with a 1.3B model's optimizer state), so torch's writer errors count when under 1 GiB is left."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    if "No space left on device" in str(exc) or "os error 28" in str(exc):  # safetensors' own error type
        return True
    writer_error = any(text in str(exc) or text in str(exc.__context__ or "") for text in TORCH_WRITER_ERRORS)
    try:
        existing = next(p for p in [path, *path.parents] if p.exists())
        free = shutil.disk_usage(existing).free
    except (OSError, StopIteration):
        return False
    return free < (1 << 30 if writer_error else 1 << 20)


def _collective_write(what: str, path: Path, write: Callable[[], None], cleanup: Callable[[], None],
                      output_dir: Path) -> None:
    """Run `write` on every rank; if it fails on any rank, every rank cleans up and raises the same
    error (a full disk as one ForgeError line), so no rank waits forever at the next barrier."""
    error: BaseException | None = None
    try:
        write()
    except Exception as exc:  # noqa: BLE001 - any failure on one rank must reach every rank
        error = exc
    failed = all_reduce_sum([1.0 if error is not None else 0.0])[0]
    if not failed:
        return
    full = _disk_full(error, path) if error is not None else False
    full = all_reduce_sum([1.0 if full else 0.0])[0] > 0
    if is_main_process():
        cleanup()
    barrier()
    if full:
        raise ForgeError(f"no space left on {path.parent} while writing {what}; "
                         f"the last complete checkpoint is kept: {find_latest(output_dir) or 'none'}")
    if error is not None:
        raise error
    raise ForgeError(f"writing {what} failed on another rank")


# The checkpoint this process restored its engines from (load_checkpoint): its resolved path and step.
# Loaded through a universal (other world size) conversion it is not recorded: the state in memory is
# then not laid out as the files on disk are.
_RESUMED: dict[str, Any] = {}


def _unchanged_since_resumed(final: Path, engines: dict[str, Any], loop_state: dict[str, Any]) -> bool:
    """Collective: whether `final` is the checkpoint this process resumed from, at the same step (no
    step taken since, so the engines hold exactly what it holds), with the same engines, and still
    intact (checkpoint_verify; rank 0 reads it). Every rank must agree, or one would wait in a
    collective write the others skipped."""
    mine = (_RESUMED.get("path") == str(final.resolve()) and _RESUMED.get("step") == loop_state.get("step"))
    if mine and is_main_process():
        state = _read_state(final) or {}
        mine = (state.get("step") == loop_state.get("step") and sorted(state.get("engines") or []) == sorted(engines)
                and verify_checkpoint(final) is None)
    return all_reduce_sum([0.0 if mine else 1.0])[0] == 0


def _keep_resumed(root: Path, final: Path, tag: str, engines: dict[str, Any], loop_state: dict[str, Any]) -> Path:
    """The checkpoint is the one resumed from, untouched: only its loop state (a new fingerprint or run
    id after an honoured change) and the `latest` marker are brought up to date, each atomically."""
    if is_main_process():
        state = _read_state(final) or {}
        wanted = {**loop_state, "engines": sorted(engines), "files": state.get("files")}
        if state != wanted:
            write_json_atomic(final / LOOP_STATE, wanted)
        if (_read_state_file(root / LATEST_MARKER) or {}).get("tag") != tag:
            write_json_atomic(root / LATEST_MARKER, {"tag": tag})
        log.info("checkpoint %s: resumed from and no step since, kept as it is (not rewritten)", final)
    barrier()
    return final


def _read_state_file(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def save_checkpoint(
    engines: dict[str, Any],
    output_dir: str | Path,
    tag: str,
    loop_state: dict[str, Any],
    keep_last: int,
) -> Path:
    """Collective: every rank calls it. Returns the final checkpoint directory. The checkpoint this
    process resumed from, with no step since, is kept rather than rewritten (_unchanged_since_resumed)."""
    root = checkpoint_root(output_dir)
    partial = root / f"{PARTIAL_PREFIX}{tag}"
    final = root / tag
    if _unchanged_since_resumed(final, engines, loop_state):
        return _keep_resumed(root, final, tag, engines, loop_state)
    if is_main_process():
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True, exist_ok=True)
    barrier()

    def write() -> None:
        for name, engine in engines.items():
            engine.save_checkpoint(str(partial), tag=name, save_latest=False)
        torch.save(rng_state(), partial / f"rng_rank{current_rank():05d}.pt")

    def cleanup() -> None:
        shutil.rmtree(partial, ignore_errors=True)

    _collective_write(f"checkpoint {tag}", partial, write, cleanup, Path(output_dir))

    def finalise() -> None:
        if not is_main_process():
            return
        files = {str(p.relative_to(partial)): p.stat().st_size for p in sorted(partial.rglob("*")) if p.is_file()}
        write_json_atomic(partial / LOOP_STATE, {**loop_state, "engines": sorted(engines), "files": files})
        if final.exists():
            shutil.rmtree(final)
        os.replace(partial, final)
        write_json_atomic(root / LATEST_MARKER, {"tag": tag})

    _collective_write(f"checkpoint {tag}", partial, finalise, cleanup, Path(output_dir))
    if is_main_process():
        _prune(root, keep_last, loop_state.get("run_id"), keep=final)
        log.info("checkpoint written: %s", final)
    barrier()
    return final


def _prune(root: Path, keep_last: int, run_id: str | None, keep: Path) -> None:
    """Keep the newest `keep_last` complete checkpoints of this run (by step, never `keep`); drop
    leftover partial ones. Checkpoints of other runs are never removed here."""
    mine = []
    for path in root.iterdir():
        if not path.is_dir() or path.name.startswith(PARTIAL_PREFIX) or path == keep:
            continue
        state = _read_state(path)
        if state is not None and state.get("run_id") == run_id:
            mine.append((int(state.get("step", -1)), path))
    # Checkpoints past the one just written belong to a timeline this run left (it resumed from an
    # older one because they did not verify): they go first.
    newest = checkpoint_step(keep)
    mine.sort(key=lambda sp: (sp[0] <= newest, sp[0]))
    for _, old in mine[:max(0, len(mine) - (keep_last - 1))]:
        shutil.rmtree(old, ignore_errors=True)
    for partial in root.glob(f"{PARTIAL_PREFIX}*"):
        shutil.rmtree(partial, ignore_errors=True)


_read_state = read_state


def find_latest(output_dir: str | Path) -> Path | None:
    """The checkpoint to resume from: the one the `latest` marker names if it verifies, else the
    newest one (by step) that does, with a warning naming what was skipped; None when none does."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return None
    marker = root / LATEST_MARKER
    skipped: list[str] = []
    run_id = None  # whose checkpoints to fall back to: the marked one's run, else the finished run's
    if marker.is_file():
        try:
            tag = json.loads(marker.read_text())["tag"]
            problem = verify_checkpoint(root / tag)
            if problem is None:
                return root / tag
            skipped.append(problem)
            run_id = (_read_state(root / tag) or {}).get("run_id")
        except (OSError, ValueError, KeyError, TypeError):
            skipped.append(f"{marker} is unreadable")
    if run_id is None:
        try:
            run_id = json.loads((Path(output_dir) / RUN_FILE).read_text()).get("mlflow_run_id")
        except (OSError, ValueError, AttributeError):
            run_id = None
    candidates = sorted(
        ((checkpoint_step(p), p) for p in root.iterdir() if p.is_dir() and not p.name.startswith(PARTIAL_PREFIX)),
        key=lambda sp: (sp[0], sp[1].name), reverse=True,
    )
    if run_id is not None and any((_read_state(p) or {}).get("run_id") == run_id for _, p in candidates):
        candidates = [(s, p) for s, p in candidates if (_read_state(p) or {}).get("run_id") == run_id]
    for _, path in candidates:
        problem = verify_checkpoint(path)
        if problem is None:
            if skipped:
                log.warning("checkpoint: %s; resuming from %s instead", "; ".join(skipped), path)
            return path
        if (path / LOOP_STATE).exists():
            skipped.append(problem)
    if skipped:
        log.warning("checkpoint: %s; no complete checkpoint left, starting from step 0", "; ".join(skipped))
    return None


def read_loop_state(checkpoint: str | Path) -> dict[str, Any]:
    problem = verify_checkpoint(checkpoint)
    if problem is not None:
        raise ForgeError(f"{checkpoint} is not a complete forgepipe checkpoint: {problem}", key="train.resume")
    return json.loads((Path(checkpoint) / LOOP_STATE).read_text())


def load_checkpoint(engines: dict[str, Any], checkpoint: str | Path, engine_dir: Path | None = None) -> dict[str, Any]:
    """Collective: restore every engine (from `engine_dir/<name>` when given: the universal form),
    this rank's RNG states, and return the loop state."""
    checkpoint = Path(checkpoint)
    state = read_loop_state(checkpoint)
    for name, engine in engines.items():
        try:
            path, _ = engine.load_checkpoint(str(engine_dir or checkpoint), tag=name)
        except (RuntimeError, OSError, EOFError, ValueError) as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ForgeError(f"{checkpoint / name} cannot be loaded ({first})", key="train.resume") from None
        if path is None:
            raise ForgeError(f"{checkpoint} has no state for the {name} engine", key="train.resume")
    rng_file = checkpoint / f"rng_rank{current_rank():05d}.pt"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=False))
    _RESUMED.clear()
    if engine_dir is None:
        _RESUMED.update(path=str(checkpoint.resolve()), step=state.get("step"))
    return state


def consolidated_state_dict(engine) -> dict[str, torch.Tensor] | None:
    """The full model state dict on rank 0 (None elsewhere). Collective under ZeRO-3."""
    if engine.zero_optimization_partition_weights():
        return engine._zero3_consolidated_16bit_state_dict()
    if not is_main_process():
        return None
    return {k: v.detach().cpu() for k, v in engine.module.state_dict().items()}


def export_pretrained(
    engine,
    out_dir: str | Path,
    build_cpu_model: Callable[[], torch.nn.Module],
    tokenizer,
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Write a Hugging Face export (safetensors + tokenizer) aside and rename it into place.

    `build_cpu_model` rebuilds the trained module's structure on the CPU (LoRA wrappers
    included) so the gathered weights load by name; LoRA is then merged, so the export is a
    plain model that `from_pretrained` loads. Collective: every rank calls it.
    """
    out_dir = Path(out_dir)
    state = consolidated_state_dict(engine)
    partial = out_dir.with_name(out_dir.name + ".partial")

    def write() -> None:
        if is_main_process():
            _write_export(state, out_dir, partial, build_cpu_model, tokenizer, metadata)

    _collective_write("the model export", partial, write, lambda: shutil.rmtree(partial, ignore_errors=True),
                      out_dir.parent)
    barrier()
    return out_dir


def _write_export(state, out_dir: Path, partial: Path, build_cpu_model, tokenizer, metadata) -> None:
    shutil.rmtree(partial, ignore_errors=True)
    model = build_cpu_model()
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("rotary_emb.inv_freq")]
    if missing or unexpected:
        raise RuntimeError(f"export: state dict mismatch, missing={missing[:5]} unexpected={unexpected[:5]}")
    model = merge_lora(model)  # a plain transformers model (ScalarHeadModel merges on save)
    model.save_pretrained(partial, safe_serialization=True)
    tokenizer.save_pretrained(partial)
    if metadata:
        write_json_atomic(partial / "forgepipe.json", metadata)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(partial, out_dir)
    log.info("model exported: %s", out_dir)

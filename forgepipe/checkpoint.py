"""Checkpoints (DeepSpeed state + loop state) and Hugging Face exports.

Nothing half-written ever looks complete:
- a checkpoint is written to `checkpoints/.partial-<tag>/`, renamed to `checkpoints/<tag>/` once every
  rank has finished, and only then does the `checkpoints/latest` marker (replaced atomically) move to it;
- an export is written to `<dir>.partial/` and renamed to `<dir>/` when complete.

A checkpoint holds one DeepSpeed checkpoint per engine (PPO has two), the loop state (step,
epoch, position in the epoch, MLflow run id, ...) and each rank's RNG states.
"""

from __future__ import annotations

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

from forgepipe.distributed import barrier, current_rank, is_main_process
from forgepipe.errors import ForgeError
from forgepipe.models.load import merge_lora
from forgepipe.tracking import write_json_atomic

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
LATEST_MARKER = "latest"
LOOP_STATE = "loop_state.json"
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


def save_checkpoint(
    engines: dict[str, Any],
    output_dir: str | Path,
    tag: str,
    loop_state: dict[str, Any],
    keep_last: int,
) -> Path:
    """Collective: every rank calls it. Returns the final checkpoint directory."""
    root = checkpoint_root(output_dir)
    partial = root / f"{PARTIAL_PREFIX}{tag}"
    final = root / tag
    if is_main_process():
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True, exist_ok=True)
    barrier()
    for name, engine in engines.items():
        engine.save_checkpoint(str(partial), tag=name, save_latest=False)
    torch.save(rng_state(), partial / f"rng_rank{current_rank():05d}.pt")
    barrier()
    if is_main_process():
        write_json_atomic(partial / LOOP_STATE, {**loop_state, "engines": sorted(engines)})
        if final.exists():
            shutil.rmtree(final)
        os.replace(partial, final)
        write_json_atomic(root / LATEST_MARKER, {"tag": tag})
        _prune(root, keep_last)
        log.info("checkpoint written: %s", final)
    barrier()
    return final


def _prune(root: Path, keep_last: int) -> None:
    """Keep the newest `keep_last` complete checkpoints; drop leftover partial ones."""
    complete = sorted(p for p in root.iterdir() if p.is_dir() and (p / LOOP_STATE).is_file())
    for old in complete[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    for partial in root.glob(f"{PARTIAL_PREFIX}*"):
        shutil.rmtree(partial, ignore_errors=True)


def find_latest(output_dir: str | Path) -> Path | None:
    """The checkpoint the `latest` marker points to, if it is complete; None otherwise."""
    root = checkpoint_root(output_dir)
    marker = root / LATEST_MARKER
    if not marker.is_file():
        return None
    try:
        tag = json.loads(marker.read_text())["tag"]
    except (ValueError, KeyError):
        log.warning("ignoring unreadable checkpoint marker %s", marker)
        return None
    path = root / tag
    return path if (path / LOOP_STATE).is_file() else None


def read_loop_state(checkpoint: str | Path) -> dict[str, Any]:
    path = Path(checkpoint) / LOOP_STATE
    if not path.is_file():
        raise ForgeError(f"--resume: {checkpoint} is not a complete forgepipe checkpoint (no {LOOP_STATE})")
    return json.loads(path.read_text())


def load_checkpoint(engines: dict[str, Any], checkpoint: str | Path) -> dict[str, Any]:
    """Collective: restore every engine, this rank's RNG states, and return the loop state."""
    checkpoint = Path(checkpoint)
    state = read_loop_state(checkpoint)
    for name, engine in engines.items():
        path, _ = engine.load_checkpoint(str(checkpoint), tag=name)
        if path is None:
            raise ForgeError(f"--resume: {checkpoint} has no state for the {name} engine")
    rng_file = checkpoint / f"rng_rank{current_rank():05d}.pt"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=False))
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
    if is_main_process():
        partial = out_dir.with_name(out_dir.name + ".partial")
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
    barrier()
    return out_dir

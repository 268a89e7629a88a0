"""Whether a checkpoint can be resumed from, read with plain Python (no torch, no DeepSpeed), so the
pre-launch checks (preflight.py) and the stages (checkpoint.find_latest) give the same answer.

A checkpoint verifies when its `loop_state.json` parses and every file it lists is there with the
size it was written with, and its contents hold together:
- a torch file (`*.pt`, `*.bin`, `*.pth`: DeepSpeed's model and optimizer states, the RNG states)
  is a complete torch archive: its zip directory reads, every record lies inside the file, and the
  pickle and every small record (up to SMALL_RECORD bytes) match the CRC-32 the writer stored. A
  file overwritten with garbage of the right size fails here, not in DeepSpeed's unpickler. The
  bytes of large tensor records are not read (that would read the whole checkpoint on every rank
  at every resume); their place and size in the archive are checked;
- a `*.safetensors` file's header describes exactly the bytes it holds (preflight.safetensors_problem);
- a `*.json` file parses.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any

from forgepipe.layout import LOOP_STATE

TORCH_SUFFIXES = (".pt", ".bin", ".pth")
SMALL_RECORD = 1 << 20
# torch.save's legacy (non-zip) format starts with its magic number pickled at protocol 2.
TORCH_LEGACY_MAGIC = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19."


def torch_file_problem(path: Path) -> str | None:
    """Why `path` is not a complete torch archive (see the module docstring), or None."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            if f.read(len(TORCH_LEGACY_MAGIC)) == TORCH_LEGACY_MAGIC:
                return None
        with zipfile.ZipFile(path) as archive:
            records = archive.infolist()
            if not any(r.filename.endswith("data.pkl") for r in records):
                return "not a torch archive (no data.pkl record)"
            for record in records:
                if record.header_offset + record.compress_size > size:
                    return f"record {record.filename} runs past the end of the file"
                if record.CRC and (record.filename.endswith(".pkl") or record.file_size <= SMALL_RECORD):
                    archive.read(record)  # checks the local header and the CRC-32
    except zipfile.BadZipFile as exc:
        return f"not a torch archive ({exc})"
    except (OSError, EOFError, ValueError, RuntimeError) as exc:
        return f"unreadable ({getattr(exc, 'strerror', None) or type(exc).__name__}: {exc})"
    return None


def file_problem(path: Path) -> str | None:
    """Why a checkpoint file's contents do not hold together (by its kind), or None."""
    name = path.name.lower()
    if name.endswith(TORCH_SUFFIXES):
        return torch_file_problem(path)
    if name.endswith(".safetensors"):
        from forgepipe.preflight import safetensors_problem

        return safetensors_problem(path)
    if name.endswith(".json"):
        try:
            json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            return f"unreadable ({type(exc).__name__})"
    return None


def read_state(checkpoint: Path) -> dict[str, Any] | None:
    """A checkpoint's loop state, or None when it is missing or unreadable."""
    try:
        state = json.loads((checkpoint / LOOP_STATE).read_text())
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) else None


def verify_checkpoint(checkpoint: str | Path) -> str | None:
    """Why `checkpoint` cannot be resumed from (naming the file), or None when it is complete:
    the loop state parses, every file it lists is there with the size it was written with, and
    each file's contents hold together (file_problem)."""
    checkpoint = Path(checkpoint)
    state_file = checkpoint / LOOP_STATE
    if not state_file.is_file():
        return f"{state_file} is missing"
    try:
        state = json.loads(state_file.read_text())
    except (OSError, ValueError) as exc:
        return f"{state_file} is unreadable ({type(exc).__name__})"
    if not isinstance(state, dict) or "step" not in state:
        return f"{state_file} is not a loop state"
    files = state.get("files") or {}
    for rel, size in files.items():
        path = checkpoint / rel
        if not path.is_file():
            return f"{path} is missing"
        if path.stat().st_size != size:
            return f"{path} is truncated ({path.stat().st_size} of {size} bytes)"
    for rel in files:
        problem = file_problem(checkpoint / rel)
        if problem:
            return f"{checkpoint / rel} is corrupt: {problem}"
    return None

"""What a run read, by content: the digests a checkpoint records of the local files its config names
as inputs (data sources, PPO-ptx documents, a --chat-template file), compared when it is resumed.

A resume already refuses another path; a file rewritten in place keeps its path, so each file's
SHA-256 goes into the checkpoint's fingerprint (`inputs`) with its size and modification time. On
resume a file whose size and time are unchanged is taken as unchanged (nothing is read); otherwise
it is hashed again, and a different digest is refused in one line, as a changed path is, unless
--allow-changed-inputs says to go on with the new contents. A file copied elsewhere with its
contents intact (a new time) is hashed and accepted.

Plain Python (hashlib): used by the pre-launch checks as well as by the stages.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from forgepipe.options import label

INPUT_KEYS = ("data.sources", "data.unsupervised_sources", "data.chat_template")
CHUNK = 1 << 20


def input_files(flat: dict[str, Any]) -> dict[str, str]:
    """The local files and directories a flattened config reads as inputs: path (as given) -> key."""
    out: dict[str, str] = {}
    for key in INPUT_KEYS:
        value = flat.get(key)
        for path in value if isinstance(value, list) else [value] if isinstance(value, str) else []:
            if path not in ("", "auto", "none") and Path(path).expanduser().exists():
                out.setdefault(path, key)
    return out


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _stat(path: Path) -> tuple[int, int]:
    """(size, modification time in ns); a directory's are its files' total and newest."""
    if path.is_dir():
        stats = [p.stat() for p in path.rglob("*") if p.is_file()]
        return sum(s.st_size for s in stats), max((s.st_mtime_ns for s in stats), default=0)
    st = path.stat()
    return st.st_size, st.st_mtime_ns


def sha256(path: str | Path) -> str:
    """A file's SHA-256; a directory's over its files' relative paths and digests."""
    path = Path(path).expanduser()
    if not path.is_dir():
        return _file_sha256(path)
    h = hashlib.sha256()
    for p in sorted(q for q in path.rglob("*") if q.is_file()):
        h.update(f"{p.relative_to(path)}\0{_file_sha256(p)}\n".encode())
    return h.hexdigest()


def digest(path: str, key: str, previous: dict[str, Any] | None = None) -> dict[str, Any]:
    """{key, size, mtime_ns, sha256} of one input; the previous digest is reused when its size and
    time are unchanged (nothing is read)."""
    size, mtime = _stat(Path(path).expanduser())
    if previous and previous.get("size") == size and previous.get("mtime_ns") == mtime and previous.get("sha256"):
        return {"key": key, "size": size, "mtime_ns": mtime, "sha256": previous["sha256"]}
    return {"key": key, "size": size, "mtime_ns": mtime, "sha256": sha256(path)}


def input_digests(flat: dict[str, Any], previous: dict[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """The fingerprint's `inputs`: a digest of every local input of the config."""
    previous = previous or {}
    return {path: digest(path, key, previous.get(path)) for path, key in input_files(flat).items()}


def changed_inputs(recorded: dict[str, Any] | None, flat: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(path, key, digest then, digest now) of each input the checkpoint recorded whose contents
    differ now; inputs it did not record (older checkpoints, new paths) are not compared here."""
    changed = []
    for path, key in input_files(flat).items():
        old = (recorded or {}).get(path)
        if not isinstance(old, dict) or not old.get("sha256"):
            continue
        now = digest(path, key, old)
        if now["sha256"] != old["sha256"]:
            changed.append((path, key, old["sha256"], now["sha256"]))
    return changed


def changed_line(changes: list[tuple[str, str, str, str]], where: str) -> str:
    """One line for the first changed input (and how many others)."""
    path, key, old, new = changes[0]
    what = "the chat template" if key == "data.chat_template" else "data file" if key == "data.sources" else "document file"
    more = f" (and {len(changes) - 1} more input(s))" if len(changes) > 1 else ""
    return (f"{label(key)}: {what} {path} changed since {where} was written (sha256 {old[:12]} then, {new[:12]} "
            f"now){more}; restore it, pass {label('train.allow_changed_inputs')} to resume on its new contents, "
            f"or start afresh with {label('overwrite')}")

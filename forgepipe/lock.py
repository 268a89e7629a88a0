"""One run at a time in an output directory, and file locks that work where the files are.

`<output-dir>/.forgepipe.lock` is flock'ed (exclusive) by rank 0 of the run that uses the directory,
for the life of the run (StageContext). It holds a JSON record of its holder: host, pid, start time,
stage, Slurm job, and once the run has one its MLflow run id and store. A second run into the same
directory is refused in one line naming that holder. The lock is released, and the file removed,
when the run ends; a process that dies (kill -9, out of memory, a lost node) releases the lock with
its file descriptor but leaves the file: the next run in the directory takes the lock, finds the dead
holder's record, and closes the MLflow run it left RUNNING (tracking.close_abandoned).

Locks need a filesystem that keeps them: Lustre mounted without `flock` answers flock() and
fcntl() locks with ENOSYS, and with `localflock` keeps them per node, so two nodes both "hold" the
lock; the SQLite store's own (POSIX) locks have the same needs. `flock_problem` probes a directory
before a run relies on it.

Plain Python (no torch, no MLflow): the checks stay fast.
"""

from __future__ import annotations

import datetime as _dt
import errno
import fcntl
import json
import os
import socket
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from forgepipe.errors import ForgeError
from forgepipe.layout import LOCK_FILE

# Errors that mean "this filesystem does not do locks" rather than "someone holds it".
UNSUPPORTED = {errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOLCK, errno.EINVAL, errno.ENOTSUP}
NO_LOCK_ENV = "FORGEPIPE_NO_OUTPUT_LOCK"  # "1": run without the output directory's lock (the user's promise)


def _first_existing(path: Path) -> Path:
    for p in [path, *path.parents]:
        if p.is_dir():
            return p
    return Path("/")


def mount_of(path: Path, mountinfo: str | None = None) -> tuple[str, str, set[str]]:
    """(mount point, filesystem type, mount and super options) of the mount holding `path`, from
    /proc/self/mountinfo (Linux); ("", "", set()) when unknown."""
    try:
        text = mountinfo if mountinfo is not None else Path("/proc/self/mountinfo").read_text()
    except OSError:
        return "", "", set()
    target = str(Path(path).resolve())
    best: tuple[str, str, set[str]] = ("", "", set())
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        fields, rest = left.split(), right.split()
        if not sep or len(fields) < 6 or len(rest) < 2:
            continue
        point = fields[4].replace("\\040", " ")
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best[0]):
            options = set(fields[5].split(",")) | set((rest[2] if len(rest) > 2 else "").split(","))
            best = (point, rest[0], options)
    return best


def flock_problem(directory: str | Path, mountinfo: str | None = None) -> str | None:
    """Why file locks cannot be relied on in `directory` (or the nearest existing directory above
    it), in words; None when they work. Lustre's mount options are read first (without `flock`
    locks fail, with `localflock` they hold per node only); then a real flock() and fcntl() lock
    of a temporary file in the directory (removed at once) catches any other filesystem."""
    where = _first_existing(Path(directory))
    point, fstype, options = mount_of(where, mountinfo)
    if fstype == "lustre":
        if "localflock" in options:
            return (f"{where} is on Lustre mounted with localflock ({point}): locks hold on one node only, "
                    "so runs on two nodes would not see each other's")
        if "flock" not in options:
            return f"{where} is on Lustre mounted without flock ({point}): file locks fail there"
    try:
        fd, name = tempfile.mkstemp(prefix=".forgepipe-lock-probe-", dir=where)
    except OSError:
        return None  # not writable: the output and store checks say so themselves
    try:
        for lock in (fcntl.flock, fcntl.lockf):
            try:
                lock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                lock(fd, fcntl.LOCK_UN)
            except OSError as exc:
                if exc.errno in UNSUPPORTED:
                    kind = "flock()" if lock is fcntl.flock else "fcntl() locks"
                    return f"{where} does not support {kind} ({os.strerror(exc.errno)}; {fstype or 'unknown'} filesystem)"
                raise
    finally:
        os.close(fd)
        os.unlink(name)
    return None


def check_locking(output_dir: str | Path, store_db: str | Path | None) -> None:
    """One line, before a run relies on them, when the output directory's lock or the SQLite
    store's locks would not hold, naming the way out."""
    if os.environ.get(NO_LOCK_ENV) != "1":
        problem = flock_problem(output_dir)
        if problem:
            raise ForgeError(f"{problem}. forgepipe locks the output directory so that two runs never share it: "
                             "choose an --output-dir on a filesystem with locks (Lustre mounted with flock, NFS, "
                             f"a local disk), or set {NO_LOCK_ENV}=1 to run without the lock", key="output_dir")
    if store_db is not None:
        problem = flock_problem(Path(store_db).parent)
        if problem:
            raise ForgeError(f"{problem}. An SQLite store needs working locks or it is corrupted by concurrent "
                             "runs: put the store where locks work (--tracking-uri sqlite:////path/on/nfs/mlflow.db), "
                             "or use an MLflow server (--tracking-uri http://host:5000)", key="tracking.uri")


def holder_record(stage: str) -> dict[str, Any]:
    """This process as a lock holder: who, where, since when."""
    record = {"host": socket.gethostname(), "pid": os.getpid(),
              "started": _dt.datetime.now().astimezone().isoformat(timespec="seconds"), "stage": stage}
    if os.environ.get("SLURM_JOB_ID"):
        record["slurm_job_id"] = os.environ["SLURM_JOB_ID"]
    return record


def holder_words(record: dict[str, Any] | None) -> str:
    """`host frontier00012, pid 4242, started 2026-11-25T22:25:03+00:00, Slurm job 123, stage sft`."""
    if not record:
        return "a process that has not recorded itself yet"
    parts = [f"host {record.get('host', '?')}", f"pid {record.get('pid', '?')}", f"started {record.get('started', '?')}"]
    if record.get("slurm_job_id"):
        parts.append(f"Slurm job {record['slurm_job_id']}")
    if record.get("stage"):
        parts.append(f"stage {record['stage']}")
    return ", ".join(parts)


def _read(fd: int) -> dict[str, Any] | None:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        data = b""
        while chunk := os.read(fd, 65536):
            data += chunk
        record = json.loads(data) if data.strip() else None
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


@dataclass
class OutputLock:
    """The output directory's lock, held by this process: see the module docstring."""

    path: Path
    fd: int
    record: dict[str, Any]
    stale: dict[str, Any] | None = None  # the record a holder that died left behind
    _released: bool = field(default=False, repr=False)

    @classmethod
    def acquire(cls, directory: str | Path, record: dict[str, Any]) -> OutputLock:
        """Take the lock of `directory` (created if need be) or raise a one-line ForgeError naming
        its holder. Never waits."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / LOCK_FILE
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o664)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                holder = _read(fd)
                os.close(fd)
                if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise ForgeError(f"{directory} is in use by another run ({holder_words(holder)}); wait for it "
                                     "to end, or choose another --output-dir", key="output_dir") from None
                raise ForgeError(f"{directory}: cannot lock {path} ({os.strerror(exc.errno)}); see "
                                 f"{NO_LOCK_ENV} in the README", key="output_dir") from None
            try:
                same = os.fstat(fd).st_ino == os.stat(path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # the holder removed the file as we opened it: lock the new one
        lock = cls(path, fd, record, stale=_read(fd))
        lock._write()
        return lock

    def _write(self) -> None:
        data = json.dumps(self.record, indent=1, default=str).encode() + b"\n"
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, data, 0)

    def update(self, **fields: Any) -> None:
        """Add to the holder's record (the MLflow run id and store, once known)."""
        self.record.update({k: v for k, v in fields.items() if v is not None})
        if not self._released:
            self._write()

    def release(self) -> None:
        """Remove the file and let go of the lock (the file goes first, under the lock: a run that
        opened it meanwhile sees it gone and locks the new one)."""
        if self._released:
            return
        self._released = True
        try:
            if os.fstat(self.fd).st_ino == os.stat(self.path).st_ino:
                os.unlink(self.path)
        except OSError:
            pass
        os.close(self.fd)


def held_by(directory: str | Path) -> dict[str, Any] | None:
    """The record of the live run holding `directory`'s lock, else None (nothing is created)."""
    path = Path(directory) / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return _read(fd) or {}
    finally:
        os.close(fd)
    return None

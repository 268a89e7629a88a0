"""Stop signals that arrive before the stage code (and its StopRequest) is even imported.

The command installs `catch_early()` first thing, so Slurm's walltime warning (SIGUSR1/SIGTERM)
during the pre-launch checks or imports is remembered instead of killing the process; the stage's
StopRequest takes over in StageRun and acts on it (stopping before training starts).
"""

from __future__ import annotations

import signal

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
received: int | None = None


def _remember(signum, frame) -> None:
    global received
    received = signum


def catch_early() -> None:
    for sig in STOP_SIGNALS:
        signal.signal(sig, _remember)

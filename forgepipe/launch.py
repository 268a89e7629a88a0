"""`python -m forgepipe.launch --nproc-per-node N STAGE [options]`: N ranks of `forgepipe STAGE` on this
machine, each told its rank as torchrun tells it (RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE,
MASTER_ADDR, MASTER_PORT), whose exit status is the ranks' own: scripts/local/run.sh starts a
multi-GPU run with it.

Why not torchrun: a SIGTERM or SIGUSR1 to torchrun (Docker's stop, a batch system's walltime warning)
ends torchrun with exit status 1 and its own traceback, and it kills the ranks 30 s later whether
their stop checkpoint is written or not, so a job resubmitted on exit status 85 never is. Here a stop
signal is passed to every rank and nothing else: the ranks agree on a step, write the checkpoint and
end with 85, and so does the launcher. Ctrl-C (SIGINT) is passed on the same way.

The exit status: 0 when every rank ended 0; 85 when the ranks stopped for a signal (each ended 85, or
0); else the first failing rank's status (a signal's death as 128+N), after the other ranks were
stopped (SIGTERM, then SIGKILL after FORGEPIPE_LAUNCH_GRACE_S seconds, default 60).
No torch here: it starts in well under a second.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

from forgepipe.signals import EXIT_PREEMPTED

FORWARDED = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
RANK_COMMAND = [sys.executable, "-m", "forgepipe"]  # a test stands a plain script in for it
USAGE = "usage: python -m forgepipe.launch --nproc-per-node N STAGE [forgepipe options...]"


def fail(message: str) -> None:
    print(f"forgepipe: error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


def parse(argv: list[str]) -> tuple[int, list[str]]:
    if len(argv) < 3 or argv[0] not in ("--nproc-per-node", "--nproc_per_node"):
        fail(USAGE)
    if not argv[1].isdigit() or int(argv[1]) < 1:
        fail(f"--nproc-per-node: {argv[1]!r} is not a positive number")
    return int(argv[1]), argv[2:]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_env(rank: int, world: int, port: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
               GROUP_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=env.get("MASTER_PORT") or str(port))
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // world)))
    return env


def outcome(codes: list[int]) -> int:
    """The launcher's status from the ranks' (a negative one: killed by that signal)."""
    failed = [c for c in codes if c not in (0, EXIT_PREEMPTED)]
    if failed:
        return 128 - failed[0] if failed[0] < 0 else failed[0]
    return EXIT_PREEMPTED if EXIT_PREEMPTED in codes else 0


def main(argv: list[str] | None = None) -> int:
    world, args = parse(sys.argv[1:] if argv is None else argv)
    port = free_port()
    ranks: list[subprocess.Popen] = []

    def forward(signum, frame) -> None:
        for proc in ranks:
            if proc.poll() is None:
                try:
                    proc.send_signal(signum)
                except ProcessLookupError:
                    pass

    for sig in FORWARDED:
        signal.signal(sig, forward)
    command = [*RANK_COMMAND, *args]
    # Each rank in a session of its own (as torchrun starts them): a terminal's Ctrl-C reaches them
    # once, through this launcher, never twice.
    ranks.extend(subprocess.Popen(command, env=rank_env(rank, world, port), start_new_session=True)
                 for rank in range(world))
    grace = float(os.environ.get("FORGEPIPE_LAUNCH_GRACE_S", "60"))
    kill_at = None
    while True:
        codes = [proc.poll() for proc in ranks]
        if all(c is not None for c in codes):
            break
        if kill_at is None and any(c not in (None, 0, EXIT_PREEMPTED) for c in codes):
            # A rank failed: the others would wait for it in a collective. They are stopped, and
            # killed after `grace` seconds. (Ranks that stop for a signal agree on it and end together:
            # one more signal then could only cut short the end of one that is exiting.)
            for proc in ranks:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
            kill_at = time.monotonic() + grace
        if kill_at is not None and time.monotonic() > kill_at:
            for proc in ranks:
                if proc.poll() is None:
                    proc.kill()
        time.sleep(0.2)
    codes = [proc.returncode for proc in ranks]
    status = outcome(codes)
    if status not in (0, 2, EXIT_PREEMPTED):  # 2: a refusal, said in one line by the rank
        worst = next(i for i, c in enumerate(codes) if c not in (0, EXIT_PREEMPTED))
        how = f"signal {-codes[worst]}" if codes[worst] < 0 else f"status {codes[worst]}"
        print(f"forgepipe: launch: rank {worst} ended with {how}; the launcher exits {status}", file=sys.stderr,
              flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())

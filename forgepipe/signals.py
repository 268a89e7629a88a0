"""Stop signals: Slurm's warning before the walltime (SIGUSR1, or SIGTERM) ends a run cleanly.

One handler, installed once when a command starts (`STOP.install()`), serves the whole process,
the stages of a pipeline included. What it does depends on where the run is:
- while the command line is read and checked: it remembers the signal (the stage's start acts on it);
- from a stage's start until its training loop starts (`startup()`): it stops at once, raising
  StartupStop: tokenizing or loading models can take many minutes and there is nothing to checkpoint;
- while training (`remember()`, as before the stage): it only records the signal; the step driver
  agrees on it over ranks at the next step boundary, writes a checkpoint and raises Preempted;
- once the command has finished (`ignore()`): it ignores it, so a warning racing the end of the job
  does not turn a finished run's exit status into a failure.

No torch here: the handler must be in place before the heavy imports start.
"""

from __future__ import annotations

import signal

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
EXIT_PREEMPTED = 85  # the batch scripts resubmit a job that ended with this status


class Preempted(Exception):
    """Raised after the stop checkpoint is written; the CLI exits with EXIT_PREEMPTED."""


class StartupStop(Preempted):
    """A stop signal before training started: nothing to checkpoint, the run stops at once."""


class StopRequest:
    """The process's stop request: which signal arrived, and what a signal does now (see above).

    Every rank must stop at the same step (the checkpoint is collective), so during training
    the flag is combined over ranks (`agreed`) before it is acted on.
    """

    def __init__(self):
        self.signal: int | None = None
        self.mode = "remember"  # remember | startup | ignore

    def install(self) -> StopRequest:
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.mode == "ignore":
            return
        self.signal = signum
        if self.mode == "startup":
            raise StartupStop(self._startup_message())

    def _startup_message(self) -> str:
        return f"stopped by signal {self.signal} during start-up, before training"

    def startup(self) -> None:
        """A stage starts: a signal from now on (or one that came earlier) stops it at once."""
        self.mode = "startup"
        if self.signal is not None:
            raise StartupStop(self._startup_message())

    def remember(self) -> None:
        """Training starts (or a stage ended): a signal is recorded, and acted on at the next step
        boundary (with a checkpoint) or by the next stage's start."""
        self.mode = "remember"

    def ignore(self) -> None:
        self.mode = "ignore"

    def agreed(self) -> bool:
        """Whether any rank received a signal (collective: every rank calls it at the same step)."""
        from forgepipe import distributed as dist

        return dist.all_reduce_sum([1.0 if self.signal is not None else 0.0])[0] > 0

    def reason(self) -> str:
        return f"signal {self.signal}" if self.signal is not None else "a signal to another rank"


# The one stop request of the process, shared by the stages of a pipeline: a signal that arrives
# between two stages (during an export, say) still stops the next one.
STOP = StopRequest()

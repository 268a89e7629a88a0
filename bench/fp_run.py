"""forgepipe's CLI with the benchmark's step clock.

    python bench/fp_run.py sft --model ... (the usual CLI arguments)

The step clock prints one `BENCH_STEP <seconds> <real tokens> <computed tokens>` line per
optimizer step (grad accumulation 1), measured as bench/contenders.py measures TRL and the patched
DeepSpeed-Chat measures itself: from the collation of the batch to the end of `engine.step()`.
It wraps `train_loop` where the supervised recipe imported it (and, for PPO, the trainer's two
phases); nothing else of forgepipe changes. The levers it once swapped in are options now:
`--group-by-length`, and `--pad-to-multiple-of <max length>` for DeepSpeed-Chat's pad-to-max.
"""

from __future__ import annotations

import os
import sys
import time


def _clocked(engine, collate):
    """Wrap collate (start of a step) and engine.step (its end) to print one line per step."""
    import torch

    started: dict[str, float | int] = {}

    def timed_collate(features):
        batch = collate(features)
        started.update(t=time.perf_counter(), real=int(batch["attention_mask"].sum()),
                       computed=batch["input_ids"].numel())
        return batch

    step = engine.step
    profile = _Profile.from_env()

    def timed_step(*args, **kwargs):
        out = step(*args, **kwargs)
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # the clock reads finished GPU work, as every contender's does
        if started:
            print(f"BENCH_STEP {time.perf_counter() - started['t']:.6f} {started['real']} {started['computed']}",
                  flush=True)
        if profile:
            profile.after_step()
        return out

    engine.step = timed_step  # an instance attribute: only this engine, only this process
    return timed_collate


class _Profile:
    """BENCH_PROFILE=FIRST:LAST:DIR: torch.profiler (CPU and CUDA) over steps FIRST..LAST (1-based,
    FIRST >= 2: the profiler starts when step FIRST-1 ends),
    their operator tables written to DIR/profile-<pid>.txt: where a step's host time goes (DeepSpeed's hooks, the
    model's Python, host syncs) beside the device's busy time. The profiled steps run slower."""

    def __init__(self, first: int, last: int, path: str):
        self.first, self.last, self.path, self.done, self.prof = first, last, path, 0, None
        self.syncs = None  # Counter of implicit device syncs by the first frame outside torch (GPU only)

    def _count_syncs(self) -> None:
        """torch.cuda.set_sync_debug_mode("warn") over the profiled steps, each warning counted where it
        was raised from (outside torch): where the step waits for the device without saying so."""
        import collections
        import traceback
        import warnings

        import torch

        self.syncs = collections.Counter()
        shown = warnings.showwarning

        def count(message, category, filename, lineno, file=None, line=None):
            if "synchroniz" not in str(message):
                return shown(message, category, filename, lineno, file, line)
            frames = [f for f in traceback.extract_stack()[:-1] if "/torch/" not in f.filename
                      and "warnings" not in f.filename]
            where = f"{frames[-1].filename.split('site-packages/')[-1]}:{frames[-1].lineno}" if frames else "?"
            self.syncs[where] += 1

        warnings.showwarning = count
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")

    @classmethod
    def from_env(cls):
        spec = os.environ.get("BENCH_PROFILE")
        if not spec:
            return None
        first, last, path = spec.split(":", 2)
        return cls(int(first), int(last), path)

    def after_step(self) -> None:
        import torch

        self.done += 1
        if self.done == self.first - 1:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                activities.append(torch.profiler.ProfilerActivity.CUDA)
                self._count_syncs()
            self.prof = torch.profiler.profile(activities=activities)
            self.prof.__enter__()
        elif self.done == self.last and self.prof is not None:
            self.prof.__exit__(None, None, None)
            if torch.cuda.is_available():
                torch.cuda.set_sync_debug_mode("default")
            averages = self.prof.key_averages()
            os.makedirs(self.path, exist_ok=True)
            with open(os.path.join(self.path, f"profile-{os.getpid()}.txt"), "w") as f:
                steps = self.last - self.first + 1
                f.write(f"steps {self.first}-{self.last} ({steps})\n")
                if self.syncs is not None:  # torch.cuda.set_sync_debug_mode: the implicit syncs, by call site
                    f.write(f"\nimplicit device syncs: {sum(self.syncs.values())} ({sum(self.syncs.values()) / steps:.1f} "
                            "a step; the clock's own torch.cuda.synchronize is not counted)\n")
                    for where, n in self.syncs.most_common(15):
                        f.write(f"  {n:6d}  {where}\n")
                f.write("\nby self CPU time:\n")
                f.write(averages.table(sort_by="self_cpu_time_total", row_limit=35))
                if torch.cuda.is_available():
                    f.write("\n\nby self device time:\n")
                    f.write(averages.table(sort_by="self_device_time_total", row_limit=25))


def install() -> None:
    import forgepipe.stages.supervised as supervised

    original = supervised.train_loop

    def train_loop(*, engine, collate, **kwargs):
        return original(engine=engine, collate=_clocked(engine, collate), **kwargs)

    supervised.train_loop = train_loop


def install_ppo() -> None:
    """PPO's clock: one `BENCH_PPO <total s> <generation s> <scoring s> <training s> <generated tokens>`
    line per iteration (experience batch), as the patched DeepSpeed-Chat step 3 prints it. The PPO
    loop calls `make_experience` (generation, then the actor/reference/critic/reward forwards, timed
    inside it with device-synchronised clocks) and `train_on_experience` (losses, backward, steps) by
    their names in the trainer module; both are wrapped there. Generated tokens: every row's response
    up to and including its first EOS."""
    import forgepipe.stages.ppo.trainer as trainer
    from forgepipe.stages.ppo.experience import _device, wall_clock

    make, train = trainer.make_experience, trainer.train_on_experience
    began: dict[str, float] = {}

    def make_experience(actor, *args, **kwargs):
        began["t"] = wall_clock(_device(actor))
        return make(actor, *args, **kwargs)

    def train_on_experience(actor, critic, exp, *args, **kwargs):
        device = exp.sequences.device
        start = wall_clock(device)
        out = train(actor, critic, exp, *args, **kwargs)
        end = wall_clock(device)
        print(f"BENCH_PPO {end - began.get('t', start):.6f} {exp.generation_s:.6f} {exp.scoring_s:.6f} "
              f"{end - start:.6f} {int(exp.action_mask.sum())}", flush=True)
        return out

    trainer.make_experience = make_experience
    trainer.train_on_experience = train_on_experience


def main() -> None:
    args = sys.argv[1:]
    print(f"BENCH_START {time.time():.6f}", flush=True)
    install()
    if args and args[0] in ("ppo", "pipeline"):  # the other stages do not import the PPO trainer
        install_ppo()
    from forgepipe.cli import main as cli_main

    sys.argv = ["forgepipe", *args]
    cli_main()


if __name__ == "__main__":
    main()

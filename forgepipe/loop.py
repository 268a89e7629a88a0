"""The training loop shared by the supervised stages (SFT and reward).

Plain and visible, nanoGPT-style: order the data, run micro-batches through the DeepSpeed
engine, step at accumulation boundaries, log, evaluate, checkpoint. The loop does not know
which stage runs it: a stage hands it a `loss_fn(engine, batch) -> (loss, metrics)` and an
`evaluate(engine) -> metrics`.

The data order is a pure function of (seed, epoch), and the loop's whole state (step, epoch,
micro-batches consumed in the epoch) goes into every checkpoint, so a resumed run sees exactly
the samples an uninterrupted run would have seen.
"""

from __future__ import annotations

import logging
import math
import signal
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from forgepipe import distributed as dist
from forgepipe.checkpoint import save_checkpoint
from forgepipe.distributed import World
from forgepipe.tracking import Tracker

log = logging.getLogger(__name__)

EXIT_PREEMPTED = 85  # the batch scripts resubmit a job that ended with this status


# ---------------------------------------------------------------------------
# Pure helpers: schedule and data order


def lr_factor(step: int, total_steps: int, warmup_steps: int, min_ratio: float) -> float:
    """Linear warm-up to 1, then cosine decay to `min_ratio` at `total_steps`."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if total_steps <= warmup_steps:
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The shuffled order of the n samples in an epoch; the same on every rank and every run."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=generator).tolist()


def micro_batches_per_rank(n: int, world_size: int, micro_batch: int, grad_accum: int) -> int:
    """Micro-batches each rank runs per epoch: whole optimizer steps only, the same on every rank."""
    per_step = world_size * micro_batch * grad_accum
    return (n // per_step) * grad_accum


def rank_batches(order: list[int], rank: int, world_size: int, micro_batch: int, grad_accum: int) -> list[list[int]]:
    """This rank's micro-batches of an epoch: global micro-batch i takes order[i*W*b:(i+1)*W*b],
    and rank r takes its r-th slice of b samples. The incomplete last step is dropped."""
    count = micro_batches_per_rank(len(order), world_size, micro_batch, grad_accum)
    span = world_size * micro_batch
    return [
        order[i * span + rank * micro_batch: i * span + (rank + 1) * micro_batch]
        for i in range(count)
    ]


def eval_batches(n: int, rank: int, world_size: int, batch: int) -> list[tuple[list[int], float]]:
    """Every sample exactly once over all ranks, and the same number of batches on every rank
    (ZeRO-3 forwards are collective): a rank with nothing left repeats sample 0 with weight 0."""
    count = math.ceil(n / (world_size * batch)) if n else 0
    out = []
    for i in range(count):
        start = (i * world_size + rank) * batch
        idx = list(range(start, min(start + batch, n)))
        out.append((idx, 1.0) if idx else ([0], 0.0))
    return out


def memory_metrics() -> dict[str, float]:
    """Peak memory so far, min and max over ranks (a lopsided rank is what runs out first): the
    process's resident set on the host (ru_maxrss is KiB on Linux) and, on GPUs, the caching
    allocator's peak allocated and reserved bytes on this rank's device. Collective."""
    import resource

    names = ["mem/host_peak_rss_gib"]
    values = [resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20]
    if torch.cuda.is_available():  # ROCm too
        names += ["mem/device_peak_allocated_gib", "mem/device_peak_reserved_gib"]
        values += [torch.cuda.max_memory_allocated() / 2**30, torch.cuda.max_memory_reserved() / 2**30]
    low, high = dist.min_max(values)
    out = {}
    for name, lo, hi in zip(names, low, high, strict=True):
        out[f"{name}_min"] = lo
        out[f"{name}_max"] = hi
    return out


def checkpoint_due(step: int, save_every: int, save_every_minutes: float, seconds_since_save: float) -> bool:
    """Every `save_every` steps and/or every `save_every_minutes` minutes (0 turns either off)."""
    by_steps = save_every > 0 and step % save_every == 0
    by_time = save_every_minutes > 0 and seconds_since_save >= 60 * save_every_minutes
    return by_steps or by_time


# ---------------------------------------------------------------------------
# Loop state and stop requests


@dataclass
class LoopState:
    step: int = 0  # optimizer steps done
    epoch: int = 0
    micro_in_epoch: int = 0  # micro-batches of `epoch` already consumed
    samples_seen: int = 0
    tokens_seen: int = 0
    run_id: str | None = None
    fingerprint: dict[str, Any] = field(default_factory=dict)  # what a resume must match

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LoopState:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)


class StopRequest:
    """Set by SIGUSR1/SIGTERM (Slurm's warning before the walltime); checked between steps.

    Every rank must stop at the same step (the checkpoint is collective), so the flag is
    combined over ranks before it is acted on.
    """

    def __init__(self):
        self.signal: int | None = None

    def install(self) -> StopRequest:
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.signal = signum

    def agreed(self) -> bool:
        return dist.all_reduce_sum([1.0 if self.signal is not None else 0.0])[0] > 0

    def reason(self) -> str:
        return f"signal {self.signal}" if self.signal is not None else "a signal to another rank"


# The process's one stop request, shared by the stages of a pipeline: a signal that arrives
# between two stages (during an export, say) still stops the next one.
STOP = StopRequest()


class Preempted(Exception):
    """Raised after the stop checkpoint is written; the CLI exits with EXIT_PREEMPTED."""


# ---------------------------------------------------------------------------
# The loop


@dataclass
class LoopSettings:
    epochs: int
    max_steps: int
    micro_batch: int
    grad_accum: int
    seed: int
    log_every: int
    eval_every: int
    save_every: int
    save_every_minutes: float
    keep_last: int
    flops_per_token: float = 0.0  # 6N; gives perf/model_tflops_per_s per device
    peak_tflops: float = 0.0  # gives perf/mfu


def total_steps(n_train: int, world_size: int, s: LoopSettings) -> int:
    per_epoch = micro_batches_per_rank(n_train, world_size, s.micro_batch, s.grad_accum) // s.grad_accum
    total = per_epoch * s.epochs
    return min(total, s.max_steps) if s.max_steps > 0 else total


def train_loop(
    *,
    engine,
    train_data,
    collate: Callable[[list[dict]], dict[str, torch.Tensor]],
    loss_fn: Callable[[Any, dict[str, torch.Tensor]], tuple[torch.Tensor, dict[str, float]]],
    evaluate: Callable[[Any], dict[str, float]] | None,
    settings: LoopSettings,
    world: World,
    tracker: Tracker,
    output_dir: str,
    state: LoopState,
    stop: StopRequest | None = None,
    count_tokens: Callable[[dict[str, torch.Tensor]], int] = lambda b: int(b["attention_mask"].sum()),
) -> LoopState:
    """Run (or continue) training until `total_steps`; returns the final state."""
    s = settings
    steps_total = total_steps(len(train_data), world.world_size, s)
    if steps_total == 0:
        from forgepipe.errors import ForgeError

        raise ForgeError(
            f"--per-device-batch-size: {len(train_data)} training samples are fewer than one optimizer step "
            f"({world.world_size} ranks x {s.micro_batch} x {s.grad_accum}); use a smaller batch or more data"
        )
    device = engine.device
    progress = tqdm(total=steps_total, initial=state.step, desc="train", disable=not world.is_main, dynamic_ncols=True)
    last_save = time.monotonic()

    def fresh_window() -> dict[str, Any]:
        # Sums stay on the device until the log step: no host synchronisation per micro-batch.
        return {"loss": torch.zeros((), dtype=torch.float32, device=device), "micro": 0, "samples": 0,
                "tokens": 0, "time": time.monotonic(), "extra": {}}

    window = fresh_window()

    def checkpoint(tag: str) -> None:
        save_checkpoint({"model": engine}, output_dir, tag, state.to_dict(), s.keep_last)

    while state.step < steps_total:
        batches = rank_batches(epoch_order(len(train_data), s.seed, state.epoch), world.rank,
                               world.world_size, s.micro_batch, s.grad_accum)
        loader = DataLoader(train_data, batch_sampler=batches[state.micro_in_epoch:], collate_fn=collate,
                            pin_memory=device.type == "cuda")
        engine.train()
        for batch in loader:
            window["tokens"] += count_tokens(batch)  # on the host, before the copy
            batch = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
            boundary = engine.is_gradient_accumulation_boundary()
            loss, metrics = loss_fn(engine, batch)
            engine.backward(loss)
            engine.step()
            state.micro_in_epoch += 1
            window["loss"] += loss.detach().float()
            window["micro"] += 1
            window["samples"] += s.micro_batch
            for k, v in metrics.items():
                v = v.detach().float() if torch.is_tensor(v) else float(v)
                window["extra"][k] = window["extra"].get(k, 0.0) + v
            if not boundary:
                continue

            state.step += 1
            progress.update(1)
            if state.step % s.log_every == 0 or state.step == steps_total:
                keys = sorted(window["extra"])
                sums = dist.all_reduce_sum(
                    [window["loss"], window["micro"], window["samples"], window["tokens"]]
                    + [window["extra"][k] for k in keys]
                )
                elapsed = max(1e-9, time.monotonic() - window["time"])  # after the sync above
                loss_mean = sums[0] / sums[1]
                record = {
                    "train/loss": loss_mean,
                    "train/lr": engine.get_lr()[0],
                    "perf/samples_per_s": sums[2] / elapsed,
                    "perf/tokens_per_s": sums[3] / elapsed,
                }
                record.update({f"train/{k}": v / sums[1] for k, v in zip(keys, sums[4:], strict=True)})
                record.update(memory_metrics())
                if s.flops_per_token:
                    tflops = s.flops_per_token * sums[3] / elapsed / world.world_size / 1e12
                    record["perf/model_tflops_per_s"] = tflops
                    if s.peak_tflops:
                        record["perf/mfu"] = tflops / s.peak_tflops
                state.samples_seen += int(sums[2])
                state.tokens_seen += int(sums[3])
                tracker.log_metrics(record, step=state.step)
                progress.set_postfix(loss=f"{loss_mean:.4f}", lr=f"{record['train/lr']:.2e}")
                window = fresh_window()
            if evaluate and s.eval_every and state.step % s.eval_every == 0 and state.step < steps_total:
                tracker.log_metrics(evaluate(engine), step=state.step)
                engine.train()
            if state.step >= steps_total:
                break
            due = checkpoint_due(state.step, s.save_every, s.save_every_minutes, time.monotonic() - last_save)
            stopping = stop is not None and stop.agreed()
            if due or stopping:
                checkpoint(f"step-{state.step:08d}")
                last_save = time.monotonic()
            if stopping:
                progress.close()
                raise Preempted(f"stopped by {stop.reason()} at step {state.step}")
        else:
            state.epoch += 1
            state.micro_in_epoch = 0
            continue
        break
    progress.close()
    if evaluate:
        tracker.log_metrics(evaluate(engine), step=state.step)
    checkpoint(f"step-{state.step:08d}")
    return state

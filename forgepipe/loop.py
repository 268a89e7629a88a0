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
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from forgepipe import distributed as dist
from forgepipe.checkpoint import save_checkpoint
from forgepipe.config import Config
from forgepipe.data.collate import length_grouped_order, rows_per_sample, sample_lengths, token_budget_batches
from forgepipe.distributed import World
from forgepipe.errors import ForgeError
from forgepipe.options import label
from forgepipe.signals import Preempted, StopRequest
from forgepipe.tracking import Tracker

log = logging.getLogger(__name__)



# ---------------------------------------------------------------------------
# Pure helpers: data order and sharding


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


def deal(plan: list[list[int]], rank: int, world_size: int, grad_accum: int) -> list[list[int]]:
    """This rank's share of a global list of micro-batches: batch i*W + r for rank r, whole optimizer
    steps only, the same count on every rank (ZeRO's collectives run per micro-batch)."""
    count = (len(plan) // (world_size * grad_accum)) * grad_accum
    return [plan[i * world_size + rank] for i in range(count)]


def epoch_micro_batches(n: int, lengths: Sequence[int] | None, s: LoopSettings, world: World,
                        epoch: int) -> list[list[int]]:
    """This rank's micro-batches of an epoch of a supervised stage: the seeded shuffle, or (with
    `lengths`, --group-by-length) the seeded order in which each global micro-batch (ranks x
    micro-batch) holds samples of like length, or (--tokens-per-micro-batch) micro-batches cut by
    tokens. All are pure functions of seed and epoch."""
    if s.tokens_per_micro_batch:
        plan = token_budget_batches(lengths, s.tokens_per_micro_batch, s.seed, epoch, rows=s.rows_per_sample,
                                    multiple=s.pad_multiple)
        return deal(plan, world.rank, world.world_size, s.grad_accum)
    if lengths is None:
        order = epoch_order(n, s.seed, epoch)
    else:
        order = length_grouped_order(lengths, world.world_size * s.micro_batch, s.seed, epoch)
    return rank_batches(order, world.rank, world.world_size, s.micro_batch, s.grad_accum)


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


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """A collated host batch on the engine's device. Host tensors bound for a GPU are pinned first:
    a copy from pageable memory blocks the host until the GPU has drained its queue (a device sync
    per micro-batch), one from pinned memory is truly asynchronous (torch's caching host allocator
    keeps the buffer alive until the copy is done)."""
    pin = torch.device(device).type != "cpu"
    return {k: (v.pin_memory() if pin and v.device.type == "cpu" else v).to(device, non_blocking=True)
            if torch.is_tensor(v) else v for k, v in batch.items()}


def checkpoint_due(step: int, save_every: int, save_every_minutes: float, seconds_since_save: float) -> bool:
    """Every `save_every` steps and/or every `save_every_minutes` minutes (0 turns either off)."""
    by_steps = save_every > 0 and step % save_every == 0
    by_time = save_every_minutes > 0 and seconds_since_save >= 60 * save_every_minutes
    return by_steps or by_time


# ---------------------------------------------------------------------------
# Loop state and stop requests


@dataclass
class LoopState:
    step: int = 0  # steps done: optimizer steps (supervised) or PPO steps
    epoch: int = 0
    position: int = 0  # units of `epoch` already consumed: micro-batches, or PPO experience batches
    samples_seen: int = 0
    tokens_seen: int = 0
    run_id: str | None = None
    fingerprint: dict[str, Any] = field(default_factory=dict)  # what a resume must match

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LoopState:
        data = dict(data)
        if "micro_in_epoch" in data:  # checkpoints written before the driver named it `position`
            data.setdefault("position", data.pop("micro_in_epoch"))
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)


# ---------------------------------------------------------------------------
# The step driver: what every stage's loop shares


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
    final_checkpoint: bool = True  # off: the run ends with its export only (nothing to extend it from)
    group_by_length: bool = False  # supervised stages: length_grouped_order instead of epoch_order
    tokens_per_micro_batch: int = 0  # > 0: micro-batches cut by padded tokens (token_budget_batches), not rows
    rows_per_sample: int = 1  # forward rows per sample (2 for pairs): what a token budget counts
    pad_multiple: int = 1  # data.pad_to_multiple_of: the collator's rounding, which a token budget counts too
    flops_per_token: float = 0.0  # 6N; gives perf/model_tflops_per_s per device
    peak_tflops: float = 0.0  # gives perf/mfu
    # Stop on a non-finite gradient norm (check_grad_norm) where DeepSpeed does not skip such steps itself:
    # bf16 without deepspeed.check_grad_overflow (fp16's loss scaler and fp32's norm test do skip them).
    guard_grad_norm: bool = False

    @classmethod
    def from_config(cls, cfg: Config) -> LoopSettings:
        t = cfg.train
        return cls(epochs=t.epochs, max_steps=t.max_steps, micro_batch=t.per_device_batch_size,
                   grad_accum=t.grad_accum, seed=t.seed, log_every=t.log_every, eval_every=t.eval_every,
                   save_every=t.save_every, save_every_minutes=t.save_every_minutes, keep_last=t.keep_last,
                   final_checkpoint=t.final_checkpoint, peak_tflops=t.peak_tflops,
                   group_by_length=cfg.data.group_by_length, tokens_per_micro_batch=t.tokens_per_micro_batch,
                   pad_multiple=cfg.data.pad_to_multiple_of,
                   guard_grad_norm=t.dtype == "bf16" and not cfg.deepspeed.check_grad_overflow)


def drive(*, state: LoopState, total: int, units: Callable[[int], Sequence[Any]], run_unit: Callable[[Any], bool],
          log: Callable[[int], dict[str, str]], evaluate: Callable[[int], None] | None,
          checkpoint: Callable[[], None], settings: LoopSettings, stop: StopRequest | None,
          world: World, desc: str) -> LoopState:
    """Run units of work until `total` steps; every stage's loop is this one.

    `units(epoch)` lists this rank's units of an epoch in order (micro-batches of sample indices, or
    PPO experience batches of prompt indices); `run_unit(unit)` does one and says whether it ended a
    step (an accumulation boundary; every PPO experience batch). The driver owns the position
    (epoch, units consumed, steps), the log and eval cadence, the stop that all ranks agree on, and
    when to checkpoint; `log(step)` returns the progress-bar postfix.
    """
    s = settings
    progress = tqdm(total=total, initial=state.step, desc=desc, disable=not world.is_main, dynamic_ncols=True)
    last_save = time.monotonic()
    while state.step < total:
        for unit in units(state.epoch)[state.position:]:
            ended_step = run_unit(unit)
            state.position += 1
            if not ended_step:
                continue
            state.step += 1
            progress.update(1)
            if state.step % s.log_every == 0 or state.step == total:
                progress.set_postfix(log(state.step))
            if evaluate and s.eval_every and state.step % s.eval_every == 0 and state.step < total:
                evaluate(state.step)
            if state.step >= total:
                break
            stopping = stop is not None and stop.agreed()
            if stopping or checkpoint_due(state.step, s.save_every, s.save_every_minutes,
                                          time.monotonic() - last_save):
                checkpoint()
                last_save = time.monotonic()
            if stopping:
                progress.close()
                raise Preempted(f"stopped by {stop.reason()} at step {state.step}")
        else:
            state.epoch += 1
            state.position = 0
            continue
        break
    progress.close()
    if evaluate:
        evaluate(state.step)
    if s.final_checkpoint:
        checkpoint()
    return state


# ---------------------------------------------------------------------------
# The supervised loop (SFT, reward): micro-batches through one engine


def total_steps(train_data, world_size: int, s: LoopSettings, lengths: Sequence[int] | None = None) -> int:
    """Optimizer steps of the run: whole steps per epoch, times the epochs, capped by max_steps. With a
    token budget each epoch's plan has its own length, so every epoch's plan is counted (from
    `lengths` when the caller has them, else read from the data)."""
    if s.tokens_per_micro_batch:
        lengths = sample_lengths(train_data) if lengths is None else lengths
        rows = rows_per_sample(train_data)
        plans = (token_budget_batches(lengths, s.tokens_per_micro_batch, s.seed, epoch, rows=rows,
                                      multiple=s.pad_multiple) for epoch in range(s.epochs))
        total = 0
        for plan in plans:
            total += len(plan) // (world_size * s.grad_accum)
            if 0 < s.max_steps <= total:
                break
    else:
        total = micro_batches_per_rank(len(train_data), world_size, s.micro_batch, s.grad_accum) // s.grad_accum
        total *= s.epochs
    return min(total, s.max_steps) if s.max_steps > 0 else total


class MetricWindow:
    """Sums over the micro-batches since the last log. Tensors stay on the device, so a step never
    waits for the GPU; `reduce()` moves everything across ranks and to the host in one transfer."""

    def __init__(self, device: torch.device):
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, Any] = {}
        self.micro = self.samples = self.tokens = self.steps = 0
        self.norm_sum: Any = 0.0
        self.started = time.monotonic()

    @staticmethod
    def _summable(v: Any) -> Any:
        """A device tensor stays on the device (no sync); anything else becomes a float."""
        return v.detach().float() if torch.is_tensor(v) else float(v)

    def add_step(self, norm: Any) -> None:
        """One optimizer step's global gradient norm (a device tensor under ZeRO: no sync here)."""
        if norm is not None:
            self.norm_sum = self.norm_sum + self._summable(norm)
            self.steps += 1

    def add(self, metrics: dict[str, Any], samples: int, tokens: int) -> None:
        for k, v in metrics.items():
            self.sums[k] = self.sums.get(k, 0.0) + self._summable(v)
        self.micro += 1
        self.samples += samples
        self.tokens += tokens

    def reduce(self) -> tuple[dict[str, float], float, float, float]:
        """(mean of each metric per micro-batch, and `grad_norm` per optimizer step, samples, tokens,
        seconds) over all ranks. Collective."""
        keys = sorted(self.sums)
        sums = dist.all_reduce_sum([self.micro, self.samples, self.tokens, self.steps, self.norm_sum]
                                   + [self.sums[k] for k in keys])
        elapsed = max(1e-9, time.monotonic() - self.started)  # after the sync above
        micro, samples, tokens, steps, norm_sum = sums[:5]
        means = {k: v / max(micro, 1.0) for k, v in zip(keys, sums[5:], strict=True)}
        if steps:  # every rank holds the same global norm: the sum over ranks / steps over ranks is its mean
            means["grad_norm"] = norm_sum / steps
        self.reset()
        return means, samples, tokens, elapsed


def check_grad_norm(norm: float | None, step: int) -> None:
    """A run whose gradient norm is inf or NaN has diverged (its weights are no longer finite, or are
    about to be): stop it in one line instead of training on. The norm is the one DeepSpeed computes
    for clipping anyway, read at the log, so no step waits for the host; the last checkpoint is kept."""
    if norm is not None and not math.isfinite(norm):
        raise ForgeError(f"the gradient norm is {norm} in the steps up to {step}: training diverged (inf/NaN); "
                         f"resume from the last checkpoint with a lower {label('train.lr')}, or with "
                         f"{label('deepspeed.check_grad_overflow')} (bf16: DeepSpeed then skips such steps)")


def throughput(samples: float, tokens: float, elapsed: float, world_size: int, s: LoopSettings) -> dict[str, float]:
    """Samples/s and real tokens/s over all ranks; model TFLOP/s per device and MFU when known."""
    out = {"perf/samples_per_s": samples / elapsed, "perf/tokens_per_s": tokens / elapsed}
    if s.flops_per_token:
        out["perf/model_tflops_per_s"] = s.flops_per_token * tokens / elapsed / world_size / 1e12
        if s.peak_tflops:
            out["perf/mfu"] = out["perf/model_tflops_per_s"] / s.peak_tflops
    return out


def train_loop(
    *,
    engine,
    train_data,
    collate: Callable[[list[dict]], dict[str, torch.Tensor]],
    loss_fn: Callable[[Any, dict[str, torch.Tensor]], tuple[torch.Tensor, dict[str, Any]]],
    evaluate: Callable[[Any], dict[str, float]] | None,
    settings: LoopSettings,
    world: World,
    tracker: Tracker,
    output_dir: str,
    state: LoopState,
    stop: StopRequest | None = None,
    count_tokens: Callable[[dict[str, torch.Tensor]], int] = lambda b: int(b["attention_mask"].sum()),
) -> LoopState:
    """Run (or continue) supervised training until `total_steps`; returns the final state. One unit
    is a micro-batch: collated and its real tokens counted on the host, then copied to the device,
    forward, backward, and DeepSpeed steps at the accumulation boundary."""
    s = settings
    lengths = sample_lengths(train_data) if s.group_by_length or s.tokens_per_micro_batch else None
    s.rows_per_sample = rows_per_sample(train_data)
    steps_total = total_steps(train_data, world.world_size, s, lengths)  # > 0: RunRecord.build_engine checked
    device = engine.device
    window = MetricWindow(device)

    def units(epoch: int) -> list[list[int]]:
        return epoch_micro_batches(len(train_data), lengths, s, world, epoch)

    def run_unit(indices: list[int]) -> bool:
        batch = collate([train_data[i] for i in indices])
        tokens = count_tokens(batch)  # on the host, before the copy
        batch = to_device(batch, device)
        boundary = engine.is_gradient_accumulation_boundary()
        loss, metrics = loss_fn(engine, batch)
        engine.backward(loss)
        engine.step()
        window.add({"loss": loss, **metrics}, len(indices), tokens)
        if boundary:
            window.add_step(engine.get_global_grad_norm())  # None when DeepSpeed computed none
        return boundary

    def log(step: int) -> dict[str, str]:
        means, samples, tokens, elapsed = window.reduce()
        if s.guard_grad_norm:
            check_grad_norm(means.get("grad_norm"), step)
        record = {f"train/{k}": v for k, v in means.items()}
        record["train/lr"] = engine.get_lr()[0]
        record.update(throughput(samples, tokens, elapsed, world.world_size, s))
        record.update(memory_metrics())
        state.samples_seen += int(samples)
        state.tokens_seen += int(tokens)
        tracker.log_metrics(record, step=step)
        return {"loss": f"{record['train/loss']:.4f}", "lr": f"{record['train/lr']:.2e}"}

    def evaluate_and_log(step: int) -> None:
        tracker.log_metrics(evaluate(engine), step=step)
        engine.train()  # evaluation leaves the model in eval mode

    engine.train()  # once, not per micro-batch: only an evaluation changes the mode
    return drive(state=state, total=steps_total, units=units, run_unit=run_unit, log=log,
                 evaluate=evaluate_and_log if evaluate else None,
                 checkpoint=lambda: save_checkpoint({"model": engine}, output_dir, f"step-{state.step:08d}",
                                                    state.to_dict(), s.keep_last),
                 settings=s, stop=stop, world=world, desc="train")

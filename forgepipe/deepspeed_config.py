"""The DeepSpeed JSON for a run, and the checks that refuse impossible setups before launch.

Two kinds of checks:
- `validate_static(cfg)`: needs only the config; `config.validate()` calls it (after the generic
  bounds of every field, which live beside the fields in config.py).
- `validate_launch(cfg, world, has_gpu=...)`: needs the launcher's World (ranks per node come from the
  launcher, never from torch.cuda.device_count()) and whether GPUs are present.

Offload policy (`--offload cpu`): the optimizer state moves to CPU for ZeRO stages 1-3 (DeepSpeed then
picks DeepSpeedCPUAdam itself unless `torch_adam` is set); at stage 3 the parameters move too. Stage 0
has nothing to offload and is refused.

ZeRO++ (`--zeropp`, or the individual switches) is a ZeRO-3 feature in DeepSpeed 0.19.8: qwZ
(`zero_quantized_weights`) and hpZ (`zero_hpz_partition_size`) act on stage-3 parameter partitioning,
and qgZ (`zero_quantized_gradients`) is only wired into the stage-3 optimizer (engine.py passes the
all-to-all group to DeepSpeedZeroOptimizer_Stage3 alone), so at stage 1/2 it would be silently ignored.
qwZ/qgZ need DeepSpeed's quantizer kernels, which the CPU accelerator does not build.

qgZ's communication dtype: stage3.py's __avg_scatter_grads casts the gradients to the engine's
`communication_data_type` (default: the training dtype) and, with more than one node, hands them to
all_to_all_quant_reduce, whose `swizzle_quant` (ops/csrc/quantization/pt_binding.cpp) reads the buffer
as `__half` without a dtype check. bf16 (or fp32) bits read as fp16 are finite garbage (1e-4 becomes
~0.6): training silently goes wrong. So whenever the JSON turns qgZ on, it also sets the top-level
`communication_data_type` to fp16 (the gradients are quantized to 4 bits right after, so fp16's
narrower range costs nothing qgZ has not already given up; a gradient beyond 65504 becomes inf, which
the gradient-norm guard catches). qwZ needs nothing: partition_parameters.py's CUDAQuantizer.quantize
converts the parameter to torch.half itself before calling the kernel, and every dequantize caller
casts back to the parameter's own dtype (checked in DeepSpeed 0.19.8).

`--zero-stage auto` (the default): the lowest stage at which the run's models' parameters, gradients
and optimizer state per rank take at most AUTO_MEMORY_FRACTION of a device (`choose_zero_stage`);
preflight.resolve_zero_stage applies it at launch, once the world, the models and the device are
known, and records the result in `deepspeed.zero_stage_resolved` (PPO: `ppo.*_zero_stage_resolved`),
which is what the JSON is built from. ZeRO++ makes auto 3, `--offload cpu` at least 1.

The optimizer lives in the JSON (AdamW, `torch_adam` as configured); the learning-rate schedule does
not: the training loop owns warm-up and cosine decay.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from forgepipe.errors import ForgeError
from forgepipe.layout import PROFILE_FILE
from forgepipe.options import label

if TYPE_CHECKING:  # config.py calls validate_static: the types alone come from there
    from forgepipe.config import Config, DeepSpeedConfig
    from forgepipe.distributed import World

log = logging.getLogger(__name__)

# The loop logs progress itself; keep DeepSpeed's own step printing out of the way.
STEPS_PER_PRINT = 1_000_000_000

ZEROPP_KEYS = ("zero_quantized_weights", "zero_hpz_partition_size", "zero_quantized_gradients")
# The only dtype qgZ's swizzle_quant kernel reads correctly (see the module docstring).
QGZ_COMMUNICATION_DTYPE = "fp16"


# ---------------------------------------------------------------------------
# What the switches mean




def quantized_weights(ds: DeepSpeedConfig) -> bool:
    """qwZ: explicit setting, else follows --zeropp."""
    return ds.zeropp if ds.quantized_weights is None else ds.quantized_weights


def quantized_gradients(ds: DeepSpeedConfig) -> bool:
    """qgZ: explicit setting, else follows --zeropp."""
    return ds.zeropp if ds.quantized_gradients is None else ds.quantized_gradients


def resolve_hpz_size(ds: DeepSpeedConfig, world: World) -> int:
    """hpZ partition size: as configured; by default one node's ranks when ZeRO++ is on, else 1 (off)."""
    if ds.hpz_size is not None:
        return ds.hpz_size
    return world.local_world_size if ds.zeropp else 1


def _zeropp_requested(ds: DeepSpeedConfig) -> str | None:
    """The config key that asks for a ZeRO++ feature, or None."""
    if ds.zeropp:
        return "deepspeed.zeropp"
    if ds.quantized_weights:
        return "deepspeed.quantized_weights"
    if ds.quantized_gradients:
        return "deepspeed.quantized_gradients"
    if ds.hpz_size is not None and ds.hpz_size > 1:
        return "deepspeed.hpz_size"
    return None


def effective_zero_stage(ds: DeepSpeedConfig) -> int | str:
    """The stage the model runs at: resolved at launch, else as configured ("auto" until resolved)."""
    return ds.zero_stage if ds.zero_stage_resolved is None else ds.zero_stage_resolved


def engine_stages(cfg: Config) -> dict[str, int | str]:
    """The ZeRO stage of each of a run's engines: "model" (the trained one; PPO's actor), "critic",
    and "ref" (the frozen models: DPO's reference, PPO's reference and reward model). Resolved values
    when set, else as configured; PPO's None follows the actor."""
    actor = effective_zero_stage(cfg.deepspeed)
    p = cfg.ppo
    critic = p.critic_zero_stage_resolved if p.critic_zero_stage_resolved is not None else p.critic_zero_stage
    ref = p.ref_zero_stage_resolved if p.ref_zero_stage_resolved is not None else p.ref_zero_stage
    return {"model": actor, "critic": actor if critic is None else critic, "ref": actor if ref is None else ref}


# ---------------------------------------------------------------------------
# --zero-stage auto

# The share of a device's memory that auto lets the models' parameters, gradients and optimizer state
# take. The rest is for what is not known before the first step: activations (they grow with batch and
# sequence length), DeepSpeed's communication buckets and prefetch, the allocator's fragmentation and,
# in PPO, generation's KV cache. 60% of a 64 GiB MI250X GCD leaves ~25 GiB.
AUTO_MEMORY_FRACTION = 0.6
GIB = 1 << 30


class StateBytes(NamedTuple):
    """Bytes per parameter of a trained model's state, split as ZeRO partitions it."""

    param: int
    grad: int
    optim: int  # optimizer state: fp32 master copy (mixed precision) and Adam's two moments

    @property
    def total(self) -> int:
        return self.param + self.grad + self.optim


# A trained bf16/fp16 engine takes stage 1 at least. At stage 0 DeepSpeed 0.19.8 wraps the optimizer in its
# FP16_Optimizer, which tests every gradient tensor for inf/NaN each step (CheckOverflow.has_overflow_serial:
# one host sync per parameter, whatever bf16.check_grad_overflow says; 299 cudaStreamSynchronize a step for
# FORGE-s in bench/gpu_perf.py's profile) and accumulates gradients in bf16. Stage 1 runs ZeRO's optimizer
# (one sync a step, tests/test_step_syncs.py) and, with one rank, holds the same memory as stage 0.
MIXED_PRECISION = ("bf16", "fp16")


def state_bytes(dtype: str) -> StateBytes:
    """bf16/fp16: 2-byte parameters and gradients, 12 bytes of fp32 master + Adam moments (16 in all);
    fp32: 4 + 4 + 8 (16 too). A frozen model holds its parameters only (`param`)."""
    return StateBytes(2, 2, 12) if dtype in ("bf16", "fp16") else StateBytes(4, 4, 8)


def zero_state_bytes(n_params: float, state: StateBytes, stage: int, world_size: int, *, trained: bool = True,
                     offload: bool = False) -> float:
    """Per-rank device bytes of one model's parameters, gradients and optimizer state at `stage`:
    stage 1 partitions the optimizer state over the ranks, 2 also the gradients, 3 also the parameters.
    A frozen model holds parameters only (stages 1-2 are stage 0 for it). With offload the optimizer
    state lives on the host at stages 1-3, and at stage 3 the parameters too."""
    ranks = max(1, world_size)
    param = n_params * state.param
    if stage == 3:
        param = 0.0 if offload else param / ranks
    if not trained:
        return param
    grad = n_params * state.grad / (ranks if stage >= 2 else 1)
    optim = 0.0 if offload and stage >= 1 else n_params * state.optim / (ranks if stage >= 1 else 1)
    return param + grad + optim


class AutoModel(NamedTuple):
    """One model whose stage follows auto: its size, whether it trains, the lowest stage it may take."""

    n_params: float
    trained: bool = True
    minimum: int = 0


def choose_joint_stage(models: list[AutoModel], state: StateBytes, world_size: int, device_bytes: float, *,
                       fixed_bytes: float = 0.0, offload: bool = False) -> int:
    """The lowest stage s such that the `models` (each at max(s, its minimum)) plus `fixed_bytes` (the
    engines at explicit stages) fit AUTO_MEMORY_FRACTION of `device_bytes`; 3 when none does."""
    budget = AUTO_MEMORY_FRACTION * device_bytes
    for stage in (0, 1, 2, 3):
        need = fixed_bytes + sum(zero_state_bytes(m.n_params, state, max(stage, m.minimum), world_size,
                                                  trained=m.trained, offload=offload) for m in models)
        if need <= budget:
            return stage
    return 3


def choose_zero_stage(n_params: float, state: StateBytes, world_size: int, device_bytes: float,
                      trained: bool = True, *, offload: bool = False, minimum: int = 0) -> int:
    """The lowest ZeRO stage (from `minimum`) at which one model's state per rank takes at most
    AUTO_MEMORY_FRACTION of `device_bytes`; 3 when none does. With one rank stages 1-2 save nothing,
    so a model that fits gets 0; a frozen model gets 0 or 3."""
    return max(minimum, choose_joint_stage([AutoModel(n_params, trained, minimum)], state, world_size, device_bytes,
                                           offload=offload))


class ZeroPlan(NamedTuple):
    """What --zero-stage auto resolved to: the stages of engine_stages' engines, and the line that says why."""

    model: int
    critic: int
    ref: int
    line: str
    fits: bool = True


def _billions(n: float) -> str:
    return f"{n / 1e9:.3g}B" if n >= 1e8 else f"{n / 1e6:.3g}M"


def plan_zero_stages(cfg: Config, world: World, counts: dict[str, int | None], device_bytes: float,
                     device: str = "device") -> ZeroPlan | None:
    """Resolve every "auto" stage of the run's engines (None when none is auto), from the parameter
    counts of its models ("model", and "ref", "critic", "reward" where the stage has them; None:
    unknown) and the memory of one rank's device.

    The engines on one device: SFT/reward the model; DPO the policy and, unless it is reference-free,
    shares the policy's weights (LoRA) or is precomputed, the frozen reference; PPO the actor, the
    critic (trained), the reference and the reward model (frozen). The engines whose stage is auto or
    follows an auto one share one stage s (each at least its minimum: 3 for the ZeRO++ actor, 1 for a
    trained engine with --offload cpu), the lowest at which they all fit together beside the engines
    at explicit stages. A LoRA model counts as frozen (adapters and their state are negligible)."""
    ds, p = cfg.deepspeed, cfg.ppo
    state = state_bytes(cfg.train.dtype)
    offload = ds.offload == "cpu"
    # (name, count key, trained, group): group "model" follows the actor's setting, else its own.
    engines = [("model", "model", cfg.model.lora_dim == 0, "model")]
    if cfg.stage == "dpo" and cfg.dpo.loss != "simpo" and not cfg.dpo.precompute_ref \
            and (cfg.dpo.ref_model or cfg.model.lora_dim == 0):
        engines.append(("ref", "ref" if cfg.dpo.ref_model else "model", False, "model"))
    settings: dict[str, Any] = {"model": ds.zero_stage}  # group -> its setting (None: follows "model")
    if cfg.stage == "ppo":
        settings |= {k: v for k, v in (("critic", p.critic_zero_stage), ("ref", p.ref_zero_stage)) if v is not None}
        engines += [("critic", "critic", p.critic_lora_dim == 0, "critic" if "critic" in settings else "model"),
                    ("ref", "model", False, "ref" if "ref" in settings else "model"),
                    ("reward", "reward", False, "ref" if "ref" in settings else "model")]
    auto_groups = {g for g, v in settings.items() if v == "auto"}
    if not auto_groups:
        return None
    minimum = {g: 0 for g in settings}
    for name, _, trained, group in engines:
        if offload and trained:
            minimum[group] = max(minimum[group], 1)
        if cfg.train.dtype in MIXED_PRECISION and name in ("model", "critic"):  # the engines with an optimizer
            minimum[group] = max(minimum[group], 1)
    if _zeropp_requested(ds):
        minimum["model"] = 3
    fixed = {g: v for g, v in settings.items() if v != "auto"}
    auto_models, fixed_bytes, unknown = [], 0.0, []
    for name, key, trained, group in engines:
        n = counts.get(key)
        if n is None:
            unknown.append(name)
            continue
        if group in auto_groups:
            auto_models.append(AutoModel(n, trained, minimum[group]))
        else:
            fixed_bytes += zero_state_bytes(n, state, fixed[group], world.world_size, trained=trained, offload=offload)
    if unknown:
        stage = 3  # the most partitioned: what the default was before auto
    else:
        stage = choose_joint_stage(auto_models, state, world.world_size, device_bytes,
                                   fixed_bytes=fixed_bytes, offload=offload)
    resolved = {g: (max(stage, minimum[g]) if g in auto_groups else fixed[g]) for g in settings}
    if "ref" in auto_groups and resolved["ref"] in (1, 2):
        resolved["ref"] = 0  # frozen models: stages 1-2 partition nothing they hold
    need = sum(zero_state_bytes(counts[key], state, resolved[group], world.world_size, trained=trained,
                                offload=offload) for _, key, trained, group in engines if counts.get(key) is not None)
    fits = not unknown and need <= AUTO_MEMORY_FRACTION * device_bytes
    plan_stages = {"model": resolved["model"], "critic": resolved.get("critic", resolved["model"]),
                   "ref": resolved.get("ref", resolved["model"])}
    line = _plan_line(cfg, engines, counts, plan_stages, auto_groups, state, world, device_bytes, device, unknown)
    return ZeroPlan(plan_stages["model"], plan_stages["critic"], plan_stages["ref"], line, fits)


def _plan_line(cfg, engines, counts, stages, auto_groups, state, world, device_bytes, device, unknown) -> str:
    """`zero stage: auto -> 2 (1.3B params, 16 B/param, 8 ranks, 64 GiB/device)`, and PPO's other engines."""
    head = f"zero stage: {cfg.deepspeed.zero_stage} -> {stages['model']}"
    if "model" not in auto_groups:
        head = f"zero stage: {stages['model']}"
    if unknown:
        return (f"{head} (parameter count of {', '.join(unknown)} unknown: not a local model directory; "
                "auto takes the most partitioned stage)")
    if len(engines) == 1:
        trained = engines[0][2]
        size = f"{_billions(counts['model'])} params, {state.total if trained else state.param} B/param"
        if not trained:
            size += " (LoRA: the base is frozen)"
    else:
        size = ", ".join(f"{name} {_billions(counts[key])}" for name, key, _, _ in engines)
        size += f" params, {state.total} B/param trained, {state.param} frozen"
    line = f"{head} ({size}, {world.world_size} ranks, {device_bytes / GIB:.3g} GiB/{device})"
    extra = [f"{name} {'auto -> ' if name in auto_groups else ''}{stages[name]}" for name in ("critic", "ref")
             if cfg.stage == "ppo"]
    return line + (f"; {', '.join(extra)}" if extra else "")


# ---------------------------------------------------------------------------
# Checks


def validate_static(cfg: Config) -> None:
    """Refuse DeepSpeed settings that cannot work whatever the launcher. One-line ForgeError."""
    ds = cfg.deepspeed
    zero = label("deepspeed.zero_stage")
    key = _zeropp_requested(ds)
    if key and ds.zero_stage not in (3, "auto"):  # auto resolves to 3
        raise ForgeError(f"ZeRO++ (qwZ/hpZ/qgZ) works only with {zero} 3 in DeepSpeed, got {zero} {ds.zero_stage}",
                         key=key)
    if ds.offload == "cpu" and ds.zero_stage == 0:  # auto resolves to 1 or more
        raise ForgeError(f"{label('deepspeed.offload')} cpu: needs {zero} 1, 2 or 3 "
                         "(stage 0 has no optimizer state to offload)")
    if cfg.stage == "ppo":
        critic_stage = ds.zero_stage if cfg.ppo.critic_zero_stage is None else cfg.ppo.critic_zero_stage
        if ds.offload == "cpu" and critic_stage == 0:
            raise ForgeError(f"{label('deepspeed.offload')} cpu: needs {label('ppo.critic_zero_stage')} 1, 2 or 3 "
                             "(the critic trains with ZeRO too)")


def validate_launch(cfg: Config, world: World, *, has_gpu: bool) -> None:
    """Refuse settings that the launched world or the hardware cannot run. One-line ForgeError."""
    ds = cfg.deepspeed
    if world.world_size < 1 or world.local_world_size < 1:
        raise ForgeError(f"launcher: bad world (world size {world.world_size}, ranks per node {world.local_world_size})")
    if world.world_size % world.local_world_size:
        raise ForgeError(
            f"launcher: {world.world_size} ranks do not fill nodes of {world.local_world_size} ranks each; "
            "use the same number of ranks on every node"
        )
    hpz = resolve_hpz_size(ds, world)
    # hpZ's secondary copy must stay inside a node; as nodes are full, dividing the node divides the world.
    if effective_zero_stage(ds) in (3, "auto") and hpz > 1 and world.local_world_size % hpz:  # hpZ: auto is 3
        raise ForgeError(f"{hpz} must divide ranks per node ({world.local_world_size}) and the world size",
                         key="deepspeed.hpz_size")
    if not has_gpu and (quantized_weights(ds) or quantized_gradients(ds)):
        # DeepSpeed's CPU accelerator has no QuantizerBuilder.
        key = "deepspeed.zeropp" if ds.zeropp else _zeropp_requested(ds)
        raise ForgeError(
            "ZeRO++ quantized weights/gradients (qwZ/qgZ) are not implemented on the CPU backend; "
            f"run on GPUs or turn off {label('deepspeed.zeropp')} / use {label('deepspeed.hpz_size')} only", key=key)


# ---------------------------------------------------------------------------
# The JSON


def _dtype_blocks(dtype: str, check_grad_overflow: bool) -> dict[str, Any]:
    if dtype == "bf16":
        return {"bf16": {"enabled": True, "check_grad_overflow": check_grad_overflow}}
    if dtype == "fp16":
        # loss_scale 0 means dynamic loss scaling.
        return {
            "fp16": {
                "enabled": True,
                "loss_scale": 0,
                "loss_scale_window": 1000,
                "initial_scale_power": 16,
                "hysteresis": 2,
                "min_loss_scale": 1,
            }
        }
    return {}


def _zero_block(
    ds: DeepSpeedConfig, world: World, *, stage: int, offload: str, train: bool, zeropp: bool
) -> dict[str, Any]:
    zero: dict[str, Any] = {"stage": stage}
    if stage == 0:
        return zero
    zero.update(
        # One rank has no communication to overlap, and DeepSpeed's overlap path then only adds a stream
        # synchronisation at the end of every backward.
        overlap_comm=ds.overlap_comm and world.world_size > 1,
        contiguous_gradients=ds.contiguous_gradients,
        reduce_scatter=True,  # qgZ asserts it; it is DeepSpeed's default anyway
        reduce_bucket_size=ds.reduce_bucket_size,
    )
    if stage in (1, 2):
        zero["allgather_bucket_size"] = ds.allgather_bucket_size
    if offload == "cpu" and train:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if stage == 3:
        zero.update(
            stage3_param_persistence_threshold=ds.param_persistence_threshold,
            stage3_max_live_parameters=ds.max_live_parameters,
            stage3_prefetch_bucket_size=ds.prefetch_bucket_size,
        )
        if offload == "cpu":
            zero["offload_param"] = {"device": "cpu", "pin_memory": True}
        if zeropp:
            if quantized_weights(ds):
                zero["zero_quantized_weights"] = True
            hpz = resolve_hpz_size(ds, world)
            if hpz > 1:
                zero["zero_hpz_partition_size"] = hpz
            if train and quantized_gradients(ds):
                zero["zero_quantized_gradients"] = True
    return zero


def _optimizer_block(cfg: Config, lr: float | None) -> dict[str, Any]:
    """AdamW: DeepSpeed's fused GPU kernel (or host Adam with offload) unless `torch_adam` (CPU/CI)."""
    return {"type": "AdamW", "params": {"lr": cfg.train.lr if lr is None else lr,
                                        "weight_decay": cfg.train.weight_decay,
                                        "torch_adam": cfg.deepspeed.torch_adam}}


def _profiler_block(cfg: Config) -> dict[str, Any]:
    return {
        "enabled": True,
        "profile_step": cfg.deepspeed.profile_step,
        "module_depth": -1,
        "top_modules": 1,
        "detailed": False,
        # Into the output directory (logged to MLflow at the end), not the job's stdout.
        "output_file": str(Path(cfg.output_dir) / PROFILE_FILE) if cfg.output_dir else None,
    }


def build_ds_config(
    cfg: Config,
    world: World,
    *,
    zero_stage: int | None = None,
    zeropp: bool = True,
    offload: str | None = None,
    train: bool = True,
    lr: float | None = None,
) -> dict[str, Any]:
    """The DeepSpeed JSON for one engine.

    zero_stage / offload / lr override the config (PPO's critic and reference models).
    zeropp=False leaves ZeRO++ out entirely: DeepSpeed keeps hpZ's process group as one global per
    process, so a second ZeRO-3 engine with hpZ fails ("ZeRO parameter intra parallel group is already
    initialized", DeepSpeed issues 4901/7066). train=False: a frozen model (no optimizer, no gradient
    keys); stages 1-2 mean nothing without an optimizer and become stage 0, stage 3 stays (ZeRO-3
    inference), and offload moves only stage-3 parameters.
    """
    ds = cfg.deepspeed
    t = cfg.train
    stage = effective_zero_stage(ds) if zero_stage is None else zero_stage
    offload = ds.offload if offload is None else offload
    if stage == "auto":
        raise ForgeError("auto is resolved at launch (preflight.resolve_zero_stage) before the DeepSpeed JSON "
                         "is built", key="deepspeed.zero_stage")
    if stage not in (0, 1, 2, 3):
        raise ForgeError(f"{stage!r} is not one of 0, 1, 2, 3", key="deepspeed.zero_stage")
    if offload not in ("none", "cpu"):
        raise ForgeError(f"{offload!r} is not one of none, cpu", key="deepspeed.offload")
    if not train and stage in (1, 2):
        stage = 0
    if train and offload == "cpu" and stage == 0:
        raise ForgeError(f"{label('deepspeed.offload')} cpu: needs {label('deepspeed.zero_stage')} 1, 2 or 3 "
                         "(stage 0 has no optimizer state to offload)")

    accum = t.grad_accum if train else 1
    zero_block = _zero_block(ds, world, stage=stage, offload=offload, train=train, zeropp=zeropp)
    out: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": t.per_device_batch_size,
        "gradient_accumulation_steps": accum,
        "train_batch_size": t.per_device_batch_size * accum * world.world_size,
        # PPO's loop has no gradient-norm guard (loop.check_grad_norm): it keeps DeepSpeed's check.
        **_dtype_blocks(t.dtype, ds.check_grad_overflow or cfg.stage == "ppo"),
        "zero_optimization": zero_block,
        "steps_per_print": STEPS_PER_PRINT,
        "wall_clock_breakdown": False,
        # DeepSpeed's throughput timer is on by default and synchronises the device at the start of every
        # forward and the end of every step (two host syncs a micro-batch); the loop measures throughput
        # itself, from the host, at log steps only.
        "timers": {"throughput": {"enabled": False}},
    }
    if zero_block.get("zero_quantized_gradients"):
        out["communication_data_type"] = QGZ_COMMUNICATION_DTYPE
        if t.dtype != QGZ_COMMUNICATION_DTYPE:
            log.info("qgZ: gradients are reduced in fp16 (communication_data_type), not %s: DeepSpeed's "
                     "quantizer reads them as fp16 whatever their dtype", t.dtype)
    if train:
        out["gradient_clipping"] = t.grad_clip
        out["optimizer"] = _optimizer_block(cfg, lr)
    if ds.flops_profiler:
        out["flops_profiler"] = _profiler_block(cfg)
    return out


def zeropp_block(ds_json: dict[str, Any]) -> dict[str, Any]:
    """The ZeRO++ keys actually in effect in a built JSON (for logging); empty when ZeRO++ is off."""
    zero = ds_json.get("zero_optimization", {})
    return {k: zero[k] for k in ZEROPP_KEYS if k in zero}

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

The optimizer lives in the JSON (AdamW, `torch_adam` as configured); the learning-rate schedule does
not: the training loop owns warm-up and cosine decay.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

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


# ---------------------------------------------------------------------------
# Checks


def validate_static(cfg: Config) -> None:
    """Refuse DeepSpeed settings that cannot work whatever the launcher. One-line ForgeError."""
    ds = cfg.deepspeed
    zero = label("deepspeed.zero_stage")
    key = _zeropp_requested(ds)
    if key and ds.zero_stage != 3:
        raise ForgeError(f"ZeRO++ (qwZ/hpZ/qgZ) works only with {zero} 3 in DeepSpeed, got {zero} {ds.zero_stage}",
                         key=key)
    if ds.offload == "cpu" and ds.zero_stage < 1:
        raise ForgeError(f"{label('deepspeed.offload')} cpu: needs {zero} 1, 2 or 3 "
                         "(stage 0 has no optimizer state to offload)")
    if cfg.stage == "ppo":
        critic_stage = ds.zero_stage if cfg.ppo.critic_zero_stage is None else cfg.ppo.critic_zero_stage
        if ds.offload == "cpu" and critic_stage < 1:
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
    if ds.zero_stage == 3 and hpz > 1 and world.local_world_size % hpz:
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
        overlap_comm=ds.overlap_comm,
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
    stage = ds.zero_stage if zero_stage is None else zero_stage
    offload = ds.offload if offload is None else offload
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

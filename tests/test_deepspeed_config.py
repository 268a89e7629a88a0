"""The DeepSpeed JSON builder and its checks; one real deepspeed.initialize round per ZeRO stage."""

from __future__ import annotations

import re

import pytest
import torch

from forgepipe.config import Config, build_config, validate
from forgepipe.deepspeed_config import (
    build_ds_config,
    resolve_hpz_size,
    validate_launch,
    validate_static,
    zeropp_block,
)
from forgepipe.distributed import World
from forgepipe.errors import ForgeError

NODE8_X2 = World(rank=0, world_size=16, local_world_size=8)


def make(stage: str = "sft", **deepspeed) -> Config:
    cfg = Config(stage=stage)
    for key, value in deepspeed.items():
        setattr(cfg.deepspeed, key, value)
    return cfg


# ---------------------------------------------------------------------------
# validate_static


@pytest.mark.parametrize(
    ("settings", "option"),
    [
        ({"zeropp": True, "zero_stage": 2}, "--zeropp"),
        ({"quantized_weights": True, "zero_stage": 1}, "--quantized-weights"),
        ({"quantized_gradients": True, "zero_stage": 2}, "--quantized-gradients"),
        ({"hpz_size": 2, "zero_stage": 0}, "--hpz-size"),
        ({"offload": "cpu", "zero_stage": 0}, "--offload"),
    ],
)
def test_validate_static_refuses(settings, option):
    with pytest.raises(ForgeError, match=f"^{option}[: ]") as err:
        validate_static(make(**settings))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        # Bounds live beside the fields (config.bounded) and are checked for every key alike; a key
        # without an option of its own is named by its dotted key (set in YAML or `config show`).
        ({"hpz_size": 0}, "--hpz-size: must be at least 1, got 0"),
        ({"reduce_bucket_size": 0}, "deepspeed.reduce_bucket_size: must be at least 1, got 0"),
        ({"profile_step": 0}, "deepspeed.profile_step: must be at least 1, got 0"),
        ({"prefetch_bucket_size": -1}, "deepspeed.prefetch_bucket_size: must not be negative, got -1"),
    ],
)
def test_deepspeed_bounds_name_the_key(settings, message):
    with pytest.raises(ForgeError, match=f"^{re.escape(message)}$") as err:
        validate(make(**settings))
    assert err.value.key == f"deepspeed.{next(iter(settings))}"


def test_validate_static_ppo_critic_stage_with_offload():
    cfg = make("ppo", offload="cpu", zero_stage=3)
    cfg.ppo.critic_zero_stage = 0
    with pytest.raises(ForgeError, match="^--offload cpu: needs --critic-zero-stage"):
        validate_static(cfg)


@pytest.mark.parametrize(
    "settings",
    [
        {},
        {"zeropp": True},
        {"zeropp": True, "quantized_gradients": False, "hpz_size": 1},
        {"zero_stage": 2, "offload": "cpu"},
        {"zero_stage": 2, "hpz_size": 1, "quantized_weights": False},
        {"zero_stage": 0},
    ],
)
def test_validate_static_accepts(settings):
    validate_static(make(**settings))


def test_config_validate_calls_validate_static():
    with pytest.raises(ForgeError, match="^--zeropp:"):
        build_config("sft", overrides={"deepspeed.zeropp": True, "deepspeed.zero_stage": 2})


# ---------------------------------------------------------------------------
# validate_launch and hpZ


def test_resolve_hpz_size():
    ds = make().deepspeed
    assert resolve_hpz_size(ds, NODE8_X2) == 1  # ZeRO++ off
    ds.zeropp = True
    assert resolve_hpz_size(ds, NODE8_X2) == 8  # one node
    ds.hpz_size = 4
    assert resolve_hpz_size(ds, NODE8_X2) == 4


@pytest.mark.parametrize(("hpz", "ok"), [(1, True), (2, True), (4, True), (8, True), (3, False), (16, False)])
def test_hpz_must_divide_node_and_world(hpz, ok):
    cfg = make(zeropp=True, hpz_size=hpz)
    if ok:
        validate_launch(cfg, NODE8_X2, has_gpu=True)
    else:
        with pytest.raises(ForgeError, match=f"^--hpz-size: {hpz} must divide ranks per node \\(8\\)"):
            validate_launch(cfg, NODE8_X2, has_gpu=True)


def test_hpz_on_small_nodes():
    cfg = make(hpz_size=4)
    with pytest.raises(ForgeError, match=r"^--hpz-size: 4 must divide ranks per node \(2\)"):
        validate_launch(cfg, World(world_size=4, local_world_size=2), has_gpu=True)
    validate_launch(cfg, World(world_size=8, local_world_size=4), has_gpu=True)
    with pytest.raises(ForgeError, match=r"^--hpz-size: 2 must divide ranks per node \(1\)"):
        validate_launch(make(hpz_size=2), World(), has_gpu=False)


def test_uneven_nodes_refused():
    with pytest.raises(ForgeError, match="^launcher: 12 ranks do not fill nodes of 8"):
        validate_launch(make(), World(world_size=12, local_world_size=8), has_gpu=True)


def test_quantization_needs_gpu():
    with pytest.raises(ForgeError, match="^--zeropp: .*not implemented on the CPU backend"):
        validate_launch(make(zeropp=True, hpz_size=1), World(), has_gpu=False)
    with pytest.raises(ForgeError, match="^--quantized-gradients: "):
        validate_launch(make(quantized_gradients=True), World(), has_gpu=False)
    # hpZ alone runs on CPU.
    validate_launch(make(zeropp=True, quantized_weights=False, quantized_gradients=False, hpz_size=2),
                    World(world_size=2, local_world_size=2), has_gpu=False)


def test_the_hybrid_engine_is_gone():
    """Refused everywhere, it was a flag, a field, a JSON block and checks for nothing: removed."""
    from forgepipe.config import PPOConfig

    assert "hybrid_engine" not in PPOConfig.__dataclass_fields__
    cfg = build_config("ppo", overrides={"deepspeed.zero_stage": 3})
    assert "hybrid_engine" not in build_ds_config(cfg, World())


def test_batch_arithmetic_and_basics():
    cfg = make(zero_stage=2)
    cfg.train.per_device_batch_size, cfg.train.grad_accum, cfg.train.grad_clip = 4, 3, 0.5
    js = build_ds_config(cfg, NODE8_X2)
    assert js["train_micro_batch_size_per_gpu"] == 4
    assert js["gradient_accumulation_steps"] == 3
    assert js["train_batch_size"] == 4 * 3 * 16 == 192
    assert js["gradient_clipping"] == 0.5
    # bf16 without DeepSpeed's per-parameter overflow check: the loop's gradient-norm guard stops divergence
    assert js["bf16"] == {"enabled": True, "check_grad_overflow": False} and "fp16" not in js
    cfg.deepspeed.check_grad_overflow = True
    assert build_ds_config(cfg, NODE8_X2)["bf16"]["check_grad_overflow"] is True
    assert js["wall_clock_breakdown"] is False and js["steps_per_print"] >= 10**6
    assert "scheduler" not in js and "flops_profiler" not in js
    cfg.deepspeed.check_grad_overflow = False
    zero = js["zero_optimization"]
    assert zero["stage"] == 2 and zero["allgather_bucket_size"] == 500_000_000
    assert "stage3_max_live_parameters" not in zero and "offload_optimizer" not in zero
    assert js["optimizer"] == {"type": "AdamW", "params": {"lr": 1e-5, "weight_decay": 0.0, "torch_adam": False}}


def test_fp16_has_dynamic_loss_scaling_and_fp32_has_neither():
    cfg = make()
    cfg.train.dtype = "fp16"
    js = build_ds_config(cfg, World())
    assert js["fp16"]["enabled"] and js["fp16"]["loss_scale"] == 0 and "bf16" not in js
    cfg.train.dtype = "fp32"
    js = build_ds_config(cfg, World())
    assert "fp16" not in js and "bf16" not in js


def test_stage3_zeropp_keys():
    cfg = make(zeropp=True, param_persistence_threshold=7, max_live_parameters=8, prefetch_bucket_size=9)
    js = build_ds_config(cfg, NODE8_X2)
    zero = js["zero_optimization"]
    assert (zero["stage3_param_persistence_threshold"], zero["stage3_max_live_parameters"],
            zero["stage3_prefetch_bucket_size"]) == (7, 8, 9)
    assert zeropp_block(js) == {
        "zero_quantized_weights": True,
        "zero_hpz_partition_size": 8,
        "zero_quantized_gradients": True,
    }


def test_zeropp_false_strips_zeropp():
    cfg = make(zeropp=True)
    js = build_ds_config(cfg, NODE8_X2, zeropp=False)
    assert zeropp_block(js) == {}
    assert js["zero_optimization"]["stage"] == 3


def test_zeropp_only_at_stage3_override():
    # The critic may run at a lower stage than the actor; ZeRO++ keys then do not apply.
    js = build_ds_config(make(zeropp=True), NODE8_X2, zero_stage=2, lr=5e-6)
    assert zeropp_block(js) == {} and js["zero_optimization"]["stage"] == 2
    assert js["optimizer"]["params"]["lr"] == 5e-6


def test_offload_cpu_per_stage():
    cfg = make(offload="cpu", zero_stage=2)
    zero = build_ds_config(cfg, World())["zero_optimization"]
    assert zero["offload_optimizer"] == {"device": "cpu", "pin_memory": True} and "offload_param" not in zero
    zero = build_ds_config(cfg, World(), zero_stage=3)["zero_optimization"]
    assert zero["offload_param"] == {"device": "cpu", "pin_memory": True} and "offload_optimizer" in zero
    with pytest.raises(ForgeError, match="^--offload cpu:"):
        build_ds_config(cfg, World(), zero_stage=0)


def test_inference_config_has_no_optimizer():
    cfg = make(zeropp=True, offload="cpu")
    cfg.train.grad_accum = 4
    js = build_ds_config(cfg, NODE8_X2, train=False, zeropp=True)
    assert "optimizer" not in js and "gradient_clipping" not in js
    assert js["gradient_accumulation_steps"] == 1 and js["train_batch_size"] == 4 * 16
    zero = js["zero_optimization"]
    assert "offload_optimizer" not in zero and zero["offload_param"]["device"] == "cpu"
    assert "zero_quantized_gradients" not in zero and zero["zero_quantized_weights"] is True
    # Stages 1-2 shard optimizer state and gradients only: a frozen model runs at stage 0.
    assert build_ds_config(cfg, World(), zero_stage=2, train=False)["zero_optimization"] == {"stage": 0}


def test_flops_profiler_block():
    js = build_ds_config(make(flops_profiler=True, profile_step=5), World())
    assert js["flops_profiler"] == {"enabled": True, "profile_step": 5, "module_depth": -1, "top_modules": 1,
                                    "detailed": False, "output_file": None}


# ---------------------------------------------------------------------------
# DeepSpeed itself accepts what we build


@pytest.fixture(scope="module")
def one_rank():
    from forgepipe import distributed

    world = distributed.init_distributed(World())
    yield world
    distributed.teardown()


def tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))


@pytest.mark.parametrize(("stage", "dtype", "offload"), [(0, "fp32", "none"), (2, "bf16", "none"),
                                                         (3, "fp32", "none"), (3, "fp32", "cpu")])
def test_deepspeed_initialize_and_step(one_rank, stage, dtype, offload):
    import deepspeed

    cfg = make(zero_stage=stage, torch_adam=True, offload=offload)
    cfg.train.dtype, cfg.train.per_device_batch_size, cfg.train.lr = dtype, 2, 1e-2
    js = build_ds_config(cfg, one_rank)
    model = tiny_model()
    engine, optimizer, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=js)
    assert engine.zero_optimization_stage() == stage
    assert engine.train_batch_size() == 2 and engine.gradient_clipping() == 1.0
    assert isinstance(engine.basic_optimizer, torch.optim.AdamW)  # torch_adam: no JIT-built op
    assert engine.zero_cpu_offload() is (offload == "cpu")
    x = torch.randn(2, 8, dtype=torch.bfloat16 if dtype == "bf16" else torch.float32)
    first = engine(x).float().pow(2).mean()
    engine.backward(first)
    engine.step()
    assert engine.global_steps == 1
    with torch.no_grad():
        second = engine(x).float().pow(2).mean()
    assert second.item() < first.item()  # the step reached the (partitioned) weights


def test_deepspeed_initialize_inference_stage3(one_rank):
    import deepspeed

    cfg = make(zero_stage=3)
    cfg.train.dtype = "fp32"
    js = build_ds_config(cfg, one_rank, train=False)
    engine, optimizer, _, _ = deepspeed.initialize(model=tiny_model(), config=js)
    with torch.no_grad():
        out = engine(torch.randn(3, 8))
    assert out.shape == (3, 1)


def test_deepspeed_reads_our_keys(one_rank):
    """DeepSpeed's own config parser sees the ZeRO++ / stage-3 / fp16 values under the names we write."""
    from deepspeed.runtime.config import DeepSpeedConfig as DSConfig

    cfg = make(zeropp=True, hpz_size=2, param_persistence_threshold=7, max_live_parameters=8, prefetch_bucket_size=9)
    cfg.train.dtype = "fp16"
    parsed = DSConfig(build_ds_config(cfg, one_rank))
    zero = parsed.zero_config
    assert (zero.zero_quantized_weights, zero.zero_quantized_gradients, zero.zero_hpz_partition_size) == (True, True, 2)
    assert (zero.param_persistence_threshold, zero.max_live_parameters, zero.prefetch_bucket_size) == (7, 8, 9)
    assert parsed.float16_config.enabled and parsed.float16_config.loss_scale == 0
    assert not parsed.bfloat16_config.enabled
    assert parsed.optimizer_name == "adamw" and parsed.scheduler_name is None


def test_ppo_keeps_deepspeeds_overflow_check():
    """PPO's loop has no gradient-norm guard: its bf16 engines keep DeepSpeed's check (skips bad steps)."""
    assert build_ds_config(make("ppo", zero_stage=2), NODE8_X2)["bf16"]["check_grad_overflow"] is True


# ---------------------------------------------------------------------------
# qgZ's communication dtype (issue 22): DeepSpeed's swizzle_quant reads the gradients as fp16


@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32"])
def test_quantized_gradients_reduce_in_fp16(dtype):
    cfg = make(zeropp=True, zero_stage=3)
    cfg.train.dtype = dtype
    js = build_ds_config(cfg, NODE8_X2)
    assert js["zero_optimization"]["zero_quantized_gradients"] is True
    assert js["communication_data_type"] == "fp16"
    cfg = make(quantized_gradients=True, zero_stage=3)
    cfg.train.dtype = dtype
    assert build_ds_config(cfg, NODE8_X2)["communication_data_type"] == "fp16"


@pytest.mark.parametrize(
    "settings",
    [{"zero_stage": 3}, {"zeropp": True, "zero_stage": 3, "quantized_gradients": False},
     {"quantized_weights": True, "zero_stage": 3}, {"hpz_size": 8, "zero_stage": 3}],
)
def test_no_quantized_gradients_keeps_deepspeeds_communication_dtype(settings):
    js = build_ds_config(make(**settings), NODE8_X2)
    assert "zero_quantized_gradients" not in js["zero_optimization"] and "communication_data_type" not in js


def test_quantized_gradients_dtype_only_where_qgz_is_on():
    """A frozen engine (no gradients) and engines built without ZeRO++ keep DeepSpeed's default."""
    cfg = make(zeropp=True, zero_stage=3)
    assert "communication_data_type" not in build_ds_config(cfg, NODE8_X2, train=False)
    assert "communication_data_type" not in build_ds_config(cfg, NODE8_X2, zeropp=False)


def test_ppo_engines_quantized_gradients_dtype():
    """PPO: the actor has ZeRO++ (qgZ reduces in fp16), the critic, reference and reward engines none."""
    from forgepipe.stages.ppo.trainer import ppo_ds_configs

    cfg = build_config("ppo", overrides={"deepspeed.zero_stage": 3, "deepspeed.zeropp": True})
    js = ppo_ds_configs(cfg, NODE8_X2)
    assert js["actor"]["communication_data_type"] == "fp16" and js["actor"]["bf16"]["enabled"]
    for name in ("critic", "ref", "reward"):
        assert "communication_data_type" not in js[name] and zeropp_block(js[name]) == {}


def test_deepspeed_reads_the_communication_dtype():
    """DeepSpeed's parser turns our key into torch.float16 in a bf16 run (engine.communication_data_type)."""
    from deepspeed.runtime.config import DeepSpeedConfig as DSConfig

    cfg = make(zeropp=True, zero_stage=3, hpz_size=1)
    parsed = DSConfig(build_ds_config(cfg, World()))
    assert parsed.bfloat16_config.enabled and parsed.communication_data_type == torch.float16
    assert parsed.zero_config.zero_quantized_gradients

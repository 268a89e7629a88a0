"""The DeepSpeed JSON builder and its checks; one real deepspeed.initialize round per ZeRO stage."""

from __future__ import annotations

import re

import pytest
import torch

from forgepipe.config import Config, build_config, validate
from forgepipe.deepspeed_config import (
    AUTO_MEMORY_FRACTION,
    GIB,
    build_ds_config,
    choose_zero_stage,
    plan_zero_stages,
    resolve_hpz_size,
    state_bytes,
    validate_launch,
    validate_static,
    zero_state_bytes,
    zeropp_block,
)
from forgepipe.distributed import World
from forgepipe.errors import ForgeError

NODE8_X2 = World(rank=0, world_size=16, local_world_size=8)


def make(stage: str = "sft", **deepspeed) -> Config:
    """A config with these deepspeed.* settings; zero_stage 3 unless given (auto needs a launch)."""
    deepspeed.setdefault("zero_stage", 3)
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
    assert engine.tput_timer.config.enabled is False  # DeepSpeed's default syncs the device every forward and step
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


# ---------------------------------------------------------------------------
# --zero-stage auto (issue 23): the rule by hand, the plan per stage, the launch, resume

BF16, FP32 = state_bytes("bf16"), state_bytes("fp32")
NODE8 = World(world_size=8, local_world_size=8)


def test_state_bytes_and_per_rank_bytes():
    assert AUTO_MEMORY_FRACTION == 0.6
    assert BF16 == (2, 2, 12) and BF16.total == 16 and FP32.total == 16 and state_bytes("fp16") == BF16
    # 8B params on 8 ranks, bf16: stage 0 = 16 B/param; 1: 2+2 + 12/8; 2: 2 + 14/8; 3: 16/8.
    assert [zero_state_bytes(8e9, BF16, s, 8) / 1e9 for s in (0, 1, 2, 3)] == [128, 44, 30, 16]
    assert zero_state_bytes(8e9, BF16, 2, 8, trained=False) == 16e9  # frozen: parameters only
    assert zero_state_bytes(8e9, BF16, 3, 8, trained=False) == 2e9
    # offload: no optimizer state on the device at 1-3, no parameters at 3
    assert zero_state_bytes(8e9, BF16, 2, 8, offload=True) == 16e9 + 2e9 and zero_state_bytes(8e9, BF16, 3, 8,
                                                                                                offload=True) == 2e9


@pytest.mark.parametrize(
    ("n_params", "state", "ranks", "gib", "trained", "stage"),
    [
        (1.3e9, BF16, 1, 64, True, 0),  # 20.8 GB <= 0.6 x 68.7 GB = 41.2 GB
        (1.3e9, BF16, 8, 64, True, 0),
        (7e9, BF16, 8, 64, True, 1),  # 0: 112 GB; 1: 28 + 84/8 = 38.5 GB
        (8e9, BF16, 8, 64, True, 2),  # 1: 32 + 12 = 44 GB; 2: 16 + 14 = 30 GB
        (13e9, BF16, 8, 64, True, 3),  # 2: 26 + 22.75 = 48.75 GB; 3: 26 GB
        (25.6e9, BF16, 16, 64, True, 3),  # forge-l on two Frontier nodes: 25.6 GB at stage 3
        (1.3e9, FP32, 1, 64, True, 0),  # fp32 is 4 + 4 + 8 = 16 B too
        (13e9, BF16, 1, 64, False, 0),  # frozen: 26 GB of parameters
        (13e9, FP32, 1, 64, False, 3),  # frozen fp32: 52 GB > 41.2 GB
        (25.6e9, BF16, 8, 64, False, 3),  # frozen never takes 1-2: 51.2 GB at 0-2, 6.4 GB at 3
        (1.3e9, BF16, 1, 16, True, 3),  # fits nowhere (10.3 GB budget): the most partitioned stage
        (70e9, BF16, 8, 64, True, 3),  # 140 GB even at stage 3
    ],
)
def test_choose_zero_stage_by_hand(n_params, state, ranks, gib, trained, stage):
    assert choose_zero_stage(n_params, state, ranks, gib * GIB, trained) == stage


def test_choose_zero_stage_minimum_and_offload():
    assert choose_zero_stage(1e6, BF16, 8, 64 * GIB, minimum=3) == 3  # ZeRO++
    assert choose_zero_stage(1e6, BF16, 8, 64 * GIB, offload=True, minimum=1) == 1  # offload needs >= 1
    # 13B on 8 x 64 GiB: stage 3 without offload, stage 2 with (26 + 3.25 GB on the device).
    assert choose_zero_stage(13e9, BF16, 8, 64 * GIB, offload=True, minimum=1) == 2


@pytest.mark.parametrize("n_params", [1e6, 1e9, 2e9, 3e9, 5e9, 1e11])
def test_one_rank_never_picks_stage_1_or_2(n_params):
    assert choose_zero_stage(n_params, BF16, 1, 64 * GIB) in (0, 3)


def plan(stage="sft", counts=None, world=NODE8, gib=64, **settings):
    cfg = make(stage, zero_stage="auto")
    for key, value in settings.items():
        section, name = key.split("__")
        setattr(getattr(cfg, section), name, value)
    return plan_zero_stages(cfg, world, counts or {"model": 1.3e9}, gib * GIB)


def test_plan_line_and_explicit_stages():
    p = plan(counts={"model": 8e9})
    assert p.model == 2 and p.fits
    assert p.line == "zero stage: auto -> 2 (8B params, 16 B/param, 8 ranks, 64 GiB/device)"
    assert plan(counts={"model": 1.3e9}, world=World()).line == \
        "zero stage: auto -> 1 (1.3B params, 16 B/param, 1 ranks, 64 GiB/device)"  # bf16: never 0 (MIXED_PRECISION)
    assert plan(deepspeed__zero_stage=2) is None  # explicit: nothing to resolve
    lora = plan(counts={"model": 13e9}, world=World(), model__lora_dim=8)
    assert lora.model == 1 and "2 B/param (LoRA" in lora.line  # 26 GB of frozen base; the adapters train in bf16


def test_plan_zeropp_and_offload_raise_auto():
    assert plan(deepspeed__zeropp=True).model == 3
    assert plan(deepspeed__hpz_size=8).model == 3
    assert plan(deepspeed__offload="cpu").model == 1
    assert plan(deepspeed__offload="cpu", counts={"model": 13e9}).model == 2


def test_plan_unknown_parameter_count_takes_stage_3():
    p = plan(counts={"model": None})
    assert p.model == 3 and not p.fits and "unknown" in p.line


def test_plan_dpo_counts_the_reference():
    # 1.2B alone fits one 32 GiB device (19.2 GB <= 20.6 GB); with its frozen reference (2.4 GB) it does not.
    one = World()
    assert plan("sft", {"model": 1.2e9}, one, 32).model == 1  # bf16 trains at 1 at least; one rank: 0's memory
    assert plan("sft", {"model": 1.2e9}, one, 32, train__dtype="fp32").model == 0
    assert plan("dpo", {"model": 1.2e9}, one, 32).model == 3
    assert plan("dpo", {"model": 1.2e9}, one, 32, dpo__loss="simpo").model == 1  # reference-free
    assert plan("dpo", {"model": 1.2e9}, one, 32, model__lora_dim=8).model == 1  # reference = adapters off
    assert plan("dpo", {"model": 1.2e9}, one, 32, dpo__precompute_ref=True).model == 1  # freed before training


def test_plan_ppo_engines():
    counts = {"model": 7e9, "critic": 1e9, "reward": 1e9}
    # All four follow the actor: 0: 112+16+14+2 GB; 1: 38.5+5.5+16 = 60 GB; 2: 32+16 = 48 GB; 3: 18 GB.
    p = plan("ppo", counts)
    assert (p.model, p.critic, p.ref) == (3, 3, 3)
    assert p.line.startswith("zero stage: auto -> 3 (model 7B, critic 1B, ref 7B, reward 1B params, "
                             "16 B/param trained, 2 frozen, 8 ranks, 64 GiB/device); critic 3, ref 3")
    small = plan("ppo", {"model": 1.3e9, "critic": 3.5e8, "reward": 3.5e8})
    assert (small.model, small.critic, small.ref) == (1, 1, 1)  # bf16; the frozen engines build at 0 (train=False)
    # Actor and critic at an explicit 2 (32 GB), reference and reward auto: 16 GB at 0 does not fit, 2 GB at 3 does.
    p = plan("ppo", counts, deepspeed__zero_stage=2, ppo__ref_zero_stage="auto")
    assert (p.model, p.critic, p.ref) == (2, 2, 3) and p.line.endswith("critic 2, ref auto -> 3")
    # ZeRO++ makes the actor 3; an auto critic and reference take the lowest stage that fits beside it.
    p = plan("ppo", {"model": 1.3e9, "critic": 3.5e8, "reward": 3.5e8}, deepspeed__zeropp=True,
             ppo__critic_zero_stage="auto", ppo__ref_zero_stage="auto")
    assert (p.model, p.critic, p.ref) == (3, 1, 0)  # the critic trains: bf16 keeps it at 1 at least


def test_auto_in_static_checks_and_the_builder():
    validate_static(make(zero_stage="auto", zeropp=True))  # auto becomes 3
    validate_static(make(zero_stage="auto", offload="cpu"))  # auto becomes >= 1
    cfg = make("ppo", zero_stage="auto", offload="cpu")
    cfg.ppo.critic_zero_stage = "auto"
    validate_static(cfg)
    cfg.ppo.critic_zero_stage = 0
    with pytest.raises(ForgeError, match="^--offload cpu: needs --critic-zero-stage"):
        validate_static(cfg)
    with pytest.raises(ForgeError, match="^--zero-stage: auto is resolved at launch"):
        build_ds_config(make(zero_stage="auto"), World())
    cfg = make(zero_stage="auto", zeropp=True)
    cfg.deepspeed.zero_stage_resolved = 3
    js = build_ds_config(cfg, NODE8_X2)
    assert js["zero_optimization"]["stage"] == 3 and js["communication_data_type"] == "fp16"
    validate_launch(cfg, NODE8_X2, has_gpu=True)


def test_auto_is_the_default_and_an_option():
    from forgepipe.cli import _field, click_type

    assert Config().deepspeed.zero_stage == "auto"
    assert list(click_type(_field("deepspeed.zero_stage")[0]).choices) == ["auto", "0", "1", "2", "3"]
    assert list(click_type(_field("ppo.critic_zero_stage")[0]).choices) == ["auto", "0", "1", "2", "3"]
    cfg = build_config("ppo", overrides={"deepspeed.zero_stage": "2", "ppo.ref_zero_stage": "auto"})
    assert cfg.deepspeed.zero_stage == 2 and cfg.ppo.ref_zero_stage == "auto"


def test_resolve_zero_stage_at_launch(tiny_model, caplog):
    """The launch resolves auto from the model's safetensors headers and the memory (host memory here)."""
    from transformers import AutoModelForCausalLM

    from forgepipe.engine import parameter_count
    from forgepipe.preflight import count_parameters, resolve_zero_stage

    n = count_parameters(str(tiny_model), None)
    assert n == parameter_count(AutoModelForCausalLM.from_pretrained(tiny_model))
    cfg = build_config("sft", overrides={"model.name_or_path": str(tiny_model)})
    with caplog.at_level("INFO", logger="forgepipe.preflight"):
        resolve_zero_stage(cfg, World())
    assert cfg.deepspeed.zero_stage == "auto" and cfg.deepspeed.zero_stage_resolved == 1
    assert re.search(r"zero stage: auto -> 1 \([\d.]+M params, 16 B/param, 1 ranks, [\d.]+ GiB/rank of host memory\)",
                     caplog.text)
    assert cfg.flat()["deepspeed.zero_stage_resolved"] == 1  # logged to MLflow with the config
    assert build_ds_config(cfg, World())["zero_optimization"]["stage"] == 1
    # Explicit stages are recorded as given; PPO's None follows the actor.
    cfg = build_config("ppo", overrides={"deepspeed.zero_stage": 2, "ppo.ref_zero_stage": 3})
    resolve_zero_stage(cfg, World())
    assert (cfg.deepspeed.zero_stage_resolved, cfg.ppo.critic_zero_stage_resolved,
            cfg.ppo.ref_zero_stage_resolved) == (2, 2, 3)


def test_resolve_zero_stage_ppo_engines(tiny_model):
    from forgepipe.preflight import resolve_zero_stage
    from forgepipe.stages.ppo.trainer import ppo_ds_configs

    cfg = build_config("ppo", overrides={"model.name_or_path": str(tiny_model), "ppo.reward_model": str(tiny_model),
                                         "ppo.critic_zero_stage": "auto"})
    resolve_zero_stage(cfg, World())
    js = ppo_ds_configs(cfg, World())
    assert {name: j["zero_optimization"]["stage"] for name, j in js.items()} == \
        {"actor": 1, "critic": 1, "ref": 0, "reward": 0}  # bf16 trains at 1 at least; frozen engines build at 0


def test_resume_compares_the_stages_run():
    from forgepipe.preflight import config_changes, resume_changes

    old = {"deepspeed.zero_stage": 3, "ppo.critic_zero_stage": None}  # written before auto existed
    same = {"deepspeed.zero_stage": "auto", "deepspeed.zero_stage_resolved": 3, "ppo.critic_zero_stage": None,
            "ppo.critic_zero_stage_resolved": 3}
    assert config_changes(old, same) == ({}, {})
    unresolved = {"deepspeed.zero_stage": "auto", "deepspeed.zero_stage_resolved": None}  # preflight
    assert config_changes(old, unresolved) == ({}, {})
    other = {**same, "deepspeed.zero_stage_resolved": 2, "ppo.critic_zero_stage_resolved": 2}
    assert config_changes(old, other)[1]["deepspeed.zero_stage"] == (3, 2)
    with pytest.raises(ForgeError, match=r"^--resume: ckpt was written at ZeRO stage 3, this run has 2; pass "
                                         r"--zero-stage 3 to resume it"):
        resume_changes({"config": old, "world_size": 1}, other, 1, "ckpt")


def test_as_command_leaves_the_resolved_stage_out():
    """A run's config.yaml holds the stage auto resolved to; its command repeats --zero-stage auto (the default)."""
    from forgepipe.runs import command_line

    cfg = build_config("sft", overrides={"model.name_or_path": "forge-s", "output_dir": "/out/a"})
    cfg.deepspeed.zero_stage_resolved = 2
    command, left = command_line("sft", cfg.to_yaml())
    assert "zero-stage" not in command and left == {}

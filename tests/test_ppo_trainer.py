"""PPO trainer: its small pure pieces, and bad input refused with one line before any model loads."""

from __future__ import annotations

import datasets
import pytest
from conftest import SAMPLE_PAIRS

from forgepipe.config import build_config
from forgepipe.data.collate import SFTCollator
from forgepipe.distributed import World
from forgepipe.errors import ForgeError
from forgepipe.models.load import load_tokenizer
from forgepipe.stages.ppo import trainer
from forgepipe.stages.ppo.trainer import (
    check_one_hpz,
    ppo_batch_sizes,
    ptx_stream,
    run_ppo,
    tokenizer_mismatch,
)


def test_tokenizer_mismatch(tiny_model):
    a = load_tokenizer(str(tiny_model))
    b = load_tokenizer(str(tiny_model))
    assert tokenizer_mismatch(a, b) is None
    b.add_special_tokens({"pad_token": "<|pad|>"})  # only the pad token differs: padding is masked
    assert b.pad_token_id != a.pad_token_id
    assert tokenizer_mismatch(a, b) is None
    c = load_tokenizer(str(tiny_model))
    c.add_tokens(["<|new-token|>"])
    assert "vocabularies differ" in tokenizer_mismatch(a, c)
    d = load_tokenizer(str(tiny_model))
    d.eos_token = "<|padding|>"
    assert "eos_token differs" in tokenizer_mismatch(a, d)


def test_hpz_on_one_engine_only():
    one = {"zero_optimization": {"stage": 3, "zero_hpz_partition_size": 8}}
    none = {"zero_optimization": {"stage": 3}}
    check_one_hpz({"actor": one, "critic": none, "ref": none})
    with pytest.raises(ForgeError, match=r"hpZ is configured on 2 engines \(actor, critic\)"):
        check_one_hpz({"actor": one, "critic": one, "ref": none})


def test_ppo_build_gives_zeropp_to_the_actor_only():
    from forgepipe.deepspeed_config import build_ds_config

    cfg = build_config("ppo", overrides={"deepspeed.zero_stage": 3, "deepspeed.hpz_size": 4})
    world = World(world_size=8, local_world_size=8)
    actor = build_ds_config(cfg, world, zeropp=True)
    critic = build_ds_config(cfg, world, zeropp=False, lr=cfg.ppo.critic_lr)
    assert actor["zero_optimization"]["zero_hpz_partition_size"] == 4
    assert "zero_hpz_partition_size" not in critic["zero_optimization"]
    check_one_hpz({"actor": actor, "critic": critic})


@pytest.mark.parametrize(("micro", "accum", "gen", "expected"), [(4, 1, None, (4, 1)), (2, 2, 8, (8, 4)),
                                                                (2, 1, 6, (6, 3))])
def test_ppo_batch_sizes(micro, accum, gen, expected):
    cfg = build_config("ppo", overrides={"train.per_device_batch_size": micro, "train.grad_accum": accum,
                                         "ppo.generation_batch_size": gen})
    assert ppo_batch_sizes(cfg) == expected


@pytest.mark.parametrize(("micro", "accum", "gen"), [(4, 1, 6), (2, 2, 6)])
def test_ppo_batch_sizes_refuse_partial_micro_batches(micro, accum, gen):
    cfg = build_config("ppo", overrides={"train.per_device_batch_size": micro, "train.grad_accum": accum,
                                         "ppo.generation_batch_size": gen})
    with pytest.raises(ForgeError, match="--generation-batch-size"):
        ppo_batch_sizes(cfg)


def test_ptx_stream_is_endless_and_resumable():
    data = datasets.Dataset.from_dict({"input_ids": [[i, i] for i in range(10)], "labels": [[i, i] for i in range(10)]})
    cfg = build_config("ppo", overrides={"train.per_device_batch_size": 2})
    world = World(rank=1, world_size=2, local_world_size=2)
    collate = SFTCollator(pad_token_id=0)
    stream = ptx_stream(data, collate, cfg, world, start=0)
    first = [next(stream)["input_ids"][:, 0].tolist() for _ in range(5)]  # 2 batches/epoch: crosses 2 epochs
    assert all(len(b) == 2 for b in first)
    assert not set(first[0]) & set(first[1])  # an epoch never repeats a sample
    assert first[2:4] != first[0:2]  # the next epoch has its own order
    resumed = ptx_stream(data, collate, cfg, world, start=3)
    assert [next(resumed)["input_ids"][:, 0].tolist() for _ in range(2)] == first[3:5]
    other_rank = ptx_stream(data, collate, cfg, World(rank=0, world_size=2, local_world_size=2), start=0)
    assert not set(next(other_rank)["input_ids"][:, 0].tolist()) & set(first[0])


# ---------------------------------------------------------------------------
# Bad input, in process: the error comes before any model is loaded and leaves no output dir


@pytest.fixture
def no_model_loading(monkeypatch):
    """Fail the test if a bad-input check comes after model loading."""
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the input was refused")

    monkeypatch.setattr(trainer, "load_causal_lm", refuse)
    monkeypatch.setattr(trainer, "load_scalar_model", refuse)


def ppo_cfg(tmp_path, actor, reward, **overrides):
    base = {"model.name_or_path": str(actor), "ppo.reward_model": str(reward), "output_dir": str(tmp_path / "out"),
            "data.sources": [str(SAMPLE_PAIRS)], "train.dtype": "fp32", "deepspeed.torch_adam": True,
            "deepspeed.zero_stage": 0, "tracking.uri": f"sqlite:///{tmp_path}/mlflow.db"}
    return build_config("ppo", overrides={**base, **overrides})


@pytest.fixture(scope="module")
def reward_export(tmp_path_factory, tiny_model):
    """A scalar-head export of the tiny model (what stage 2 writes)."""
    from forgepipe.models.reward_model import load_scalar_model

    out = tmp_path_factory.mktemp("reward") / "model"
    tok = load_tokenizer(str(tiny_model))
    load_scalar_model(str(tiny_model), dtype="fp32", tokenizer=tok).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def test_reward_without_scalar_head_is_refused(tmp_path, tiny_model, no_model_loading):
    with pytest.raises(ForgeError, match=r"^--reward: .* is not a reward model export \(no scalar head\)"):
        run_ppo(ppo_cfg(tmp_path, tiny_model, tiny_model))
    assert not (tmp_path / "out").exists()


def test_incompatible_tokenizers_need_the_opt_in(tmp_path, tiny_model, reward_export, no_model_loading):
    other = tmp_path / "other-reward"
    import shutil

    shutil.copytree(reward_export, other)
    tok = load_tokenizer(str(other))
    tok.add_tokens(["<|extra-1|>", "<|extra-2|>"])
    tok.save_pretrained(other)
    with pytest.raises(ForgeError, match=r"^--reward: the tokenizer of .* does not match the actor's \(vocabularies"):
        run_ppo(ppo_cfg(tmp_path, tiny_model, other))
    assert not (tmp_path / "out").exists()


def test_prompts_over_the_budget_are_refused(tmp_path, tiny_model, reward_export, no_model_loading):
    with pytest.raises(ForgeError, match="--max-prompt-len 2 is shorter than every prompt"):
        run_ppo(ppo_cfg(tmp_path, tiny_model, reward_export, **{"data.max_prompt_len": 2}))


def test_too_few_prompts_for_one_experience_batch(tmp_path, tiny_model, reward_export, no_model_loading):
    with pytest.raises(ForgeError, match="prompts are fewer than one experience batch"):
        run_ppo(ppo_cfg(tmp_path, tiny_model, reward_export, **{"ppo.generation_batch_size": 4096,
                                                                 "train.per_device_batch_size": 4096}))


def test_zero_new_tokens_and_hybrid_engine_are_refused(tmp_path, tiny_model, reward_export):
    with pytest.raises(ForgeError, match="--max-new-tokens: must be at least 1"):
        ppo_cfg(tmp_path, tiny_model, reward_export, **{"ppo.max_new_tokens": 0})
    with pytest.raises(ForgeError, match="unknown config key 'ppo.hybrid_engine'"):  # removed: it never ran
        ppo_cfg(tmp_path, tiny_model, reward_export, **{"ppo.hybrid_engine": True})

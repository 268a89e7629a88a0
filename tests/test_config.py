"""Config resolution: defaults <- YAML <- command line, types, and one-line validation errors."""

from __future__ import annotations

import pytest

from forgepipe.config import Config, build_config, flatten, parse_split
from forgepipe.errors import ForgeError


def test_defaults_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 3.0e-4\n  epochs: 2\ndeepspeed:\n  zero_stage: 2\ndata:\n  sources: [a.jsonl]\n")
    cfg = build_config("sft", path, {"train.lr": "1e-3", "train.epochs": None, "data.sources": ["b.jsonl", "c.jsonl"]})
    assert cfg.train.lr == 1e-3  # command line wins
    assert cfg.train.epochs == 2  # None means "not given": the file's value stays
    assert cfg.deepspeed.zero_stage == 2
    assert cfg.data.sources == ["b.jsonl", "c.jsonl"]
    assert cfg.train.seed == Config().train.seed  # default


def test_flat_keys_are_dotted():
    flat = Config().flat()
    assert flat["deepspeed.zero_stage"] == "auto" and flat["deepspeed.zero_stage_resolved"] is None
    assert "ppo.kl_coef" in flat and "model.lora_dim" in flat
    assert flatten({"a": {"b": 1, "c": {"d": 2}}}) == {"a.b": 1, "a.c.d": 2}


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"deepspeed.zero_stage": "4"}, "--zero-stage: '4' is not one of auto, 0, 1, 2, 3"),
        ({"train.lr": "fast"}, "--lr: expected a number"),
        ({"train.per_device_batch_size": 0}, "--per-device-batch-size: must be at least 1"),
        ({"data.split": "2,4"}, "--data-split"),
        ({"data.split": "1,0,0"}, None),  # sft keeps a share: fine
        ({"train.dtype": "fp8"}, "--dtype: 'fp8' is not one of fp32, bf16, fp16"),
        ({"deepspeed.zeropp": True, "deepspeed.zero_stage": 2}, "--zero-stage"),
    ],
)
def test_bad_values_name_the_option(overrides, message):
    if message is None:
        build_config("sft", None, overrides)
        return
    with pytest.raises(ForgeError, match=message.replace("(", r"\(")) as err:
        build_config("sft", None, overrides)
    assert "\n" not in str(err.value)


def test_split_leaving_stage_no_data():
    with pytest.raises(ForgeError, match="leaves stage reward no data"):
        build_config("reward", None, {"data.split": "5,0,5"})


def test_yaml_errors_name_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lr: [1\n")
    with pytest.raises(ForgeError, match=r"bad.yaml:\d+: invalid YAML"):
        build_config("sft", bad)
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("train:\n  learning_rate: 1\n")
    with pytest.raises(ForgeError, match=r"unknown.yaml: train.: unknown key 'learning_rate'"):
        build_config("sft", unknown)
    with pytest.raises(ForgeError, match="config file not found"):
        build_config("sft", tmp_path / "missing.yaml")


def test_ppo_budget_checks():
    with pytest.raises(ForgeError, match="--max-new-tokens: must be at least 1"):
        build_config("ppo", None, {"ppo.max_new_tokens": 0})
    with pytest.raises(ForgeError, match="exceeds --max-seq-len"):
        build_config("ppo", None, {"data.max_prompt_len": 500, "ppo.max_new_tokens": 100, "data.max_seq_len": 512})


def test_parse_split_normalises():
    assert parse_split("2,4,4") == pytest.approx((0.2, 0.4, 0.4))

"""`forgepipe dpo` and `pipeline --method dpo`: batches, config, bad input, and real runs that learn."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import SAMPLE_DOCS, artifact_json, metric_values, mlflow_run, run_forgepipe
from test_reward import separable_pairs

from forgepipe.config import build_config
from forgepipe.errors import ForgeError
from forgepipe.stages.dpo.reference import REF_CHOSEN, REF_REJECTED
from forgepipe.stages.dpo.trainer import DPOCollator
from forgepipe.stages.pipeline import pipeline_configs

PAD = 1


def test_collator_scores_response_tokens_only():
    # Pair 0: prompt [5, 6], chosen response [7, EOS=0], rejected [8, 9, 0].
    # Pair 1: prompt [5], chosen [7, 0], rejected [0]. Rows: chosen 0, chosen 1, rejected 0, rejected 1.
    features = [{"chosen_input_ids": [5, 6, 7, 0], "rejected_input_ids": [5, 6, 8, 9, 0], "prompt_len": 2,
                 REF_CHOSEN: -1.5, REF_REJECTED: -2.5},
                {"chosen_input_ids": [5, 7, 0], "rejected_input_ids": [5, 0], "prompt_len": 1,
                 REF_CHOSEN: -0.5, REF_REJECTED: -3.0}]
    batch = DPOCollator(PAD)(features)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 0, PAD], [5, 7, 0, PAD, PAD], [5, 6, 8, 9, 0], [5, 0, PAD, PAD, PAD]]
    assert batch["response_mask"].tolist() == [[0, 0, 1, 1, 0], [0, 1, 1, 0, 0], [0, 0, 1, 1, 1], [0, 1, 0, 0, 0]]
    # the positions that predict the scored tokens (the LM head runs there only), filler 0 / -100
    assert batch["predict_positions"].tolist() == [[1, 2, 0], [0, 1, 0], [1, 2, 3], [0, 0, 0]]
    assert batch["predict_labels"].tolist() == [[7, 0, -100], [7, 0, -100], [8, 9, 0], [0, -100, -100]]
    assert batch[REF_CHOSEN].tolist() == [-1.5, -0.5] and batch[REF_REJECTED].tolist() == [-2.5, -3.0]
    assert batch[REF_CHOSEN].dtype == torch.float64


def test_forward_logps_are_the_full_logits_summed_over_the_response(tiny_model):
    """The LM head at the kept positions only gives what all logits give, summed by hand."""
    from transformers import AutoModelForCausalLM

    from forgepipe.stages.dpo.reference import forward_logps

    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    features = [{"chosen_input_ids": [5, 6, 7, 0], "rejected_input_ids": [5, 6, 8, 9, 0], "prompt_len": 2},
                {"chosen_input_ids": [5, 7, 0], "rejected_input_ids": [5, 0], "prompt_len": 1}]
    batch = DPOCollator(PAD, pad_to_multiple_of=4)(features)
    with torch.no_grad():
        summed, tokens = forward_logps(model, batch)
        logp = torch.log_softmax(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, -1)
    expected = [sum(float(logp[r, t - 1, batch["input_ids"][r, t]]) for t in range(batch["input_ids"].shape[1])
                    if batch["response_mask"][r, t]) for r in range(4)]
    assert tokens.tolist() == [2.0, 2.0, 3.0, 1.0]
    assert summed.tolist() == pytest.approx(expected, abs=1e-4)


@pytest.mark.parametrize("overrides, message", [
    ({"dpo.beta": 0}, "--beta: must be positive, got 0"),
    ({"dpo.label_smoothing": 0.5}, "--label-smoothing: must be in [0, 0.5), got 0.5"),
    ({"dpo.loss": "kto"}, "--loss: 'kto' is not one of dpo, ipo, simpo"),
    ({"dpo.loss": "simpo", "dpo.ref_model": "m"}, "--ref: --loss simpo is reference-free"),
    ({"dpo.loss": "simpo", "dpo.precompute_ref": True}, "--precompute-ref: --loss simpo is reference-free"),
    ({"dpo.loss": "ipo", "dpo.label_smoothing": 0.1}, "--label-smoothing: applies to --loss dpo and simpo"),
    ({"data.split": "2,0,8"}, "--data-split: '2,0,8' leaves stage dpo no data"),  # DPO reads the reward share
])
def test_bad_dpo_values_name_the_option(overrides, message):
    with pytest.raises(ForgeError) as err:
        build_config("dpo", None, overrides)
    assert str(err.value) == message or str(err.value).startswith(message), str(err.value)
    assert "\n" not in str(err.value)


def test_dpo_defaults_and_the_reward_share():
    cfg = build_config("dpo", None, {"data.split": "0,1,0"})
    assert (cfg.dpo.loss, cfg.dpo.beta, cfg.dpo.label_smoothing, cfg.dpo.ref_model) == ("dpo", 0.1, 0.0, None)
    build_config("sft", None, {"dpo.beta": 0.5})  # the section exists in every config, only dpo checks it


def test_pipeline_method_dpo_configs(tmp_path):
    configs = pipeline_configs("m", None, str(tmp_path / "pipe"), None, {"dpo.beta": "0.3"}, method="dpo")
    assert list(configs) == ["sft", "dpo"]
    assert configs["dpo"].model.name_or_path == str(tmp_path / "pipe" / "sft")
    assert configs["dpo"].output_dir == str(tmp_path / "pipe" / "dpo") and configs["dpo"].dpo.beta == 0.3
    assert list(pipeline_configs("m", None, str(tmp_path / "p"), None, {})) == ["sft", "reward", "ppo"]
    with pytest.raises(ForgeError, match="--reward-model: not used by --method dpo"):
        pipeline_configs("m", "rm", str(tmp_path / "pipe"), None, {}, method="dpo")
    with pytest.raises(ForgeError, match="--beta: only for --method dpo"):
        pipeline_configs("m", None, str(tmp_path / "p"), None, {"dpo.beta": "0.3", "ppo.kl_coef": None})
    with pytest.raises(ForgeError, match="--kl-coef: only for --method ppo"):
        pipeline_configs("m", None, str(tmp_path / "p"), None, {"ppo.kl_coef": "0.3"}, method="dpo")
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("stages:\n  ppo: {ppo: {kl_coef: 0.2}}\n")
    with pytest.raises(ForgeError, match="unknown stage 'ppo' \\(known for --method dpo: sft, dpo\\)"):
        pipeline_configs("m", None, str(tmp_path / "pipe"), str(yaml_file), {}, method="dpo")


@pytest.mark.parametrize("extra, needle", [
    (["--beta", "0"], "--beta: must be positive, got 0"),
    (["--data", str(SAMPLE_DOCS)], "no chosen/rejected pairs"),
])
def test_dpo_bad_input_is_one_line_and_leaves_nothing(extra, needle, tiny_model, tmp_path):
    out = tmp_path / "out"
    data = [] if "--data" in extra else ["--data", str(separable_pairs(tmp_path / "pairs.jsonl", n=40))]
    proc = run_forgepipe(["dpo", "--model", str(tiny_model), "--output-dir", str(out), "--tracking-uri",
                          f"sqlite:///{tmp_path}/mlflow.db", *data, *extra], timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("forgepipe: error:")]
    assert len(errors) == 1 and needle in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and not out.exists()


def dpo_args(model, data, out, db, *extra):
    return ["dpo", "--model", str(model), "--data", str(data), "--data-split", "0,1,0", "--output-dir", str(out),
            "--tracking-uri", f"sqlite:///{db}", "--dtype", "fp32", "--torch-adam", "--lr", "1e-3", "--beta", "0.5",
            "--eval-fraction", "0.2", *extra]


@pytest.mark.slow
def test_dpo_learns_separable_preferences_zero3_two_ranks(tiny_model, tmp_path):
    from transformers import AutoModelForCausalLM

    data = separable_pairs(tmp_path / "pairs.jsonl")
    out, db = tmp_path / "dpo", tmp_path / "mlflow.db"
    # ZeRO++'s hpZ on the policy (qwZ/qgZ need GPUs); the reference engine beside it has no ZeRO++.
    proc = run_forgepipe(dpo_args(tiny_model, data, out, db, "--zero-stage", "3", "--hpz-size", "2",
                                  "--per-device-batch-size", "4", "--max-steps", "8", "--eval-every", "4"), nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    client, run = mlflow_run(db)
    assert run.data.tags["stage"] == "dpo" and run.data.tags["world_size"] == "2"
    accuracy = metric_values(client, run.info.run_id, "dpo/eval_accuracy")
    assert len(accuracy) == 2 and accuracy[-1] >= 0.9, accuracy
    # Step 1 is one micro-batch per rank before any update: policy = reference, every pair at ln 2.
    assert metric_values(client, run.info.run_id, "dpo/loss")[0] == pytest.approx(math.log(2), abs=1e-5)
    m = run.data.metrics
    assert m["dpo/eval_margin"] > 0 and m["dpo/eval_reward_chosen"] > m["dpo/eval_reward_rejected"]
    assert m["dpo/eval_margin"] == pytest.approx(m["dpo/eval_reward_chosen"] - m["dpo/eval_reward_rejected"])
    assert {"dpo/reward_chosen", "dpo/reward_rejected", "dpo/margin", "dpo/accuracy", "dpo/eval_loss"} <= set(m)
    assert run.data.params["dpo.reference"] == "engine" and int(run.data.params["data.identical_pairs_dropped"]) == 6
    ds_json = artifact_json(client, run.info.run_id, "deepspeed/model.json")["zero_optimization"]
    assert ds_json["zero_hpz_partition_size"] == 2
    assert "zero_hpz_partition_size" not in artifact_json(client, run.info.run_id, "deepspeed/ref.json")["zero_optimization"]
    assert "dpo_eval/generations.json" in [a.path for a in client.list_artifacts(run.info.run_id, "dpo_eval")]
    assert json.loads((out / "model" / "forgepipe.json").read_text())["stage"] == "dpo"
    AutoModelForCausalLM.from_pretrained(out / "model")  # a plain transformers export


@pytest.mark.slow
def test_dpo_lora_reference_is_the_policy_with_adapters_off_precomputed_and_cached(tiny_model, tmp_path):
    data = separable_pairs(tmp_path / "pairs.jsonl", n=80)
    db, cache = tmp_path / "mlflow.db", tmp_path / "cache"
    common = ["--zero-stage", "2", "--per-device-batch-size", "8", "--max-steps", "3", "--lora-dim", "8",
              "--precompute-ref", "--cache-dir", str(cache)]
    first = run_forgepipe(dpo_args(tiny_model, data, tmp_path / "a", db, *common))
    assert first.returncode == 0, first.stderr[-3000:]
    client, run = mlflow_run(db)
    assert run.data.params["dpo.reference"] == "adapters"
    # LoRA starts as the identity (B = 0): the precomputed reference equals the policy, loss ln 2.
    assert metric_values(client, run.info.run_id, "dpo/loss")[0] == pytest.approx(math.log(2), abs=1e-5)
    assert len(list(cache.glob("ref-logps-*.pt"))) == 2  # train and held-out pairs
    second = run_forgepipe(dpo_args(tiny_model, data, tmp_path / "b", db, *common))
    assert second.returncode == 0, second.stderr[-3000:]
    assert second.stderr.count("reference log-probs from the cache") == 2
    _, again = mlflow_run(db)
    assert metric_values(client, again.info.run_id, "dpo/loss") == metric_values(client, run.info.run_id, "dpo/loss")


@pytest.mark.slow
def test_simpo_runs_without_a_reference(tiny_model, tmp_path):
    data = separable_pairs(tmp_path / "pairs.jsonl", n=80)
    out, db = tmp_path / "simpo", tmp_path / "mlflow.db"
    proc = run_forgepipe(dpo_args(tiny_model, data, out, db, "--zero-stage", "0", "--per-device-batch-size", "8",
                                  "--max-steps", "3", "--loss", "simpo", "--beta", "2"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    _, run = mlflow_run(db)
    assert run.data.params["dpo.reference"] == "none" and "deepspeed/ref.json" not in proc.stderr
    assert run.data.metrics["dpo/eval_accuracy"] >= 0.0 and (out / "model" / "model.safetensors").is_file()


@pytest.mark.slow
def test_pipeline_method_dpo_two_ranks_zero3(tiny_model, tmp_path):
    data = separable_pairs(tmp_path / "pairs.jsonl", n=120)
    out, db = tmp_path / "pipe", tmp_path / "mlflow.db"
    proc = run_forgepipe(["pipeline", "--method", "dpo", "--model", str(tiny_model), "--data", str(data),
                          "--data-split", "1,1,0", "--output-dir", str(out), "--tracking-uri", f"sqlite:///{db}",
                          "--dtype", "fp32", "--torch-adam", "--zero-stage", "3", "--per-device-batch-size", "2",
                          "--max-steps", "3", "--precompute-ref"], nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    client, parent = mlflow_run(db, "pipeline tiny-gpt-neox z3 2r")
    assert parent.info.status == "FINISHED" and parent.data.tags["method"] == "dpo"
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    by_stage = {r.data.tags["stage"]: r for r in children}
    assert sorted(by_stage) == ["dpo", "sft"]
    assert by_stage["dpo"].data.params["model.name_or_path"] == str(out / "sft")
    assert by_stage["dpo"].data.params["dpo.precompute_ref"] == "True"
    assert "dpo/eval_accuracy" in by_stage["dpo"].data.metrics
    assert parent.data.tags["dpo_model_dir"] == str((out / "dpo" / "model").resolve())
    assert json.loads((out / "dpo" / "forgepipe-run.json").read_text())["stage"] == "dpo"


@pytest.mark.slow
def test_dpo_resumes_at_another_world_size_to_the_uninterrupted_curve(tiny_model, tmp_path):
    """A finished 2-step run on 2 ranks extended to 4 steps on 1 rank (--max-steps and the world
    size, honoured on resume: DeepSpeed's universal checkpoint) logs the same losses as a 4-step
    run: the policy, optimizer and data position come back from the checkpoint, the reference
    engine is rebuilt from its model. Constant LR, so the schedule is the same."""
    data = separable_pairs(tmp_path / "pairs.jsonl", n=80)
    config = tmp_path / "c.yaml"
    config.write_text("train: {min_lr_ratio: 1.0, warmup_ratio: 0.0}\n")

    def run(out, steps, nproc=1):
        proc = run_forgepipe(dpo_args(tiny_model, data, out, tmp_path / f"{out.name}.db", "--config", str(config),
                                      "--zero-stage", "3", "--per-device-batch-size", str(8 // nproc),
                                      "--max-steps", str(steps)), nproc=nproc)
        assert proc.returncode == 0, proc.stderr[-3000:]
        client, record = mlflow_run(tmp_path / f"{out.name}.db")
        return metric_values(client, record.info.run_id, "dpo/loss"), proc.stderr

    whole, _ = run(tmp_path / "whole", 4)
    run(tmp_path / "parts", 2, nproc=2)  # 2 ranks x 4 pairs, then 1 rank x 8: the same pairs each step
    parts, log = run(tmp_path / "parts", 4)
    assert "resumed from" in log and "universal checkpoint" in log and len(parts) == 4
    assert parts == pytest.approx(whole, rel=1e-4)


@pytest.mark.slow
def test_ipo_lora_reference_on_the_fly_with_gradient_checkpointing(tiny_model, tmp_path):
    """Each micro-batch: the reference pass with the adapters off, then the policy's pass. At step 1
    LoRA is still the identity, so h = 0 and IPO's loss is (0 - 1/(2 beta))^2 = 1 at beta 0.5."""
    data = separable_pairs(tmp_path / "pairs.jsonl", n=80)
    db = tmp_path / "mlflow.db"
    proc = run_forgepipe(dpo_args(tiny_model, data, tmp_path / "ipo", db, "--zero-stage", "3", "--loss", "ipo",
                                  "--per-device-batch-size", "8", "--max-steps", "3", "--lora-dim", "8",
                                  "--gradient-checkpointing"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    client, run = mlflow_run(db)
    assert run.data.params["dpo.reference"] == "adapters"
    losses = metric_values(client, run.info.run_id, "dpo/loss")
    assert losses[0] == pytest.approx(1.0, abs=1e-5) and losses[-1] < losses[0]

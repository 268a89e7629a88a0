"""Stage 3 end to end on tiny models: PPO learns, ZeRO-3 across 2 ranks generates and trains, resume.

The toy task: the reward model scores a response by its last token, with a score that is a linear
function of the actor's own output embedding of that token (reward embeddings = actor's output
embeddings, transformer blocks zeroed, score head = a random direction v). So one direction of the
actor's final hidden state raises the score of all high-scoring tokens at once: a task PPO can learn
in a few steps, with a reward that is deterministic and needs no training.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import (
    SAMPLE_DOCS,
    SAMPLE_PAIRS,
    artifact_json,
    child_env,
    metric_values,
    mlflow_run,
    run_forgepipe,
    torchrun,
)

pytestmark = pytest.mark.slow

REQUIRED_METRICS = ("ppo/score_mean", "ppo/kl", "ppo/policy_loss", "ppo/value_loss", "ppo/clip_frac",
                    "ppo/response_len", "perf/gen_tokens_per_s", "time/generation_s", "time/training_s")


def make_toy_pair(root: Path, seed: int = 0) -> tuple[Path, Path]:
    """(actor dir, reward export dir) for the toy task described in the module docstring."""
    from transformers import AutoConfig, GPTNeoXForCausalLM, GPTNeoXForSequenceClassification

    from forgepipe.models.tiny import TOKENIZER_FILES, make_tiny_model, tiny_asset_dir

    actor_dir = make_tiny_model(root / "actor", seed=seed)
    actor = GPTNeoXForCausalLM.from_pretrained(actor_dir)
    with torch.no_grad():
        actor.get_output_embeddings().weight.mul_(20.0)  # a peaked policy, like a trained LM's
    actor.save_pretrained(actor_dir)

    config = AutoConfig.from_pretrained(actor_dir)
    config.num_labels, config.pad_token_id = 1, 1
    torch.manual_seed(seed + 1)
    reward = GPTNeoXForSequenceClassification(config)
    with torch.no_grad():
        for layer in reward.gpt_neox.layers:  # blocks add nothing: hidden state = token embedding
            for linear in (layer.attention.dense, layer.mlp.dense_4h_to_h):
                linear.weight.zero_()
                linear.bias.zero_()
        reward.gpt_neox.embed_in.weight.copy_(actor.get_output_embeddings().weight)
        v = torch.randn(config.hidden_size)
        reward.score.weight.copy_((v / v.norm()).unsqueeze(0))
    reward_dir = root / "reward"
    reward.save_pretrained(reward_dir)
    for name in TOKENIZER_FILES:
        shutil.copyfile(tiny_asset_dir() / name, reward_dir / name)
    return actor_dir, reward_dir


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return make_toy_pair(tmp_path_factory.mktemp("toy"))


def ppo_args(actor: Path, reward: Path, out: Path, db: Path, *extra: str) -> list[str]:
    return ["ppo", "--actor", str(actor), "--reward", str(reward), "--data", str(SAMPLE_PAIRS),
            "--output-dir", str(out), "--tracking-uri", f"sqlite:///{db}", "--dtype", "fp32", "--torch-adam",
            "--max-new-tokens", "6", "--max-prompt-len", "64", "--max-seq-len", "128", "--warmup-ratio", "0",
            "--lr", "1e-3", "--critic-lr", "1e-3", "--epochs", "5", "--seed", "4", *extra]


def test_ppo_learns_the_toy_reward(toy, tmp_path):
    actor, reward = toy
    out, db = tmp_path / "ppo", tmp_path / "mlflow.db"
    proc = run_forgepipe(ppo_args(actor, reward, out, db, "--zero-stage", "0", "--per-device-batch-size", "8",
                                  "--max-steps", "16"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    client, run = mlflow_run(db)
    scores = metric_values(client, run.info.run_id, "ppo/score_mean")
    kls = metric_values(client, run.info.run_id, "ppo/kl")
    assert len(scores) == 16
    assert sum(scores[-4:]) / 4 > sum(scores[:4]) / 4 + 0.3, scores
    assert kls[0] == pytest.approx(0.0, abs=1e-4)  # before the first update the actor is the reference
    assert all(math.isfinite(k) for k in kls) and max(kls) > 0, kls
    for key in REQUIRED_METRICS:
        assert all(math.isfinite(v) for v in metric_values(client, run.info.run_id, key)), key
    assert (out / "model" / "model.safetensors").is_file()
    assert json.loads((out / "forgepipe-run.json").read_text())["steps"] == 16


def test_ppo_zero3_two_ranks_generates_and_trains(toy, tmp_path):
    """ZeRO-3 on 2 ranks with the default gathered generation, EMA export, ptx loss and 2 PPO epochs."""
    actor, reward = toy
    out, db = tmp_path / "ppo", tmp_path / "mlflow.db"
    proc = run_forgepipe(ppo_args(actor, reward, out, db, "--zero-stage", "3", "--per-device-batch-size", "2",
                                  "--generation-batch-size", "4", "--max-steps", "2", "--ppo-epochs", "2",
                                  "--ema", "0.9", "--unsupervised-data", str(SAMPLE_DOCS), "--ptx-coef", "0.1",
                                  "--data-split", "2,4,4"),  # the ppo share: 5 held-out prompts below
                         nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    client, run = mlflow_run(db)
    assert run.data.tags["world_size"] == "2"
    for key in (*REQUIRED_METRICS, "ppo/ptx_loss"):
        values = metric_values(client, run.info.run_id, key)
        assert len(values) == 2 and all(math.isfinite(v) for v in values), (key, values)
    # The held-out evaluation at the end, both ranks generating together (5 held-out prompts within
    # --max-prompt-len over 2 ranks x 4: rank 1's batch is filled up with weightless copies).
    assert run.data.params["data.eval_prompts"] == "5"
    for key in ("ppo/eval_score", "ppo/eval_ref_score", "ppo/eval_win_rate", "ppo/eval_kl"):
        values = metric_values(client, run.info.run_id, key)
        assert len(values) == 1 and math.isfinite(values[0]), (key, values)
    for name in ("actor", "critic", "ref", "reward"):
        ds_json = artifact_json(client, run.info.run_id, f"deepspeed/{name}.json")
        assert ds_json["zero_optimization"]["stage"] == 3, name
        assert ("optimizer" in ds_json) == (name in ("actor", "critic")), name
    checkpoint = out / "checkpoints" / "step-00000002"
    assert {"actor", "critic", "ema_actor.pt", "loop_state.json"} <= {p.name for p in checkpoint.iterdir()}

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out / "model")
    tok = AutoTokenizer.from_pretrained(out / "model")
    ids = tok("\n\nHuman: What is a GPU?\n\nAssistant:", return_tensors="pt")
    generated = model.generate(**ids, max_new_tokens=3, do_sample=False, pad_token_id=tok.pad_token_id)
    assert generated.shape[1] > ids["input_ids"].shape[1]


UNEVEN_GENERATION = r"""
import sys, torch
from forgepipe.config import build_config
from forgepipe.deepspeed_config import build_ds_config
from forgepipe.distributed import detect_world, init_distributed, teardown
from forgepipe.engine import initialize
from forgepipe.models.load import load_causal_lm
from forgepipe.stages.ppo.experience import generate

world = init_distributed(detect_world())
cfg = build_config("ppo", overrides={"deepspeed.zero_stage": 3, "deepspeed.torch_adam": True, "train.dtype": "fp32",
                                     "train.per_device_batch_size": 2})
actor = initialize(load_causal_lm(sys.argv[1], dtype="fp32"), build_ds_config(cfg, world, zeropp=False), total_steps=1)
torch.manual_seed(world.rank)
prompts = torch.randint(2, 900, (2, 5))
for mode in ("gather", "synced"):
    # Ranks ask for different lengths: a rank that stops early must not leave the other waiting.
    out = generate(actor, prompts, torch.ones_like(prompts), eos_token_id=0, pad_token_id=1,
                   max_new_tokens=2 + 6 * world.rank, temperature=1.0, top_p=1.0,
                   synced_gpus=mode == "synced", gather=mode == "gather")
    print(f"rank {world.rank} {mode} {out.shape[1] - 5}", flush=True)
    # The ZeRO-3 hooks are back after gathered generation: a training forward still works.
    loss = actor(input_ids=out, labels=out).loss
    actor.backward(loss)
    actor.step()
teardown()
"""


def test_zero3_generation_with_uneven_lengths_across_ranks(tiny_model, tmp_path):
    script = tmp_path / "uneven.py"
    script.write_text(UNEVEN_GENERATION)
    proc = subprocess.run(
        torchrun(2, str(script), str(tiny_model)),
        env=child_env(), capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    # Two ranks share stdout: their lines may interleave, so find the reports anywhere in it.
    reports = set(re.findall(r"rank \d (?:gather|synced) \d+", proc.stdout))
    assert {"rank 0 gather 2", "rank 1 gather 8", "rank 0 synced 2", "rank 1 synced 8"} <= reports, proc.stdout


def test_ppo_resumes_where_it_stopped(toy, tmp_path):
    actor, reward = toy
    out, db = tmp_path / "ppo", tmp_path / "mlflow.db"
    common = ("--zero-stage", "2", "--per-device-batch-size", "4", "--save-every", "1")
    first = run_forgepipe(ppo_args(actor, reward, out, db, *common, "--max-steps", "2"))
    assert first.returncode == 0, first.stderr[-3000:]
    second = run_forgepipe(ppo_args(actor, reward, out, db, *common, "--max-steps", "3"))
    assert second.returncode == 0, second.stderr[-3000:]
    client, run = mlflow_run(db)
    assert len(client.search_runs([run.info.experiment_id])) == 1  # the same MLflow run, continued
    history = client.get_metric_history(run.info.run_id, "ppo/score_mean")
    assert sorted(m.step for m in history) == [1, 2, 3]
    state = json.loads((out / "checkpoints" / "step-00000003" / "loop_state.json").read_text())
    assert (state["step"], state["epoch"], state["position"]) == (3, 0, 3)


def test_ppo_with_different_reward_tokenizer_needs_the_opt_in(toy, tmp_path):
    """A reward tokenizer with extra tokens: refused by default, re-tokenized text with the opt-in."""
    from forgepipe.models.load import load_tokenizer

    actor, reward = toy
    other = tmp_path / "reward-other-tokenizer"
    shutil.copytree(reward, other)
    tok = load_tokenizer(str(other))
    tok.add_tokens(["<|extra-1|>", "<|extra-2|>"])
    tok.save_pretrained(other)
    out, db = tmp_path / "ppo", tmp_path / "mlflow.db"
    args = ppo_args(actor, other, out, db, "--zero-stage", "0", "--per-device-batch-size", "4", "--max-steps", "2")
    refused = run_forgepipe(args)
    assert refused.returncode == 2 and "--allow-tokenizer-mismatch" in refused.stderr, refused.stderr[-2000:]
    assert not out.exists()
    proc = run_forgepipe([*args, "--allow-tokenizer-mismatch"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    client, run = mlflow_run(db)
    assert len(metric_values(client, run.info.run_id, "ppo/score_mean")) == 2

"""Stage 2: the pairwise loss by hand, and a real run that learns a separable preference."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import HH_SAMPLE, metric_values, mlflow_run, run_forgepipe

from forgepipe.stages.reward import pairwise_loss


def test_pairwise_loss_by_hand():
    chosen = torch.tensor([2.0, 0.0])
    rejected = torch.tensor([0.0, 1.0])
    # -log sigmoid(2) = 0.126928, -log sigmoid(-1) = 1.313262; mean = 0.720095
    assert pairwise_loss(chosen, rejected).item() == pytest.approx(0.720095, abs=1e-6)
    # margins shift the difference: d = 2 - 1 = 1 -> 0.313262; d = -1 - 0 -> 1.313262; mean 0.813262
    margin = torch.tensor([1.0, 0.0])
    assert pairwise_loss(chosen, rejected, margin).item() == pytest.approx(0.813262, abs=1e-6)
    assert pairwise_loss(torch.tensor([0.0]), torch.tensor([0.0])).item() == pytest.approx(math.log(2))


def separable_pairs(path, n=240):
    """Chosen answers carry the marker word; rejected ones do not."""
    topics = ["the cache", "the scheduler", "a kernel", "the network", "the solver", "a node", "the job", "MPI"]
    with path.open("w") as f:
        for i in range(n):
            t = topics[i % len(topics)]
            prompt = f"\n\nHuman: Tell me about {t} number {i}.\n\nAssistant:"
            f.write(json.dumps({"prompt": prompt, "chosen": f" Certainly, {t} is useful.",
                                "rejected": f" No, {t} is useless."}) + "\n")
            if i % 40 == 0:  # identical pairs are dropped and counted
                f.write(json.dumps({"prompt": prompt, "chosen": " Same.", "rejected": " Same."}) + "\n")
    return path


@pytest.mark.slow
def test_reward_learns_separable_preferences(tiny_model, tmp_path):
    data = separable_pairs(tmp_path / "pairs.jsonl")
    out, db = tmp_path / "rm", tmp_path / "mlflow.db"
    proc = run_forgepipe(["reward", "--model", str(tiny_model), "--data", str(data), "--data-split", "0,1,0",
                          "--output-dir", str(out), "--tracking-uri", f"sqlite:///{db}", "--dtype", "fp32",
                          "--torch-adam", "--zero-stage", "2", "--per-device-batch-size", "8", "--lr", "1e-3",
                          "--epochs", "2", "--eval-every", "10", "--eval-fraction", "0.2"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    client, run = mlflow_run(db)
    accuracy = metric_values(client, run.info.run_id, "reward/eval_accuracy")
    assert len(accuracy) >= 2 and accuracy[-1] >= 0.9, accuracy
    assert run.data.metrics["reward/eval_score_gap"] > 0
    assert int(run.data.params["data.identical_pairs_dropped"]) == 6


@pytest.mark.slow
def test_reward_zero3_two_ranks_export_reloads_to_same_scores(tiny_model, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from forgepipe.models.reward_model import last_token_scores, load_scalar_model

    data = separable_pairs(tmp_path / "pairs.jsonl", n=64)
    out, db = tmp_path / "rm", tmp_path / "mlflow.db"
    proc = run_forgepipe(["reward", "--model", str(tiny_model), "--data", str(data), "--data-split", "0,1,0",
                          "--output-dir", str(out), "--tracking-uri", f"sqlite:///{db}", "--dtype", "fp32",
                          "--torch-adam", "--zero-stage", "3", "--per-device-batch-size", "4", "--lr", "1e-3",
                          "--max-steps", "4"], nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _, run = mlflow_run(db)
    assert run.data.tags["world_size"] == "2"

    export = out / "model"
    tok = AutoTokenizer.from_pretrained(export)
    texts = ["\n\nHuman: Hi.\n\nAssistant: Certainly, yes.<|endoftext|>", "\n\nHuman: Hi.\n\nAssistant: No.<|endoftext|>"]
    batch = tok(texts, return_tensors="pt", padding=True)
    hf = AutoModelForSequenceClassification.from_pretrained(export).eval()
    ours = load_scalar_model(str(export), dtype="fp32").eval()
    with torch.no_grad():
        hf_scores = hf(**batch).logits.squeeze(-1)
        our_scores = last_token_scores(ours(batch["input_ids"], batch["attention_mask"]), batch["attention_mask"])
    assert torch.allclose(hf_scores, our_scores, atol=1e-5)
    assert (export / "model.safetensors").is_file() and hf.config.num_labels == 1


@pytest.mark.slow
def test_reward_on_real_hh_sample(tiny_model, tmp_path):
    if not HH_SAMPLE.is_file():
        pytest.skip(f"real data sample not present at {HH_SAMPLE}")
    out, db = tmp_path / "rm", tmp_path / "mlflow.db"
    proc = run_forgepipe(["reward", "--model", str(tiny_model), "--data", str(HH_SAMPLE), "--output-dir", str(out),
                          "--tracking-uri", f"sqlite:///{db}", "--dtype", "fp32", "--torch-adam", "--zero-stage", "2",
                          "--per-device-batch-size", "8", "--max-steps", "6", "--max-seq-len", "256"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    _, run = mlflow_run(db)
    assert 0.0 <= run.data.metrics["reward/eval_accuracy"] <= 1.0
    assert int(run.data.params["data.train_pairs"]) > 100

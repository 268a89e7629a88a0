"""What the SFT and reward evaluations show people: generations and scored pairs as MLflow tables."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import SAMPLE_PAIRS, mlflow_run, run_forgepipe

from forgepipe.stages.reward import split_pair
from forgepipe.stages.sft import prompt_and_answer


def test_prompt_and_answer_cut_where_the_loss_starts():
    example = {"input_ids": [5, 6, 7, 8, 0], "labels": [-100, -100, 7, 8, 0]}
    assert prompt_and_answer(example) == ([5, 6], [7, 8, 0])
    assert prompt_and_answer({"input_ids": [5, 6, 0], "labels": [5, 6, 0]}) is None  # a document
    all_turns = {"input_ids": [1, 2, 3, 4, 5, 6, 0], "labels": [-100, 2, 3, -100, -100, 6, 0]}
    assert prompt_and_answer(all_turns) == ([1, 2, 3, 4, 5], [6, 0])  # the final turn is the answer


def test_split_pair_keeps_the_shared_prefix_as_the_prompt():
    assert split_pair([1, 2, 3, 4, 0], [1, 2, 9, 0]) == ([1, 2], [3, 4, 0], [9, 0])
    assert split_pair([1, 2, 0], [1, 2, 3, 0]) == ([1, 2], [0], [3, 0])


def table_rows(client, run_id: str, path: str) -> list[dict]:
    table = json.loads(Path(client.download_artifacts(run_id, path)).read_text())
    return [dict(zip(table["columns"], row, strict=True)) for row in table["data"]]


@pytest.mark.slow
def test_sft_logs_generations_at_each_evaluation(tiny_model, tmp_path):
    out, db = tmp_path / "sft", tmp_path / "mlflow.db"
    proc = run_forgepipe(["sft", "--model", str(tiny_model), "--data", str(SAMPLE_PAIRS), "--output-dir", str(out),
                          "--tracking-uri", f"sqlite:///{db}", "--dtype", "fp32", "--torch-adam", "--zero-stage", "2",
                          "--per-device-batch-size", "4", "--max-steps", "4", "--eval-every", "2",
                          "--max-seq-len", "128"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    client, run = mlflow_run(db)
    rows = table_rows(client, run.info.run_id, "sft_eval/generations.json")
    held_out = int(run.data.params["data.eval_samples"])  # 6: a tenth of SFT's share of the sample
    assert [r["step"] for r in rows] == [2] * min(held_out, 8) + [4] * min(held_out, 8)
    assert all(r["prompt"].startswith("\n\nHuman:") and r["reference"] for r in rows)
    assert all(isinstance(r["response"], str) for r in rows)
    assert "eval step 4, prompt" in proc.stderr


@pytest.mark.slow
def test_reward_logs_scored_pairs_at_each_evaluation(tiny_model, tmp_path):
    out, db = tmp_path / "rm", tmp_path / "mlflow.db"
    proc = run_forgepipe(["reward", "--model", str(tiny_model), "--data", str(SAMPLE_PAIRS), "--output-dir", str(out),
                          "--tracking-uri", f"sqlite:///{db}", "--dtype", "fp32", "--torch-adam", "--zero-stage", "3",
                          "--per-device-batch-size", "4", "--max-steps", "2", "--eval-every", "1",
                          "--max-seq-len", "128"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    client, run = mlflow_run(db)
    rows = table_rows(client, run.info.run_id, "reward_eval/pairs.json")
    assert [r["step"] for r in rows] == [1] * 8 + [2] * 8
    assert all(r["prompt"].startswith("\n\nHuman:") and r["chosen"] != r["rejected"] for r in rows)
    assert all(r["correct"] == (r["chosen_score"] > r["rejected_score"]) for r in rows)
    accuracy = [m for m in client.get_metric_history(run.info.run_id, "reward/eval_accuracy") if m.step == 2]
    assert accuracy and 0.0 <= accuracy[0].value <= 1.0

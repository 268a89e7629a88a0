"""PPO's held-out evaluation: its figures by hand, a policy judged against itself, and a real run's
metrics and generations table."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import SAMPLE_PAIRS, metric_values, mlflow_run, run_forgepipe

from forgepipe.stages.ppo.evaluation import (
    EVAL_SUMS,
    EvalSettings,
    PolicyEvaluation,
    eval_metrics,
    full_batch,
    sequence_kl,
    win_points,
)

EVAL_METRICS = ("ppo/eval_score", "ppo/eval_ref_score", "ppo/eval_win_rate", "ppo/eval_response_len",
                "ppo/eval_ref_response_len", "ppo/eval_sampled_score", "ppo/eval_sampled_response_len",
                "ppo/eval_kl", "ppo/eval_kl_per_token")


def test_win_points_counts_a_tie_as_half():
    policy = torch.tensor([1.0, 0.2, -3.0, 0.5])
    reference = torch.tensor([0.5, 0.2, -1.0, -0.5])
    assert win_points(policy, reference).tolist() == [1.0, 0.5, 0.0, 1.0]  # win rate 2.5 / 4 = 0.625


def test_sequence_kl_sums_the_log_ratio_over_response_tokens_only():
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-0.1, -0.1, -9.0]])
    logp_ref = torch.tensor([[-1.5, -1.0, -0.5], [-0.4, -0.3, -0.1]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])
    # row 0: (-1 + 1.5) + (-2 + 1) = -0.5 (the third token is padding after EOS)
    # row 1: (-0.1 + 0.4) + (-0.1 + 0.3) = 0.5
    assert sequence_kl(logp, logp_ref, mask).tolist() == pytest.approx([-0.5, 0.5])


def test_eval_metrics_by_hand():
    sums = {"prompts": 4.0, "score": 2.0, "ref_score": -1.0, "win": 2.5, "response_len": 20.0,
            "ref_response_len": 12.0, "sampled_score": 1.0, "sampled_response_len": 32.0, "kl": 8.0}
    assert set(sums) == set(EVAL_SUMS)
    m = eval_metrics(sums)
    assert m == pytest.approx({
        "ppo/eval_score": 0.5, "ppo/eval_ref_score": -0.25, "ppo/eval_win_rate": 0.625,
        "ppo/eval_response_len": 5.0, "ppo/eval_ref_response_len": 3.0, "ppo/eval_sampled_score": 0.25,
        "ppo/eval_sampled_response_len": 8.0, "ppo/eval_kl": 2.0, "ppo/eval_kl_per_token": 0.25})
    assert set(m) == set(EVAL_METRICS)


def test_full_batch_fills_with_weightless_copies():
    assert full_batch([7, 8], 1.0, 4) == ([7, 8, 7, 7], [1.0, 1.0, 0.0, 0.0])
    assert full_batch([0], 0.0, 3) == ([0, 0, 0], [0.0, 0.0, 0.0])  # a rank with no prompt left
    assert full_batch([1, 2, 3], 1.0, 3) == ([1, 2, 3], [1.0, 1.0, 1.0])


def test_a_policy_judged_against_itself_ties_and_has_no_kl(tiny_model):
    """Actor and reference the same model: every greedy answer ties (win rate exactly 0.5), the
    sampled answers' log-ratio is 0, and the lengths agree. Plain HF models, one process."""
    from forgepipe.data.tokenize import tokenize_prompts
    from forgepipe.distributed import World
    from forgepipe.models.load import load_causal_lm, load_tokenizer
    from forgepipe.models.reward_model import load_scalar_model
    from forgepipe.tracking import Tracker

    tok = load_tokenizer(str(tiny_model), padding_side="left")
    actor = load_causal_lm(str(tiny_model), dtype="fp32", tokenizer=tok).eval()
    torch.manual_seed(0)
    reward = load_scalar_model(str(tiny_model), dtype="fp32", tokenizer=tok).eval()
    import datasets

    rows = datasets.Dataset.from_list([json.loads(line) for line in SAMPLE_PAIRS.read_text().splitlines()[:5]])
    prompts = tokenize_prompts(rows, tok, 64, None)
    settings = EvalSettings(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, max_new_tokens=5,
                            temperature=1.0, top_p=1.0, batch_size=2, forward_batch_size=2, table_rows=3, seed=0,
                            gather=False, synced_gpus=False, reward_kwargs={})
    evaluate = PolicyEvaluation(prompts, actor, actor, reward, tok, settings, World(), Tracker(enabled=False))
    m = evaluate(step=1)
    assert m["ppo/eval_win_rate"] == 0.5
    assert m["ppo/eval_score"] == pytest.approx(m["ppo/eval_ref_score"])
    assert m["ppo/eval_response_len"] == m["ppo/eval_ref_response_len"]
    assert 1 <= m["ppo/eval_sampled_response_len"] <= 5
    assert m["ppo/eval_kl"] == pytest.approx(0.0, abs=1e-6) and m["ppo/eval_kl_per_token"] == pytest.approx(0.0, abs=1e-6)
    assert len(evaluate.reference) == 3  # 5 prompts in batches of 2; the reference's answers are kept
    first = evaluate(step=2)
    assert first["ppo/eval_win_rate"] == 0.5
    # Sampling has its own random state: the same step samples the same answers, and training's
    # random stream is where it was before the evaluation.
    torch.manual_seed(123)
    assert evaluate(step=2) == first
    after = torch.rand(1).item()
    torch.manual_seed(123)
    assert after == torch.rand(1).item()


@pytest.mark.slow
def test_a_short_ppo_run_logs_the_evaluation_and_its_table(tmp_path):
    from test_ppo_integration import make_toy_pair, ppo_args

    actor, reward = make_toy_pair(tmp_path / "toy")
    out, db = tmp_path / "ppo", tmp_path / "mlflow.db"
    proc = run_forgepipe(ppo_args(actor, reward, out, db, "--zero-stage", "2", "--per-device-batch-size", "4",
                                  "--max-steps", "2", "--eval-every", "1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    client, run = mlflow_run(db)
    run_id = run.info.run_id
    for key in EVAL_METRICS:
        values = metric_values(client, run_id, key)
        assert len(values) == 2 and all(math.isfinite(v) for v in values), (key, values)  # steps 1 and 2
    assert [m.step for m in client.get_metric_history(run_id, "ppo/eval_win_rate")] == [1, 2]
    assert 0.0 <= run.data.metrics["ppo/eval_win_rate"] <= 1.0
    assert run.data.metrics["ppo/eval_kl"] > 0  # the policy moved
    held_out = int(run.data.params["data.eval_prompts"])
    assert held_out > 0

    table = json.loads(Path(client.download_artifacts(run_id, "ppo_eval/generations.json")).read_text())
    columns = table["columns"]
    assert columns == ["step", "prompt", "policy", "policy_score", "reference", "reference_score",
                       "policy_sampled", "sampled_score"]
    rows = [dict(zip(columns, row, strict=True)) for row in table["data"]]
    per_step = min(held_out, 8)
    assert [r["step"] for r in rows] == [1] * per_step + [2] * per_step
    assert all(r["prompt"].startswith("\n\nHuman:") for r in rows)
    assert [r["reference"] for r in rows[:per_step]] == [r["reference"] for r in rows[per_step:]]  # frozen, greedy
    assert all(isinstance(r["policy_score"], float) for r in rows)
    assert "eval step 2, prompt" in proc.stderr and "reference (" in proc.stderr

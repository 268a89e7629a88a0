"""`forgepipe chat` and `forgepipe score` on tiny exports: the training template, greedy answers
equal to transformers' own, reward scores equal to the sequence classifier's, one-line errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import SAMPLE_PAIRS, run_forgepipe

from forgepipe.chat import pairwise_summary
from forgepipe.cli import main
from forgepipe.generation import render_prompt, response_ids

QUESTION = "What is a GPU?"
PROMPT = "\n\nHuman: What is a GPU?\n\nAssistant:"


def test_render_prompt_uses_the_hh_turns_the_stages_trained_on():
    assert render_prompt(QUESTION) == PROMPT
    assert render_prompt("  What is a GPU?\n") == PROMPT
    assert render_prompt(PROMPT) == PROMPT  # a whole dialogue is kept as it is
    dialogue = PROMPT + " A processor.\n\nHuman: And a CPU?\n\nAssistant:"
    assert render_prompt(dialogue) == dialogue
    assert render_prompt("Q: hi\nA:", "raw") == "Q: hi\nA:"


def test_response_ids_stop_at_the_first_eos():
    sequences = torch.tensor([[5, 6, 7, 0, 1], [5, 6, 0, 9, 0], [5, 6, 8, 8, 8]])
    assert response_ids(sequences, prompt_len=2, eos_token_id=0) == [[7], [], [8, 8, 8]]


def test_pairwise_summary_by_hand():
    s = pairwise_summary([1.0, 0.5, -1.0, 2.0], [0.0, 0.5, 0.0, -2.0])
    # correct: 1 > 0, 2 > -2; a tie is not a correct pair (as the reward stage counts it)
    assert s == pytest.approx({"pairs": 4.0, "accuracy": 0.5, "chosen_mean": 0.625, "rejected_mean": -0.375,
                               "gap_mean": 1.0})


@pytest.fixture(scope="module")
def sft_output(tiny_model, tmp_path_factory) -> Path:
    """A stage output directory as `forgepipe sft` leaves it: model/ and the run's config.yaml."""
    out = tmp_path_factory.mktemp("sft-out")
    shutil.copytree(tiny_model, out / "model")
    (out / "config.yaml").write_text("stage: sft\ndata:\n  max_prompt_len: 48\n  max_seq_len: 96\n")
    return out


@pytest.fixture(scope="module")
def reward_export(tmp_path_factory) -> Path:
    from test_ppo_integration import make_toy_pair

    return make_toy_pair(tmp_path_factory.mktemp("toy"))[1]


def greedy_reference(model_dir: Path, prompt: str, max_new_tokens: int) -> str:
    """transformers' own greedy answer to the prompt, tokenized as the stages do."""
    from transformers import AutoModelForCausalLM

    from forgepipe.models.load import load_tokenizer

    tok = load_tokenizer(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids = torch.tensor([tok(prompt, add_special_tokens=False)["input_ids"]])
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                         max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    return tok.decode(response_ids(out, ids.shape[1], tok.eos_token_id)[0], skip_special_tokens=True)


@pytest.mark.slow
def test_chat_prompt_answers_from_an_export(sft_output):
    """The real command in a fresh process: a stage output directory, the HH template, greedy."""
    proc = run_forgepipe(["chat", str(sft_output), "--prompt", QUESTION, "--max-new-tokens", "6", "--jsonl"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads(proc.stdout.strip().splitlines()[-1])
    assert record["prompt"] == QUESTION
    assert record["response"] and record["response"] == greedy_reference(sft_output / "model", PROMPT, 6)


def test_chat_prompts_file_and_interactive(sft_output, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("What is a GPU?\n\nName a solver.\n")
    result = CliRunner().invoke(main, ["chat", str(sft_output / "model"), "--prompts", str(prompts), "--jsonl",
                                       "--max-new-tokens", "4"])
    assert result.exit_code == 0, result.output
    answers = [json.loads(line) for line in result.stdout.splitlines()]
    assert [a["prompt"] for a in answers] == ["What is a GPU?", "Name a solver."]
    assert answers[0]["response"] == greedy_reference(sft_output / "model", PROMPT, 4)

    # A data file the stages read gives its prompts as trained (HH prompts kept as they are).
    result = CliRunner().invoke(main, ["chat", str(sft_output), "--prompts", str(SAMPLE_PAIRS), "--jsonl",
                                       "--max-new-tokens", "2", "--batch-size", "64"])
    assert result.exit_code == 0, result.output
    assert len(result.stdout.splitlines()) == len(SAMPLE_PAIRS.read_text().splitlines())

    result = CliRunner().invoke(main, ["chat", str(sft_output), "--max-new-tokens", "4", "--sample"],
                                input="What is a GPU?\n/reset\nAnd a CPU?\nexit\n")
    assert result.exit_code == 0, result.output
    assert result.stdout.count("model> ") == 2


def test_score_prints_scores_and_accuracy_as_the_classifier_gives_them(reward_export):
    from transformers import AutoModelForSequenceClassification

    from forgepipe.data.tokenize import pair_side
    from forgepipe.models.load import load_tokenizer

    result = CliRunner().invoke(main, ["score", str(reward_export), "--data", str(SAMPLE_PAIRS), "--limit", "6",
                                       "--jsonl"])
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(records) == 6

    tok = load_tokenizer(str(reward_export))
    hf = AutoModelForSequenceClassification.from_pretrained(reward_export).eval()
    rows = [json.loads(line) for line in SAMPLE_PAIRS.read_text().splitlines()[:6]]
    for record, row in zip(records, rows, strict=True):
        for side in ("chosen", "rejected"):
            ids = pair_side(tok(row["prompt"], add_special_tokens=False)["input_ids"],
                            tok(row[side], add_special_tokens=False)["input_ids"], tok.eos_token_id, 512, 256)
            with torch.no_grad():
                expected = hf(input_ids=torch.tensor([ids])).logits.item()
            assert record[f"{side}_score"] == pytest.approx(expected, abs=1e-4), side

    table = CliRunner().invoke(main, ["score", str(reward_export), "--data", str(SAMPLE_PAIRS), "--limit", "6"])
    assert table.exit_code == 0, table.output
    summary = pairwise_summary([r["chosen_score"] for r in records], [r["rejected_score"] for r in records])
    assert table.stdout.splitlines()[-1].startswith(f"pairs: 6  accuracy: {summary['accuracy']:.4f}")


def test_wrong_kind_of_model_or_file_is_one_line(sft_output, reward_export, tmp_path):
    cases = [
        (["chat", str(reward_export), "--prompt", "hi"], "is a reward model export"),
        (["score", str(sft_output), "--data", str(SAMPLE_PAIRS)], "is not a reward model export"),
        (["chat", str(sft_output), "--prompts", str(tmp_path / "missing.txt")], "--prompts:"),
        (["chat", str(tmp_path), "--prompt", "hi"], "MODEL_DIR:"),
    ]
    for args, expected in cases:
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 2, (args, result.output)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("forgepipe: error: ") and expected in lines[0], result.stderr

"""Scalar-head model: last-token scores, and an export transformers reads as a sequence classifier."""

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from forgepipe.errors import ForgeError
from forgepipe.models.load import LoraSettings, load_tokenizer
from forgepipe.models.reward_model import (
    ScalarHeadModel,
    has_scalar_head,
    last_token_scores,
    load_scalar_model,
)
from forgepipe.models.tiny import make_tiny_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return str(make_tiny_model(tmp_path_factory.mktemp("tiny"), seed=0))


VALUES = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0], [9.0, 10.0, 11.0, 12.0]])


def test_last_token_scores_right_padding():
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]])
    assert last_token_scores(VALUES, mask).tolist() == [3.0, 6.0, 12.0]


def test_last_token_scores_left_padding():
    mask = torch.tensor([[0, 1, 1, 1], [0, 0, 1, 1], [0, 0, 0, 1]])
    assert last_token_scores(VALUES, mask).tolist() == [4.0, 8.0, 12.0]


def test_last_token_scores_bool_mask_and_single_token():
    mask = torch.tensor([[True, False, False, False], [False, True, False, False], [False, False, True, False]])
    assert last_token_scores(VALUES, mask).tolist() == [1.0, 6.0, 11.0]


def _right_padded_batch(tok):
    texts = ["The alloy reduces the band gap at exascale.", "The solver scales.", "Why does the plasma matter?"]
    batch = tok([t + tok.eos_token for t in texts], padding=True, return_tensors="pt")
    assert (batch["attention_mask"] == 0).any()  # the batch really is padded
    return batch


def test_export_loads_as_sequence_classifier_with_same_last_token_score(tiny, tmp_path):
    tok = load_tokenizer(tiny)
    torch.manual_seed(0)
    model = load_scalar_model(tiny, dtype="fp32", tokenizer=tok)
    assert isinstance(model, ScalarHeadModel) and model.config.pad_token_id == tok.pad_token_id
    batch = _right_padded_batch(tok)
    model.eval()
    with torch.no_grad():
        values = model(batch["input_ids"], batch["attention_mask"])
    assert values.shape == batch["input_ids"].shape and values.dtype == torch.float32

    model.save_pretrained(tmp_path / "rm")
    hf = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    assert hf.config.num_labels == 1
    with torch.no_grad():
        logits = hf(**batch).logits
    torch.testing.assert_close(logits[:, 0], last_token_scores(values, batch["attention_mask"]),
                               atol=1e-5, rtol=0)


def test_left_padding_gives_the_same_score(tiny):
    tok = load_tokenizer(tiny)
    model = load_scalar_model(tiny, dtype="fp32", tokenizer=tok).eval()
    right = _right_padded_batch(tok)
    tok.padding_side = "left"
    left = _right_padded_batch(tok)
    with torch.no_grad():
        r = last_token_scores(model(right["input_ids"], right["attention_mask"]), right["attention_mask"])
        l_ = last_token_scores(model(left["input_ids"], left["attention_mask"]), left["attention_mask"])
    torch.testing.assert_close(r, l_, atol=1e-5, rtol=0)


def test_has_scalar_head_and_reloaded_head(tiny, tmp_path):
    tok = load_tokenizer(tiny)
    assert not has_scalar_head(tiny)
    model = load_scalar_model(tiny, dtype="fp32", tokenizer=tok)
    model.save_pretrained(tmp_path / "rm")
    assert has_scalar_head(str(tmp_path / "rm"))
    again = load_scalar_model(str(tmp_path / "rm"), dtype="fp32", tokenizer=tok)
    torch.testing.assert_close(again.hf.score.weight, model.hf.score.weight)


def test_two_label_classifier_is_refused(tiny, tmp_path):
    AutoModelForSequenceClassification.from_pretrained(tiny, num_labels=2).save_pretrained(tmp_path / "cls")
    assert not has_scalar_head(str(tmp_path / "cls"))
    with pytest.raises(ForgeError, match="2 labels, not a scalar reward model"):
        load_scalar_model(str(tmp_path / "cls"), dtype="fp32")


def test_lora_critic_trains_head_and_exports_merged(tiny, tmp_path):
    tok = load_tokenizer(tiny)
    model = load_scalar_model(tiny, dtype="fp32", tokenizer=tok, gradient_checkpointing=True,
                              lora=LoraSettings(dim=4))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("score" in n for n in trainable)
    assert all("lora_" in n or "score" in n for n in trainable)
    assert model.hf.is_activation_checkpointing
    model.train()
    batch = _right_padded_batch(tok)
    model(batch["input_ids"], batch["attention_mask"]).sum().backward()

    model.eval()
    for name, p in model.named_parameters():
        if "lora_B" in name or (p.requires_grad and "score" in name):  # as if trained
            torch.nn.init.normal_(p, std=0.1)
    with torch.no_grad():
        values = model(batch["input_ids"], batch["attention_mask"])
    model.save_pretrained(tmp_path / "critic")
    hf = AutoModelForSequenceClassification.from_pretrained(tmp_path / "critic").eval()
    assert not any("lora" in n for n, _ in hf.named_parameters())
    with torch.no_grad():
        logits = hf(**batch).logits
    torch.testing.assert_close(logits[:, 0], last_token_scores(values, batch["attention_mask"]),
                               atol=1e-5, rtol=0)

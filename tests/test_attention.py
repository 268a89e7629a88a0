"""The attention levers are exact: the padded head dimension and the mask-free right-padded batch
give the numbers of the plain path (models/attention.py)."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    GPTNeoXForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
)

from forgepipe.data.collate import PairCollator, SFTCollator
from forgepipe.models import attention
from forgepipe.models.reward_model import ScalarHeadModel, last_token_scores
from forgepipe.stages.sft import lm_loss


def neox(hidden=44, heads=2, cls=GPTNeoXForCausalLM, attn="eager"):
    torch.manual_seed(0)
    cfg = GPTNeoXConfig(num_hidden_layers=2, hidden_size=hidden, num_attention_heads=heads, intermediate_size=64,
                        vocab_size=97, max_position_embeddings=64, num_labels=1, pad_token_id=0)
    model = cls._from_config(cfg, attn_implementation="eager")
    attention.use(model, attn)
    return model


def llama(attn="eager"):
    torch.manual_seed(0)
    cfg = LlamaConfig(num_hidden_layers=2, hidden_size=44, num_attention_heads=2, num_key_value_heads=1,
                      intermediate_size=64, vocab_size=97, max_position_embeddings=64, pad_token_id=0)
    model = LlamaForCausalLM._from_config(cfg, attn_implementation="eager")
    attention.use(model, attn)
    return model


def test_auto_pads_only_head_dimensions_the_fused_kernels_refuse():
    assert attention.resolve("auto", GPTNeoXConfig(hidden_size=2064, num_attention_heads=24)) == attention.PADDED
    assert attention.resolve("auto", GPTNeoXConfig(hidden_size=576, num_attention_heads=9)) == "sdpa"
    assert attention.resolve("eager", GPTNeoXConfig(hidden_size=2064, num_attention_heads=24)) == "eager"
    assert attention.head_dim(LlamaConfig(hidden_size=64, num_attention_heads=2, head_dim=48)) == 48


@pytest.mark.parametrize("build", [neox, llama], ids=["gpt-neox", "llama"])
def test_padded_sdpa_equals_eager_forward_and_backward(build):
    ids = torch.randint(1, 97, (2, 12))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    results = []
    for attn in ("eager", attention.PADDED):
        model = build(attn=attn)
        assert model.config._attn_implementation == attn
        out = model(input_ids=ids, attention_mask=mask).logits
        out[0].sum().backward()
        grad = next(p for n, p in model.named_parameters() if "q" in n.split(".")[-2] or "query" in n).grad
        results.append((out.detach(), grad.clone()))
    (eager, eager_grad), (padded, padded_grad) = results
    torch.testing.assert_close(padded[0], eager[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(padded[1, :7], eager[1, :7], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(padded_grad, eager_grad, rtol=1e-4, atol=1e-5)  # fp32 sums in another order


def sft_rows():
    return [{"input_ids": [5, 6, 7, 8, 9, 10, 11], "labels": [-100, -100, -100, 8, 9, 10, 11]},
            {"input_ids": [12, 13, 14, 15], "labels": [-100, -100, 15, 16]}]


@pytest.mark.parametrize("build", [neox, llama], ids=["gpt-neox", "llama"])
@pytest.mark.parametrize("attn", ["eager", attention.PADDED])
def test_a_right_padded_sft_batch_without_its_mask_has_the_same_loss_and_gradient(build, attn):
    model = build(attn=attn)
    losses, grads = [], []
    for keep in (True, False):
        batch = SFTCollator(0, 8, padding_mask=keep)(sft_rows())  # padded to 8: row 2 has 4 pads
        assert (attention.CAUSAL_ONLY in batch) is not keep
        model.zero_grad()
        loss, _ = lm_loss(model, batch)
        loss.backward()
        losses.append(loss.detach())
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-7)


def test_a_right_padded_pair_batch_scores_the_same_without_its_mask():
    model = ScalarHeadModel(neox(cls=GPTNeoXForSequenceClassification, attn=attention.PADDED))
    rows = [{"chosen_input_ids": [3, 4, 5, 6, 7], "rejected_input_ids": [3, 4, 9]}]
    scores = []
    for keep in (True, False):
        batch = PairCollator(0, padding_mask=keep)(rows)
        values = model(input_ids=batch["input_ids"], attention_mask=attention.forward_mask(batch))
        scores.append(last_token_scores(values, batch["attention_mask"]))
    torch.testing.assert_close(scores[0], scores[1], rtol=1e-5, atol=1e-6)


def test_the_mask_does_matter_where_the_padding_is_on_the_left():
    """The lever's premise, shown failing where it does not hold (left padding), so the tests above can fail."""
    model = neox(attn="sdpa")
    ids = torch.tensor([[0, 0, 5, 6, 7]])
    with_mask = model(input_ids=ids, attention_mask=torch.tensor([[0, 0, 1, 1, 1]])).logits[0, -1]
    without = model(input_ids=ids).logits[0, -1]
    assert not torch.allclose(with_mask, without, atol=1e-4)


def test_sdpa_backends_reports_the_math_kernel_on_the_cpu():
    q = torch.randn(1, 2, 8, 86)
    assert attention.sdpa_backends(q, q, q)["math"] is True

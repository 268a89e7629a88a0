"""PPO experience: response masks and alignment by hand, then real tiny models without DeepSpeed."""

from __future__ import annotations

import torch
from torch.testing import assert_close
from transformers import AutoModelForCausalLM

from forgepipe.config import PPOConfig
from forgepipe.data.collate import PromptCollator
from forgepipe.models.load import keeps_logits, load_tokenizer
from forgepipe.models.reward_model import last_token_scores, load_scalar_model
from forgepipe.stages.ppo.experience import (
    Experience,
    actor_logprobs,
    make_experience,
    position_ids_from_mask,
    response_mask,
    response_slice,
    retokenize,
)

EOS, PAD = 0, 1


def test_response_mask_keeps_first_eos_and_masks_after_it():
    ids = torch.tensor([
        [5, EOS, 7, EOS],  # EOS second: it counts, what follows does not
        [EOS, 3, 3, 3],  # EOS first: a one-token response
        [4, 4, 4, 4],  # no EOS: cut by max_new_tokens, all real
        [PAD, PAD, EOS, PAD],  # a sampled pad id before EOS is a real token
    ])
    assert response_mask(ids, EOS).tolist() == [
        [1, 1, 0, 0],
        [1, 0, 0, 0],
        [1, 1, 1, 1],
        [1, 1, 1, 0],
    ]


def test_positions_count_real_tokens_only():
    mask = torch.tensor([[0, 0, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]])
    assert position_ids_from_mask(mask).tolist() == [[0, 0, 0, 1, 2, 2], [0, 1, 2, 3, 4, 5]]


def test_response_slice_takes_the_positions_that_predict_the_response():
    # T = 5, prompt P = 2: response tokens sit at 2, 3, 4 and are predicted at 1, 2, 3.
    per_position = torch.arange(10).view(2, 5)
    assert response_slice(per_position, 2).tolist() == [[1, 2, 3], [6, 7, 8]]


def test_experience_select_slices_rows_and_keeps_prompt_len():
    t = torch.arange(6).view(3, 2)
    exp = Experience(t, t, t, t, t, t, t, t, t, torch.arange(3), torch.arange(3), prompt_len=4)
    part = exp.select(torch.tensor([2, 0]))
    assert part.sequences.tolist() == [[4, 5], [0, 1]] and part.scores.tolist() == [2, 0]
    assert part.prompt_len == 4 and len(part) == 2


def test_logprobs_do_not_depend_on_left_padding(tiny_model):
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    seq = torch.tensor([[11, 12, 13, 14, 15]])  # prompt 11 12 13, response 14 15
    padded = torch.tensor([[PAD, PAD, 11, 12, 13, 14, 15]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        plain = actor_logprobs(model, seq, torch.ones_like(seq), 3)
        left = actor_logprobs(model, padded, mask, 5)
        logits = model(seq).logits[0]
    manual = torch.log_softmax(logits, -1)[[2, 3], [14, 15]]
    assert_close(plain[0], manual, atol=1e-5, rtol=1e-5)
    assert_close(left, plain, atol=1e-5, rtol=1e-5)


class AllLogits(torch.nn.Module):
    """A causal LM whose forward does not take `logits_to_keep` (as some remote-code models)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, position_ids, use_cache):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          use_cache=use_cache)


def test_logprobs_are_the_same_with_and_without_logits_to_keep(tiny_model):
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    seq = torch.tensor([[PAD, PAD, 11, 12, 13, 14, 15, 16], [21, 22, 23, 24, 25, 26, 27, 28]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1], [1] * 8])
    assert keeps_logits(model) and not keeps_logits(AllLogits(model))
    with torch.no_grad():
        kept = actor_logprobs(model, seq, mask, 5)
        full = actor_logprobs(AllLogits(model), seq, mask, 5)
    assert kept.shape == (2, 3)
    assert_close(kept, full, atol=1e-5, rtol=1e-5)


def test_retokenize_with_the_same_tokenizer_is_the_identity_plus_eos(tiny_model):
    tok = load_tokenizer(str(tiny_model))
    ids = tok(["Hello there.", "A longer prompt and answer."], add_special_tokens=False)["input_ids"]
    seq = PromptCollator(tok.pad_token_id)([{"prompt_input_ids": r} for r in ids])
    new_ids, new_mask = retokenize(seq["input_ids"], seq["attention_mask"], tok, tok, torch.device("cpu"))
    for row, mask, original in zip(new_ids, new_mask, ids, strict=True):
        assert row[mask.bool()].tolist() == original + [tok.eos_token_id]


def test_make_experience_with_real_tiny_models(tiny_model, tmp_path):
    """Actor == reference, so the KL term is 0 and the only reward is the clipped score, on the last token."""
    torch.manual_seed(0)
    tok = load_tokenizer(str(tiny_model), padding_side="left")
    actor = AutoModelForCausalLM.from_pretrained(tiny_model)
    ref = AutoModelForCausalLM.from_pretrained(tiny_model)
    reward = load_scalar_model(str(tiny_model), dtype="fp32", tokenizer=tok)  # random head: a scorer all the same
    critic = load_scalar_model(str(tiny_model), dtype="fp32", tokenizer=tok)
    prompts = tok(["Hello there, how are", "Why", "The cat sat on the mat and"], add_special_tokens=False)
    batch = PromptCollator(tok.pad_token_id)([{"prompt_input_ids": r} for r in prompts["input_ids"]])
    ppo = PPOConfig(max_new_tokens=6, kl_coef=0.1, reward_clip=0.01, gamma=1.0, lam=0.95, whiten_advantages=False)
    exp = make_experience(actor, critic, ref, reward, batch, ppo=ppo, eos_token_id=tok.eos_token_id,
                          pad_token_id=tok.pad_token_id, forward_batch_size=2)

    B, P = 3, batch["input_ids"].shape[1]
    R = exp.sequences.shape[1] - P
    assert exp.prompt_len == P and 1 <= R <= 6
    assert exp.sequences[:, :P].tolist() == batch["input_ids"].tolist()
    for name in ("action_mask", "logp_old", "logp_ref", "values_old", "rewards", "advantages", "returns"):
        assert getattr(exp, name).shape == (B, R), name
    assert exp.attention_mask.tolist() == torch.cat([batch["attention_mask"], exp.action_mask], 1).tolist()
    assert exp.action_mask.tolist() == response_mask(exp.sequences[:, P:], tok.eos_token_id).tolist()
    assert exp.response_lengths.tolist() == exp.action_mask.sum(1).tolist()
    assert (exp.logp_old <= 0).all() and torch.isfinite(exp.logp_old).all()
    assert_close(exp.logp_old, exp.logp_ref)

    with torch.no_grad():
        scores = last_token_scores(reward(exp.sequences, exp.attention_mask), exp.attention_mask)
    assert_close(exp.scores, scores)
    last = exp.response_lengths - 1
    expected = torch.zeros(B, R)
    expected[torch.arange(B), last] = scores.clamp(-0.01, 0.01)
    assert_close(exp.rewards, expected)
    # gamma = 1: the return at each real token is the reward still to come, i.e. the clipped score
    # plus the value bootstrap of GAE (lam < 1); at the last token it is exactly the reward.
    assert_close(exp.returns[torch.arange(B), last], expected[torch.arange(B), last])
    assert (exp.advantages[exp.action_mask == 0] == 0).all()


def test_scoring_in_token_chunks_gives_the_same_experience(tiny_model):
    """--scoring-tokens: the four scoring forwards over the whole rollout in token-sized chunks; the same
    numbers as one row at a time (each row is scored alone, so chunking changes nothing but speed)."""
    from forgepipe.rollout import RolloutEngine
    from forgepipe.stages.ppo.experience import rows_per_forward

    assert rows_per_forward(100, 1000) == 10 and rows_per_forward(3000, 1000) == 1
    tok = load_tokenizer(str(tiny_model), padding_side="left")
    torch.manual_seed(0)
    actor, ref = (AutoModelForCausalLM.from_pretrained(tiny_model) for _ in range(2))
    reward, critic = (load_scalar_model(str(tiny_model), dtype="fp32", tokenizer=tok) for _ in range(2))
    prompts = tok(["Hello there, how are", "Why", "The cat sat on the mat and", "A", "B c"], add_special_tokens=False)
    batch = PromptCollator(tok.pad_token_id)([{"prompt_input_ids": r} for r in prompts["input_ids"]])
    ppo = PPOConfig(max_new_tokens=6)
    runs = []
    for chunking in ({"forward_batch_size": 1}, {"forward_tokens": 40}, {"forward_tokens": 10_000}):
        engine = RolloutEngine(actor, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, seed=3)
        runs.append(make_experience(actor, critic, ref, reward, batch, ppo=ppo, eos_token_id=tok.eos_token_id,
                                    pad_token_id=tok.pad_token_id, rollout=engine, call=0, **chunking))
    for exp in runs[1:]:
        assert torch.equal(exp.sequences, runs[0].sequences)
        for name in ("logp_old", "logp_ref", "values_old", "scores"):
            assert_close(getattr(exp, name), getattr(runs[0], name), rtol=1e-5, atol=1e-5)

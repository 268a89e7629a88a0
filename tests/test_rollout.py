"""The rollout engine against transformers' generate and against the training forward."""

from __future__ import annotations

import pytest
import torch
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM

from forgepipe.rollout import RolloutEngine, SamplingSettings, choose, nucleus
from forgepipe.stages.ppo.experience import actor_logprobs

PAD = 0


def neox():
    torch.manual_seed(0)
    return GPTNeoXForCausalLM._from_config(GPTNeoXConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4,
                                                         intermediate_size=64, vocab_size=61), attn_implementation="sdpa")


def llama():
    torch.manual_seed(0)
    return LlamaForCausalLM._from_config(LlamaConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4,
                                                     num_key_value_heads=2, intermediate_size=64, vocab_size=61),
                                         attn_implementation="sdpa")


def prompts():
    """Three left-padded prompts of 5, 3 and 1 tokens."""
    ids = torch.tensor([[7, 8, 9, 10, 11], [PAD, PAD, 12, 13, 14], [PAD, PAD, PAD, PAD, 15]])
    return ids, (ids != PAD).long()


def hf_generate(model, ids, mask, eos, n):
    return model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=n, eos_token_id=eos,
                          pad_token_id=PAD)


@pytest.mark.parametrize("build", [neox, llama], ids=["gpt-neox", "llama"])
def test_greedy_equals_transformers_generate_token_for_token(build):
    model = build().eval()
    ids, mask = prompts()
    free = hf_generate(model, ids, mask, eos=60, n=10)  # an EOS it never says: all rows run to the end
    eos = int(free[0, ids.shape[1] + 2])  # then make row 0's third token the EOS: rows end at different steps
    expected = hf_generate(model, ids, mask, eos=eos, n=10)
    out = RolloutEngine(model, eos_token_id=eos, pad_token_id=PAD).generate(
        ids, mask, SamplingSettings(max_new_tokens=10, greedy=True, check_every=1))
    assert torch.equal(out.sequences, expected)
    assert out.action_mask[0].tolist()[:4] == [1, 1, 1, 0]
    check_every_4 = RolloutEngine(model, eos_token_id=eos, pad_token_id=PAD).generate(
        ids, mask, SamplingSettings(max_new_tokens=10, greedy=True, check_every=4))
    width = expected.shape[1]
    assert torch.equal(check_every_4.sequences[:, :width], expected)  # later checks only add padding
    assert (check_every_4.sequences[:, width:] == PAD).all()


def test_sampling_is_reproducible_from_the_seed_and_the_call():
    model = neox().eval()
    ids, mask = prompts()
    s = SamplingSettings(max_new_tokens=8, temperature=0.9, top_p=0.9)
    a, b = (RolloutEngine(model, eos_token_id=60, pad_token_id=PAD, seed=5) for _ in range(2))
    first = a.generate(ids, mask, s).sequences
    assert torch.equal(first, b.generate(ids, mask, s).sequences)
    assert not torch.equal(first, a.generate(ids, mask, s).sequences)  # the next call draws anew
    other = RolloutEngine(model, eos_token_id=60, pad_token_id=PAD, seed=6).generate(ids, mask, s).sequences
    assert not torch.equal(first, other)
    torch.manual_seed(123)  # the global stream (evaluation's, dropout's) neither feeds nor is fed by the engine
    before = torch.rand(1)
    torch.manual_seed(123)
    RolloutEngine(model, eos_token_id=60, pad_token_id=PAD, seed=5).generate(ids, mask, s)
    assert torch.equal(torch.rand(1), before)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_the_samplers_logprobs_are_the_training_forwards(temperature):
    """What rollout_logprob_gap measures is ~0 for an exact sampler (fp32, the same weights)."""
    model = neox().eval()
    ids, mask = prompts()
    out = RolloutEngine(model, eos_token_id=60, pad_token_id=PAD, seed=1).generate(
        ids, mask, SamplingSettings(max_new_tokens=8, temperature=temperature))
    recomputed = actor_logprobs(model, out.sequences, out.attention_mask, out.prompt_len, temperature)
    gap = ((out.logprobs - recomputed).abs() * out.action_mask).max()
    assert gap < 1e-4


def test_nucleus_keeps_the_smallest_set_reaching_top_p():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]]).log_softmax(-1)  # probabilities .64 .24 .09 .03
    kept = nucleus(logits, 0.8).isfinite()[0].tolist()
    assert kept == [True, True, False, False]
    assert nucleus(logits, 0.5).isfinite()[0].tolist() == [True, False, False, False]  # the top token always stays
    assert torch.equal(nucleus(logits, 1.0), logits)


def test_choose_greedy_and_its_logprob_by_hand():
    logits = torch.tensor([[0.0, 2.0, 1.0]])
    token, logp = choose(logits, SamplingSettings(max_new_tokens=1, greedy=True), None)
    assert token.tolist() == [1]
    assert logp.item() == pytest.approx(2.0 - torch.tensor([0.0, 2.0, 1.0]).exp().sum().log().item())


def test_the_gap_is_logged_per_token_and_a_drifting_sampler_stops_the_run():
    from forgepipe import distributed
    from forgepipe.distributed import World
    from forgepipe.errors import ForgeError
    from forgepipe.stages.ppo.experience import Experience
    from forgepipe.stages.ppo.trainer import check_rollout_gap, step_sums, window_metrics

    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    old = torch.zeros(2, 3)
    rollout = torch.tensor([[0.1, -0.3, 9.0], [0.0, 0.2, -0.1]])  # 9.0 sits after EOS: not counted
    t = torch.zeros(2, 3)
    exp = Experience(t.long(), t.long(), mask, old, old, t, t, t, t, torch.zeros(2), mask.sum(1), prompt_len=1,
                     generation_s=0.5, logp_rollout=rollout)
    stats = {k: 0.0 for k in ("policy_loss", "value_loss", "clip_frac", "approx_kl", "ptx_loss", "updates")}
    world = distributed.init_distributed(World())
    try:
        record, _, _ = window_metrics(step_sums(exp, stats, 1.0), world, ptx=False)
    finally:
        distributed.teardown()
    assert record["ppo/rollout_logprob_gap"] == pytest.approx((0.1 + 0.3 + 0.0 + 0.2 + 0.1) / 5)
    assert record["ppo/rollout_logprob_gap_max"] == pytest.approx(0.3)
    assert 0 < record["time/generation_share"] < 1
    check_rollout_gap(0.4, 0.5, step=3)
    with pytest.raises(ForgeError, match=r"^the sampler's log-probs differ from the training forward's by 0.6 nats "
                                         r"per token in the steps up to 3, more than --max-rollout-logprob-gap 0.5"):
        check_rollout_gap(0.6, 0.5, step=3)


@pytest.mark.parametrize("build", [neox, llama], ids=["gpt-neox", "llama"])
def test_the_static_cache_decodes_what_the_dynamic_one_does(build):
    """--rollout-cache static: one shape for every decode step (what a captured graph needs), the same tokens."""
    model = build().eval()
    ids, mask = prompts()
    expected = hf_generate(model, ids, mask, eos=60, n=7)
    dynamic, static = (RolloutEngine(model, eos_token_id=60, pad_token_id=PAD, seed=2, cache=c) for c in ("dynamic", "static"))
    greedy = SamplingSettings(max_new_tokens=7, greedy=True)
    assert torch.equal(static.generate(ids, mask, greedy).sequences, expected)
    sampled = SamplingSettings(max_new_tokens=7, temperature=0.8, top_p=0.95)
    a, b = dynamic.generate(ids, mask, sampled, call=4), static.generate(ids, mask, sampled, call=4)
    assert torch.equal(a.sequences, b.sequences)
    torch.testing.assert_close(a.logprobs, b.logprobs, rtol=1e-5, atol=1e-5)
    assert static.cache_bytes > dynamic.cache_bytes > 0  # preallocated for prompt + max_new_tokens


def test_compiling_the_decode_step_needs_the_static_cache():
    from forgepipe.config import build_config
    from forgepipe.errors import ForgeError

    with pytest.raises(ForgeError, match=r"^--rollout-compile: needs --rollout-cache static"):
        build_config("ppo", overrides={"ppo.rollout_compile": True})
    build_config("ppo", overrides={"ppo.rollout_compile": True, "ppo.rollout_cache": "static"})


@pytest.mark.slow
def test_the_compiled_decode_step_decodes_the_same_tokens_in_one_graph():
    """--rollout-compile: the decode step compiled once for its shape (inductor here; CUDA/HIP graphs on a GPU)."""
    import torch._dynamo.utils as dynamo

    model = neox().eval()
    ids, mask = prompts()
    expected = hf_generate(model, ids, mask, eos=60, n=6)
    engine = RolloutEngine(model, eos_token_id=60, pad_token_id=PAD, cache="static", compile_decode=True)
    dynamo.counters.clear()
    for _ in range(2):  # the second call reuses the graph
        assert torch.equal(engine.generate(ids, mask, SamplingSettings(max_new_tokens=6, greedy=True)).sequences, expected)
    assert dynamo.counters["stats"]["unique_graphs"] == 1 and not dynamo.counters["graph_break"]

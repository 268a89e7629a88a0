"""PPO experience: sample responses, then score them with the four models.

One experience batch is a set of prompts (left-padded, so every prompt ends where generation
starts) and the responses the actor sampled for them. Everything per token is RESPONSE-aligned,
[B, R]: position j is the j-th generated token, its log-probability comes from the logits at
sequence position P + j - 1 (P = padded prompt length), and the critic's value for it is read at
that same position (the state before the action), as in DeepSpeed-Chat and OpenRLHF.

Generation under ZeRO-3: each rank holds a shard of the actor, so every forward is collective.
Either all ranks step together (`generate(synced_gpus=True)`: a rank that finished keeps running
dummy forwards until all have), or the parameters are gathered once for the whole generation batch
and the ZeRO hooks removed (DeepSpeed's `unwrap_model_for_generation`, what TRL does): ranks then
generate independently, much faster, as long as one full copy of the actor fits on a device.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, fields

import torch

from forgepipe.config import PPOConfig
from forgepipe.data.collate import pad
from forgepipe.models.load import logits_at
from forgepipe.models.reward_model import last_token_scores
from forgepipe.stages.ppo.losses import gae, logprobs_from_logits, masked_whiten, shaped_rewards

# ---------------------------------------------------------------------------
# Pure helpers (tensors in, tensors out)


def response_mask(response_ids: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """[B, R] generated ids -> long mask: 1 up to and including each row's first EOS, 0 after.

    Judged by EOS only, never by the pad id: a model may sample the pad token as a real token, and
    what `generate` writes after a finished row is padding whatever its id.
    """
    is_eos = (response_ids == eos_token_id).long()
    eos_before = is_eos.cumsum(dim=1) - is_eos  # EOS tokens strictly before each position
    return (eos_before == 0).long()


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that count real tokens only, so a left-padded prompt starts at 0 (as `generate` does)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def response_slice(per_position: torch.Tensor, prompt_len: int) -> torch.Tensor:
    """[B, T, ...] outputs at every position -> [B, R, ...] at the positions that predict the response."""
    return per_position[:, prompt_len - 1 : -1]


def _device(model) -> torch.device:
    device = getattr(model, "device", None)
    return device if isinstance(device, torch.device) else next(model.parameters()).device


def wall_clock(device: torch.device) -> float:
    """perf_counter once the device has finished its queued work: a GPU runs asynchronously, so
    a phase's time is only honest after a sync (once per phase, never per micro-batch)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _chunks(n: int, size: int) -> list[slice]:
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def rows_per_forward(length: int, tokens: int) -> int:
    """Rows of `length` tokens a scoring forward takes within a budget of `tokens` (at least one)."""
    return max(1, tokens // max(length, 1))


def agreed_length(sequences: torch.Tensor) -> int:
    """The longest sequence length over ranks: every rank then cuts its rows into the same number of
    scoring forwards (ZeRO-3's forwards are collective). One small all-reduce per experience batch."""
    from forgepipe import distributed

    return int(distributed.all_reduce(torch.tensor([float(sequences.shape[1])], device=sequences.device), "max"))


# ---------------------------------------------------------------------------
# Model calls


def actor_logprobs(actor, sequences: torch.Tensor, attention_mask: torch.Tensor, prompt_len: int,
                   temperature: float = 1.0) -> torch.Tensor:
    """[B, R] log-probabilities of the response tokens under a causal LM (engine or module).

    The logits are divided by the sampling temperature, so that log-probs describe the
    distribution the tokens were actually sampled from (OpenRLHF does the same).
    """
    keep = sequences.shape[1] - prompt_len + 1  # the positions that predict the response, and the last
    inputs = {"input_ids": sequences, "attention_mask": attention_mask,
              "position_ids": position_ids_from_mask(attention_mask), "use_cache": False}
    logits = logits_at(actor, inputs, keep)[:, :-1]  # = response_slice(all logits, prompt_len)
    if temperature != 1.0:
        logits = logits / temperature
    return logprobs_from_logits(logits, sequences[:, prompt_len:])


def critic_values(critic, sequences: torch.Tensor, attention_mask: torch.Tensor, prompt_len: int) -> torch.Tensor:
    """[B, R] value of the state before each response token (a ScalarHeadModel, or its engine)."""
    return response_slice(critic(input_ids=sequences, attention_mask=attention_mask), prompt_len)


def retokenize(sequences: torch.Tensor, attention_mask: torch.Tensor, actor_tokenizer, reward_tokenizer,
               device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Actor ids -> text -> reward-model ids (right-padded, EOS appended as in stage-2 training).

    Only for `--allow-tokenizer-mismatch`: special tokens are dropped in the round trip.
    """
    texts = [actor_tokenizer.decode(row[mask.bool()].tolist(), skip_special_tokens=True)
             for row, mask in zip(sequences.cpu(), attention_mask.cpu(), strict=True)]
    eos = reward_tokenizer.eos_token_id
    ids = [row + [eos] for row in reward_tokenizer(texts, add_special_tokens=False)["input_ids"]]
    input_ids = pad(ids, reward_tokenizer.pad_token_id, "right")
    mask = pad([[1] * len(r) for r in ids], 0, "right")
    return input_ids.to(device), mask.to(device)


@torch.no_grad()
def reward_scores(reward, sequences: torch.Tensor, attention_mask: torch.Tensor, *,
                  actor_tokenizer=None, reward_tokenizer=None) -> torch.Tensor:
    """[B] reward-model score of each full sequence, read at its last real token."""
    if reward_tokenizer is not None:
        sequences, attention_mask = retokenize(sequences, attention_mask, actor_tokenizer, reward_tokenizer,
                                               _device(reward))
    values = reward(input_ids=sequences, attention_mask=attention_mask)
    return last_token_scores(values, attention_mask)


@contextlib.contextmanager
def generation_context(actor, gather: bool):
    """Eval mode, and under ZeRO-3 with `gather`, the whole actor gathered with its ZeRO hooks off."""
    module = getattr(actor, "module", actor)
    was_training = module.training
    module.eval()
    try:
        if gather:
            from deepspeed.runtime.zero import unwrap_model_for_generation

            with unwrap_model_for_generation(actor):
                yield module
        else:
            yield module
    finally:
        module.train(was_training)


@torch.no_grad()
def generate(actor, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, eos_token_id: int,
             pad_token_id: int, max_new_tokens: int, temperature: float, top_p: float,
             synced_gpus: bool = False, gather: bool = False, greedy: bool = False) -> torch.Tensor:
    """[B, P + R] prompt + sampled (or, with `greedy`, greedy) response (R <= max_new_tokens; finished
    rows padded), through the rollout engine (rollout.py), for the callers that want sequences only:
    evaluation tables, SFT/DPO generations, chat. A sampled call takes its seed from torch's global
    stream, so a caller that seeds it (evaluation, under fork_rng) gets the same answers every time."""
    from forgepipe.rollout import RolloutEngine, SamplingSettings

    seed = 0 if greedy else int(torch.randint(0, 2**31, (1,)))
    engine = RolloutEngine(actor, eos_token_id=eos_token_id, pad_token_id=pad_token_id, seed=seed, gather=gather,
                           synced=synced_gpus and not gather)
    settings = SamplingSettings(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, greedy=greedy)
    return engine.generate(input_ids, attention_mask, settings, call=0).sequences


# ---------------------------------------------------------------------------
# The experience batch


@dataclass
class Experience:
    """One batch of sampled responses with everything PPO needs; per-token fields are [B, R]."""

    sequences: torch.Tensor  # [B, P + R] prompt + response ids
    attention_mask: torch.Tensor  # [B, P + R] prompt padding and tokens after EOS are 0
    action_mask: torch.Tensor  # [B, R] 1 on response tokens up to and including the first EOS
    logp_old: torch.Tensor  # actor log-probs when sampled
    logp_ref: torch.Tensor  # reference log-probs
    values_old: torch.Tensor  # critic values when sampled
    rewards: torch.Tensor  # KL-shaped per-token rewards
    advantages: torch.Tensor  # GAE advantages (whitened when configured)
    returns: torch.Tensor  # critic targets
    scores: torch.Tensor  # [B] reward-model scores (before clipping)
    response_lengths: torch.Tensor  # [B] tokens in each response
    prompt_len: int  # P, the padded prompt length
    generation_s: float = 0.0  # seconds spent in generate()
    scoring_s: float = 0.0  # seconds spent in the actor/ref/critic/reward forwards
    logp_rollout: torch.Tensor | None = None  # [B, R] the sampler's own log-probs (rollout.py): its drift from logp_old

    def __len__(self) -> int:
        return self.sequences.shape[0]

    def select(self, index: torch.Tensor | slice) -> Experience:
        """The rows in `index` (a PPO micro-batch)."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return Experience(**{k: v[index] if torch.is_tensor(v) else v for k, v in values.items()})


@torch.no_grad()
def make_experience(actor, critic, ref, reward, prompts: dict[str, torch.Tensor], *, ppo: PPOConfig,
                    eos_token_id: int, pad_token_id: int, forward_batch_size: int | None = None,
                    forward_tokens: int | None = None,
                    synced_gpus: bool = False, gather: bool = False, actor_tokenizer=None,
                    reward_tokenizer=None, rollout=None, call: int | None = None) -> Experience:
    """Sample responses to `prompts` (left-padded input_ids/attention_mask) through the rollout engine
    (`rollout`, else one made here; `call` seeds its draw: the PPO step, so a resumed run samples what an
    uninterrupted one would) and score them.

    `reward_tokenizer` is given only when it differs from the actor's: the reward model then
    reads re-tokenized text. The scoring forwards (actor, reference, critic, reward) run over the whole
    rollout in chunks of `forward_tokens` tokens (--scoring-tokens: as many rows as fit at the longest
    length over ranks), else of `forward_batch_size` rows; every rank runs the same number, which
    ZeRO-3 needs.
    """
    from forgepipe.rollout import RolloutEngine, SamplingSettings

    device = _device(actor)
    prompt_ids = prompts["input_ids"].to(device)
    prompt_mask = prompts["attention_mask"].to(device)
    prompt_len = prompt_ids.shape[1]
    if rollout is None:
        rollout = RolloutEngine(actor, eos_token_id=eos_token_id, pad_token_id=pad_token_id, gather=gather,
                                synced=synced_gpus and not gather)

    start = wall_clock(device)
    sampled = rollout.generate(prompt_ids, prompt_mask, SamplingSettings(
        max_new_tokens=ppo.max_new_tokens, temperature=ppo.temperature, top_p=ppo.top_p,
        check_every=ppo.rollout_check_every), call=call)
    generation_s = wall_clock(device) - start

    start = wall_clock(device)
    sequences, action_mask, attention_mask = sampled.sequences, sampled.action_mask, sampled.attention_mask
    for model in (actor, critic):
        model.eval()
    parts: dict[str, list[torch.Tensor]] = {"logp_old": [], "logp_ref": [], "values_old": [], "scores": []}
    if forward_tokens:
        forward_batch_size = rows_per_forward(agreed_length(sequences), forward_tokens)
    for rows in _chunks(len(sequences), forward_batch_size or len(sequences)):
        seq, mask = sequences[rows], attention_mask[rows]
        parts["logp_old"].append(actor_logprobs(actor, seq, mask, prompt_len, ppo.temperature))
        parts["logp_ref"].append(actor_logprobs(ref, seq, mask, prompt_len, ppo.temperature))
        parts["values_old"].append(critic_values(critic, seq, mask, prompt_len).float())
        parts["scores"].append(reward_scores(reward, seq, mask, actor_tokenizer=actor_tokenizer,
                                             reward_tokenizer=reward_tokenizer).float().to(device))
    logp_old, logp_ref, values_old, scores = (torch.cat(parts[k]) for k in parts)

    rewards = shaped_rewards(scores, logp_old, logp_ref, action_mask, ppo.kl_coef, ppo.reward_clip)
    advantages, returns = gae(rewards, values_old, action_mask, ppo.gamma, ppo.lam)
    if ppo.whiten_advantages:
        advantages = masked_whiten(advantages, action_mask)
    return Experience(
        sequences=sequences, attention_mask=attention_mask, action_mask=action_mask, logp_old=logp_old,
        logp_ref=logp_ref, values_old=values_old, rewards=rewards, advantages=advantages, returns=returns,
        scores=scores, logp_rollout=sampled.logprobs, response_lengths=action_mask.sum(dim=1), prompt_len=prompt_len,
        generation_s=generation_s, scoring_s=wall_clock(device) - start,
    )

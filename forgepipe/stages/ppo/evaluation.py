"""PPO evaluation on held-out prompts: is the policy better than where it started, and how far has it moved?

Every --eval-every steps and at the end, on the held-out share of the PPO split (at most
`ppo.eval_prompts` prompts): the policy answers each prompt greedily and by sampling (PPO's
temperature and top-p), the reference (the frozen starting policy) answers greedily, and the
reward model scores every answer. Logged (`EVAL_METRICS`): mean scores, the win rate of the
policy's greedy answer over the reference's (a tie counts half), the KL of the sampled answers to
the reference (their summed log-ratio: an unbiased estimate of KL(policy || reference) per
response, and per response token, as `ppo/kl` in training), and mean response lengths (tokens up
to and including EOS). A table of prompts with both models' answers and their scores goes to
MLflow (`mlflow.log_table`), and a few rows to the console.

The reference is frozen, so its answers are generated and scored once and kept on the device.
Every rank evaluates its own prompts, the same number of batches on every rank (`eval_batches`),
as ZeRO-3's collective forwards need; the sums stay on the device and cross to the host once.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from forgepipe import distributed as dist
from forgepipe.data.collate import PromptCollator
from forgepipe.generation import clip, decode_responses, log_table
from forgepipe.loop import eval_batches
from forgepipe.stages.ppo.experience import (
    _chunks,
    _device,
    actor_logprobs,
    generate,
    response_mask,
    reward_scores,
)

log = logging.getLogger(__name__)

TABLE_FILE = "ppo_eval/generations.json"
CONSOLE_ROWS = 3
EVAL_SUMS = ("prompts", "score", "ref_score", "win", "response_len", "ref_response_len", "sampled_score",
             "sampled_response_len", "kl")


# ---------------------------------------------------------------------------
# Pure figures (tested against hand-worked numbers)


def win_points(policy: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """[B] 1 where the policy's answer scores above the reference's, 0.5 on a tie, 0 below."""
    return (policy > reference).float() + 0.5 * (policy == reference).float()


def sequence_kl(logp: torch.Tensor, logp_ref: torch.Tensor, action_mask: torch.Tensor) -> torch.Tensor:
    """[B] summed log-ratio log p(t) - log p_ref(t) over each sampled response's tokens: its mean
    over responses sampled from the policy estimates KL(policy || reference) per response."""
    return ((logp.float() - logp_ref.float()) * action_mask).sum(dim=-1)


def eval_metrics(sums: dict[str, float]) -> dict[str, float]:
    """The logged figures from sums over every evaluated prompt (EVAL_SUMS)."""
    n = max(sums["prompts"], 1.0)
    return {
        "ppo/eval_score": sums["score"] / n,  # greedy answers
        "ppo/eval_ref_score": sums["ref_score"] / n,
        "ppo/eval_win_rate": sums["win"] / n,
        "ppo/eval_response_len": sums["response_len"] / n,
        "ppo/eval_ref_response_len": sums["ref_response_len"] / n,
        "ppo/eval_sampled_score": sums["sampled_score"] / n,
        "ppo/eval_sampled_response_len": sums["sampled_response_len"] / n,
        "ppo/eval_kl": sums["kl"] / n,  # nats per sampled response
        "ppo/eval_kl_per_token": sums["kl"] / max(sums["sampled_response_len"], 1.0),
    }


# ---------------------------------------------------------------------------
# Answers of one model to one batch of prompts


@dataclass
class Answers:
    sequences: torch.Tensor  # [B, P + R] prompt + answer
    attention_mask: torch.Tensor  # [B, P + R] 0 on prompt padding and after EOS
    action_mask: torch.Tensor  # [B, R] 1 up to and including the first EOS
    scores: torch.Tensor  # [B] reward-model scores


@dataclass
class EvalSettings:
    """What evaluation needs of the run: token ids, decoding and batching."""

    eos_token_id: int
    pad_token_id: int
    max_new_tokens: int
    temperature: float
    top_p: float
    batch_size: int  # prompts per rank per generation call
    forward_batch_size: int  # rows per scoring forward
    table_rows: int  # rows of rank 0's prompts in the MLflow table
    seed: int  # of the sampled answers (with the step), apart from training's random stream
    gather: bool  # ZeRO-3: gather the weights once per generation call
    synced_gpus: bool  # ZeRO-3 without gathering: ranks step together
    reward_kwargs: dict[str, Any]  # re-tokenization for a reward model with another tokenizer


def answer(model, reward, prompts: dict[str, torch.Tensor], s: EvalSettings, *, greedy: bool) -> Answers:
    """`model`'s answers to left-padded prompts on its device, scored by `reward`. Collective under ZeRO-3."""
    prompt_len = prompts["input_ids"].shape[1]
    zero3 = getattr(model, "zero_optimization_partition_weights", lambda: False)()  # the ref may be at another stage
    sequences = generate(model, prompts["input_ids"], prompts["attention_mask"], eos_token_id=s.eos_token_id,
                         pad_token_id=s.pad_token_id, max_new_tokens=s.max_new_tokens, temperature=s.temperature,
                         top_p=s.top_p, synced_gpus=s.synced_gpus and zero3, gather=s.gather and zero3, greedy=greedy)
    action_mask = response_mask(sequences[:, prompt_len:], s.eos_token_id)
    attention_mask = torch.cat([prompts["attention_mask"].long(), action_mask], dim=1)
    scores = torch.cat([reward_scores(reward, sequences[rows], attention_mask[rows], **s.reward_kwargs).float()
                        .to(sequences.device) for rows in _chunks(len(sequences), s.forward_batch_size)])
    return Answers(sequences, attention_mask, action_mask, scores)


@torch.no_grad()
def sampled_kl(actor, ref, sampled: Answers, temperature: float, forward_batch_size: int) -> torch.Tensor:
    """[B] sequence_kl of the sampled answers, log-probs at the sampling temperature (as in training)."""
    prompt_len = sampled.sequences.shape[1] - sampled.action_mask.shape[1]
    parts = []
    for rows in _chunks(len(sampled.sequences), forward_batch_size):
        seq, mask = sampled.sequences[rows], sampled.attention_mask[rows]
        parts.append(sequence_kl(actor_logprobs(actor, seq, mask, prompt_len, temperature),
                                 actor_logprobs(ref, seq, mask, prompt_len, temperature),
                                 sampled.action_mask[rows]))
    return torch.cat(parts)


def full_batch(indices: list[int], weight: float, size: int) -> tuple[list[int], list[float]]:
    """An eval batch filled up to `size` rows with weight-0 copies of its first row, so that every
    rank runs the same generation and forward calls (ZeRO-3) whatever its share of the prompts."""
    fill = size - len(indices)
    return indices + indices[:1] * fill, [weight] * len(indices) + [0.0] * fill


def batch_sums(w: torch.Tensor, greedy: Answers, sampled: Answers, ref: Answers, kl: torch.Tensor
               ) -> dict[str, torch.Tensor]:
    """Row-weighted sums of one batch (EVAL_SUMS), tensors on the device."""
    return {
        "prompts": w.sum(),
        "score": (w * greedy.scores).sum(),
        "ref_score": (w * ref.scores).sum(),
        "win": (w * win_points(greedy.scores, ref.scores)).sum(),
        "response_len": (w * greedy.action_mask.sum(-1)).sum(),
        "ref_response_len": (w * ref.action_mask.sum(-1)).sum(),
        "sampled_score": (w * sampled.scores).sum(),
        "sampled_response_len": (w * sampled.action_mask.sum(-1)).sum(),
        "kl": (w * kl).sum(),
    }


class PolicyEvaluation:
    """The stage's `evaluate(step)`: metrics and table on the held-out prompts; keeps the
    reference's answers (its weights never change) for the next evaluation."""

    def __init__(self, prompts, actor, ref, reward, tokenizer, settings: EvalSettings, world: dist.World, tracker):
        self.prompts, self.tokenizer, self.s, self.world, self.tracker = prompts, tokenizer, settings, world, tracker
        self.actor, self.ref, self.reward = actor, ref, reward
        self.collate = PromptCollator(tokenizer.pad_token_id)
        self.reference: dict[int, Answers] = {}

    @torch.no_grad()
    def __call__(self, step: int) -> dict[str, float]:
        """Collective. Sampling draws from its own generator state (seed, step, rank), restored
        afterwards: training's random stream is the same with or without evaluations."""
        device = _device(self.actor)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(self.s.seed * 1_000_003 + step * 1_009 + self.world.rank)
            return self._evaluate(step, device)

    def _evaluate(self, step: int, device: torch.device) -> dict[str, float]:
        s = self.s
        self.actor.eval()  # the next PPO update sets train mode again
        totals = {k: torch.zeros((), dtype=torch.float64, device=device) for k in EVAL_SUMS}
        shown: list[tuple] = []
        batches = eval_batches(len(self.prompts), self.world.rank, self.world.world_size, s.batch_size)
        for b, (idx, weight) in enumerate(batches):
            rows, row_weights = full_batch(idx, weight, s.batch_size)
            prompts = {k: v.to(device) for k, v in self.collate([self.prompts[i] for i in rows]).items()}
            greedy = answer(self.actor, self.reward, prompts, s, greedy=True)
            sampled = answer(self.actor, self.reward, prompts, s, greedy=False)
            if b not in self.reference:
                self.reference[b] = answer(self.ref, self.reward, prompts, s, greedy=True)
            kl = sampled_kl(self.actor, self.ref, sampled, s.temperature, s.forward_batch_size)
            w = torch.tensor(row_weights, dtype=torch.float64).to(device, non_blocking=True)
            for k, v in batch_sums(w, greedy, sampled, self.reference[b], kl).items():
                totals[k] += v
            if weight and sum(n for *_, n in shown) < s.table_rows:
                shown.append((prompts, greedy, sampled, self.reference[b], len(idx)))
        metrics = eval_metrics(dict(zip(EVAL_SUMS, dist.all_reduce_sum([totals[k] for k in EVAL_SUMS]),
                                        strict=True)))
        self.tracker.log_metrics(metrics, step=step)
        self.report(shown, step)
        return metrics

    def report(self, shown: list[tuple], step: int) -> None:
        """The generations table to MLflow and its first rows to the console (where the tracker records)."""
        if not self.tracker.enabled or not shown or self.s.table_rows <= 0:
            return
        table = generations_table(self.tokenizer, shown, self.s.table_rows)
        log_table(self.tracker, table, TABLE_FILE, step)
        for i in range(min(CONSOLE_ROWS, len(table["prompt"]))):
            log.info("eval step %d, prompt %s\n  policy    (%+.3f): %s\n  reference (%+.3f): %s", step,
                     clip(table["prompt"][i]), table["policy_score"][i], clip(table["policy"][i]),
                     table["reference_score"][i], clip(table["reference"][i]))


def generations_table(tokenizer, shown: list[tuple], limit: int) -> dict[str, list]:
    """Columns of the MLflow table: prompt, the policy's greedy and sampled answers, the reference's
    greedy answer, and their reward-model scores (the real rows of rank 0's first batches)."""
    table: dict[str, list] = {k: [] for k in ("prompt", "policy", "policy_score", "reference", "reference_score",
                                              "policy_sampled", "sampled_score")}
    for prompts, greedy, sampled, ref, real in shown:
        prompt_len = prompts["input_ids"].shape[1]
        ids, mask = prompts["input_ids"][:real].tolist(), prompts["attention_mask"][:real].tolist()
        table["prompt"] += [tokenizer.decode([t for t, m in zip(r, k, strict=True) if m], skip_special_tokens=True)
                            for r, k in zip(ids, mask, strict=True)]
        for name, answers in (("policy", greedy), ("reference", ref), ("policy_sampled", sampled)):
            table[name] += decode_responses(tokenizer, answers.sequences[:real], prompt_len)
        scores = torch.stack([greedy.scores[:real], ref.scores[:real], sampled.scores[:real]]).tolist()
        for name, values in zip(("policy_score", "reference_score", "sampled_score"), scores, strict=True):
            table[name] += [round(v, 4) for v in values]
    return {k: v[:limit] for k, v in table.items()}

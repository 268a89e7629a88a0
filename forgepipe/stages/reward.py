"""Stage 2: a reward model (causal-LM backbone + scalar head) trained on chosen/rejected pairs.

The score of a sequence is the head's value at its last real token, the end-of-sequence token
the template appends (TRL/OpenRLHF convention; DeepSpeed-Chat averaged over the tokens where the
two answers diverge). The loss is Bradley-Terry: -logsigmoid(score_chosen - score_rejected [- margin]).
The export is a transformers sequence-classification model with one label, which stage 3 loads as
both the reward model and the critic's starting point. The recipe around this stage's own parts
is stages/supervised.py.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from forgepipe.config import Config
from forgepipe.data.chat_template import ChatRender
from forgepipe.data.collate import PairCollator
from forgepipe.data.tokenize import tokenize_pairs
from forgepipe.generation import clip, log_table
from forgepipe.layout import StageResult
from forgepipe.models.attention import forward_mask
from forgepipe.models.load import LoraSettings
from forgepipe.models.reward_model import last_token_scores, load_scalar_model
from forgepipe.stages.supervised import Prepared, SupervisedStage, evaluation_sums, run_supervised

log = logging.getLogger(__name__)

TABLE_FILE = "reward_eval/pairs.json"
CONSOLE_ROWS = 3


def pairwise_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | None = None) -> torch.Tensor:
    """Bradley-Terry: mean of -log sigmoid(chosen - rejected - margin), in float32 whatever the
    model's dtype (a bf16 difference of two close scores is mostly rounding)."""
    diff = chosen.float() - rejected.float()
    if margin is not None:
        diff = diff - margin.float()
    return -F.logsigmoid(diff).mean()


def pair_scores(engine, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores of the B chosen rows and the B rejected rows of a PairCollator batch."""
    values = engine(input_ids=batch["input_ids"], attention_mask=forward_mask(batch))  # None: causal only
    scores = last_token_scores(values, batch["attention_mask"])
    half = scores.shape[0] // 2
    return scores[:half], scores[half:]


def reward_loss(engine, batch):
    chosen, rejected = pair_scores(engine, batch)
    loss = pairwise_loss(chosen, rejected, batch.get("margin"))
    return loss, {"accuracy": (chosen > rejected).float().mean()}  # a device tensor: no sync here


def _pair_sums(engine, host, batch) -> list:
    """[chosen above rejected, chosen score sum, rejected score sum, pairs], in float64."""
    chosen, rejected = (s.double() for s in pair_scores(engine, batch))
    return [(chosen > rejected).double().sum(), chosen.sum(), rejected.sum(), float(host["input_ids"].shape[0] // 2)]


def evaluate_reward(engine, data, collate, batch_size: int, world) -> dict[str, float]:
    """Held-out accuracy (chosen scored above rejected), mean scores and their gap."""
    correct, chosen_sum, rejected_sum, count = evaluation_sums(engine, data, collate, batch_size, world, _pair_sums)
    count = max(count, 1.0)
    return {
        "eval/accuracy": correct / count,
        "eval/chosen_score": chosen_sum / count,
        "eval/rejected_score": rejected_sum / count,
        "eval/score_gap": (chosen_sum - rejected_sum) / count,
    }


def prepare(cfg: Config, tokenizer, train_raw, eval_raw, cache_dir: str) -> Prepared:
    d, margin = cfg.data, cfg.reward.margin_field
    sources = ", ".join(d.sources)
    chat = ChatRender.of(tokenizer)  # the score is read at the template's end-of-turn token

    def tokenize(rows):
        return tokenize_pairs(rows, tokenizer, d.max_seq_len, d.max_prompt_len, cache_dir, margin_field=margin,
                              source=sources, chat=chat)

    train, dropped = tokenize(train_raw)
    held_out, eval_dropped = tokenize(eval_raw) if len(eval_raw) else (None, 0)
    collate = PairCollator(tokenizer.pad_token_id, d.pad_to_multiple_of, padding_mask=cfg.train.padding_mask)
    return Prepared(train, held_out, collate,
                    {"data.train_pairs": len(train), "data.eval_pairs": len(held_out or []),
                     "data.identical_pairs_dropped": dropped + eval_dropped})


def build_model(cfg: Config, path: str, tokenizer, gradient_checkpointing: bool):
    return load_scalar_model(path, dtype=cfg.train.dtype, tokenizer=tokenizer, gradient_checkpointing=gradient_checkpointing,
                             lora=LoraSettings.from_model_config(cfg.model), trust_remote_code=cfg.model.trust_remote_code,
                             attn_implementation=cfg.model.attn_implementation)


def split_pair(chosen: list[int], rejected: list[int]) -> tuple[list[int], list[int], list[int]]:
    """(shared prefix, chosen rest, rejected rest) of a tokenized pair: the prompt as far as the
    two sides agree (a response may begin with the same words), then what differs."""
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    return chosen[:n], chosen[n:], rejected[n:]


@torch.no_grad()
def show_scores(engine, data, cfg: Config, tokenizer, tracker, step: int) -> None:
    """The first held-out pairs with both scores: an MLflow table (reward_eval/pairs.json) and a
    few console lines. Every rank scores the same pairs (a forward is collective under ZeRO-3)."""
    limit = cfg.train.eval_generations
    examples = [data[i] for i in range(min(len(data), limit))]
    if not examples:
        return
    engine.eval()
    batch = PairCollator(tokenizer.pad_token_id)(examples)
    chosen, rejected = pair_scores(engine, {k: v.to(engine.device) for k, v in batch.items()})
    if not tracker.enabled:
        return
    scores = torch.stack([chosen.float(), rejected.float()]).tolist()  # the one transfer
    parts = [split_pair(e["chosen_input_ids"], e["rejected_input_ids"]) for e in examples]
    table = {name: [tokenizer.decode(p[k], skip_special_tokens=True) for p in parts]
             for k, name in enumerate(("prompt", "chosen", "rejected"))}
    table |= {"chosen_score": [round(v, 4) for v in scores[0]], "rejected_score": [round(v, 4) for v in scores[1]],
              "correct": [c > r for c, r in zip(*scores, strict=True)]}
    log_table(tracker, table, TABLE_FILE, step)
    for i in range(min(CONSOLE_ROWS, len(examples))):
        log.info("eval step %d, prompt %s\n  chosen   (%+.3f): %s\n  rejected (%+.3f): %s", step,
                 clip(table["prompt"][i]), scores[0][i], clip(table["chosen"][i]), scores[1][i],
                 clip(table["rejected"][i]))


REWARD = SupervisedStage("reward", prepare=prepare, build_model=build_model, loss=reward_loss, evaluate=evaluate_reward,
                         keep_fields=lambda cfg: [cfg.reward.margin_field] if cfg.reward.margin_field else [],
                         show=show_scores)


def run_reward(cfg: Config, parent_run_id: str | None = None) -> StageResult:
    """Train and export the reward model; returns the export directory."""
    return run_supervised(REWARD, cfg, parent_run_id)

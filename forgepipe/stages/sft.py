"""Stage 1: supervised fine-tuning of a causal LM on prompt -> response pairs (and plain documents).

Loss is on response tokens only (and on every token of {text} documents), never on padding.
What is SFT's own: tokenization (and packing), the causal-LM model, the LM loss and perplexity;
the recipe around them is stages/supervised.py.
"""

from __future__ import annotations

import math

from forgepipe.config import Config
from forgepipe.layout import StageResult
from forgepipe.data.collate import SFTCollator, pack_sequences
from forgepipe.data.tokenize import tokenize_sft
from forgepipe.models.load import LoraSettings, load_causal_lm
from forgepipe.stages.supervised import Prepared, SupervisedStage, evaluation_sums, run_supervised


def lm_loss(engine, batch):
    out = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                 labels=batch["labels"], **({"position_ids": batch["position_ids"]} if "position_ids" in batch else {}))
    return out.loss, {}


def _lm_sums(engine, host, batch) -> list:
    """[summed token NLL, tokens]: the loss is a mean over the batch's predicted tokens, counted on the host."""
    n = float((host["labels"][:, 1:] != -100).sum())
    out = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
    return [out.loss.detach().double() * n, n]


def evaluate_lm(engine, data, collate, batch_size: int, world) -> dict[str, float]:
    """Token-weighted eval loss and perplexity over the whole held-out share."""
    nll, tokens = evaluation_sums(engine, data, collate, batch_size, world, _lm_sums)
    loss = nll / max(tokens, 1.0)
    return {"eval/loss": loss, "eval/perplexity": math.exp(min(loss, 50.0))}


def prepare(cfg: Config, tokenizer, train_raw, eval_raw, cache_dir: str) -> Prepared:
    d = cfg.data
    train = tokenize_sft(train_raw, tokenizer, d.max_seq_len, d.max_prompt_len, cache_dir)
    held_out = tokenize_sft(eval_raw, tokenizer, d.max_seq_len, d.max_prompt_len, cache_dir) if len(eval_raw) else None
    if d.packing:
        train = pack_sequences(train, d.max_seq_len)
    return Prepared(train, held_out, SFTCollator(tokenizer.pad_token_id),
                    {"data.train_samples": len(train), "data.eval_samples": len(held_out) if held_out else 0})


def build_model(cfg: Config, path: str, tokenizer, gradient_checkpointing: bool):
    return load_causal_lm(path, dtype=cfg.train.dtype, tokenizer=tokenizer, gradient_checkpointing=gradient_checkpointing,
                          lora=LoraSettings.from_model_config(cfg.model), trust_remote_code=cfg.model.trust_remote_code)


SFT = SupervisedStage("sft", prepare=prepare, build_model=build_model, loss=lm_loss, evaluate=evaluate_lm)


def run_sft(cfg: Config, parent_run_id: str | None = None) -> StageResult:
    """Train and export; returns the exported model directory."""
    return run_supervised(SFT, cfg, parent_run_id)

"""Stage 1: supervised fine-tuning of a causal LM on prompt -> response pairs (and plain documents).

Loss is on response tokens only (and on every token of {text} documents), never on padding.
What is SFT's own: tokenization (and packing), the causal-LM model, the LM loss and perplexity;
the recipe around them is stages/supervised.py.
"""

from __future__ import annotations

import logging
import math

import torch.nn.functional as F

from forgepipe.config import Config
from forgepipe.data.chat_template import ChatRender
from forgepipe.data.collate import SFTCollator, pack_sequences
from forgepipe.data.tokenize import IGNORE_INDEX, tokenize_sft
from forgepipe.generation import clip, generate_for_ids, log_table
from forgepipe.layout import StageResult
from forgepipe.models.attention import forward_mask
from forgepipe.models.load import LoraSettings, load_causal_lm, logits_at
from forgepipe.stages.supervised import Prepared, SupervisedStage, evaluation_sums, run_supervised

log = logging.getLogger(__name__)

TABLE_FILE = "sft_eval/generations.json"
CONSOLE_ROWS = 3


def model_inputs(batch) -> dict:
    """The forward's arguments for a collated SFT batch. A packed batch (it has position_ids)
    goes without its 2D attention mask: transformers then builds the block-diagonal causal mask
    from the restarting position_ids (eager and sdpa; flash attention reads them as varlen), so
    no packed sample attends to the one before it. It only does so without a KV cache, which
    training never needs. A right-padded batch goes with its mask only under --padding-mask
    (`forward_mask`: the causal mask alone is exact there, and lets SDPA use its flash kernels)."""
    if "position_ids" in batch:
        return {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "use_cache": False}
    mask = forward_mask(batch)
    return {"input_ids": batch["input_ids"], "use_cache": False} | ({} if mask is None else {"attention_mask": mask})


def lm_loss(engine, batch):
    """Mean next-token loss over the labelled tokens. The LM head runs only at the positions that
    predict one (`predicted_positions`; for a model without `logits_to_keep`, all logits are
    computed and those picked): on chat data most positions are prompt or padding, and at a 50k
    vocabulary the head and its softmax are a fifth of a small model's FLOPs and its largest
    activation."""
    targets = batch["predict_labels"]
    logits = logits_at(engine, model_inputs(batch), batch["predict_positions"])  # [B, K, V]
    loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX)
    return loss, {}


def _lm_sums(engine, host, batch) -> list:
    """[summed token NLL, tokens]: the loss is a mean over the batch's predicted tokens, counted on the host."""
    n = float((host["predict_labels"] != IGNORE_INDEX).sum())
    return [lm_loss(engine, batch)[0].detach().double() * n, n]


def evaluate_lm(engine, data, collate, batch_size: int, world) -> dict[str, float]:
    """Token-weighted eval loss and perplexity over the whole held-out share."""
    nll, tokens = evaluation_sums(engine, data, collate, batch_size, world, _lm_sums)
    loss = nll / max(tokens, 1.0)
    return {"eval/loss": loss, "eval/perplexity": math.exp(min(loss, 50.0))}


def prepare(cfg: Config, tokenizer, train_raw, eval_raw, cache_dir: str) -> Prepared:
    d = cfg.data
    chat = ChatRender.of(tokenizer, d.train_on_all_turns)
    train = tokenize_sft(train_raw, tokenizer, d.max_seq_len, d.max_prompt_len, cache_dir, chat=chat)
    held_out = (tokenize_sft(eval_raw, tokenizer, d.max_seq_len, d.max_prompt_len, cache_dir, chat=chat)
                if len(eval_raw) else None)
    if d.packing:
        train = pack_sequences(train, d.max_seq_len)
    collate = SFTCollator(tokenizer.pad_token_id, d.pad_to_multiple_of, padding_mask=cfg.train.padding_mask)
    return Prepared(train, held_out, collate,
                    {"data.train_samples": len(train), "data.eval_samples": len(held_out) if held_out else 0})


def build_model(cfg: Config, path: str, tokenizer, gradient_checkpointing: bool):
    return load_causal_lm(path, dtype=cfg.train.dtype, tokenizer=tokenizer, gradient_checkpointing=gradient_checkpointing,
                          lora=LoraSettings.from_model_config(cfg.model), trust_remote_code=cfg.model.trust_remote_code,
                          attn_implementation=cfg.model.attn_implementation)


def prompt_and_answer(example: dict) -> tuple[list[int], list[int]] | None:
    """(prompt ids, held-out answer ids with EOS) of a tokenized SFT example: the answer is the last
    run of trained tokens (the final turn, also with --train-on-all-turns); None for a document
    (loss on every token: no prompt to answer)."""
    labels = example["labels"]
    cut = max((i + 1 for i, label in enumerate(labels[:-1]) if label == IGNORE_INDEX and labels[i + 1] != IGNORE_INDEX),
              default=0)
    return (example["input_ids"][:cut], example["input_ids"][cut:]) if cut else None


def show_generations(engine, data, cfg: Config, tokenizer, tracker, step: int) -> None:
    """The model's greedy answers to the first held-out prompts beside the data's own answers:
    an MLflow table (sft_eval/generations.json) and a few console lines. Every rank generates for
    the same prompts (each generate call is collective under ZeRO-3); rank 0's tracker records."""
    limit = cfg.train.eval_generations
    pairs = [pa for pa in (prompt_and_answer(data[i]) for i in range(min(len(data), 4 * limit))) if pa][:limit]
    if not pairs:
        return
    answers = generate_for_ids(engine, tokenizer, [{"prompt_input_ids": p} for p, _ in pairs],
                               max_new_tokens=cfg.train.eval_max_new_tokens,
                               batch_size=cfg.train.per_device_batch_size,
                               gather=engine.zero_optimization_partition_weights())
    if not tracker.enabled:
        return
    table = {"prompt": [tokenizer.decode(p, skip_special_tokens=True) for p, _ in pairs],
             "reference": [tokenizer.decode(a, skip_special_tokens=True) for _, a in pairs], "response": answers}
    log_table(tracker, table, TABLE_FILE, step)
    for prompt, answer in list(zip(table["prompt"], answers, strict=True))[:CONSOLE_ROWS]:
        log.info("eval step %d, prompt %s\n  model: %s", step, clip(prompt), clip(answer))


SFT = SupervisedStage("sft", prepare=prepare, build_model=build_model, loss=lm_loss, evaluate=evaluate_lm,
                      show=show_generations)


def run_sft(cfg: Config, parent_run_id: str | None = None) -> StageResult:
    """Train and export; returns the exported model directory."""
    return run_supervised(SFT, cfg, parent_run_id)

"""Stage 1: supervised fine-tuning of a causal LM on prompt -> response pairs (and plain documents).

Loss is on response tokens only (and on every token of {text} documents), never on padding.
"""

from __future__ import annotations

import logging
import math

import torch

from forgepipe import distributed as dist
from forgepipe.checkpoint import export_pretrained
from forgepipe.config import Config
from forgepipe.data import load_stage_data
from forgepipe.data.collate import SFTCollator, pack_sequences
from forgepipe.data.tokenize import tokenize_sft
from forgepipe.deepspeed_config import build_ds_config
from forgepipe.engine import train_flops_per_token
from forgepipe.errors import ForgeError
from forgepipe.loop import eval_batches, total_steps, train_loop
from forgepipe.models.catalog import resolve_model
from forgepipe.models.load import LoraSettings, load_causal_lm, load_tokenizer
from forgepipe.stages.common import MODEL_SUBDIR, StageRun, loop_settings, resolve_stage_output

log = logging.getLogger(__name__)


def lm_loss(engine, batch):
    out = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                 labels=batch["labels"], **({"position_ids": batch["position_ids"]} if "position_ids" in batch else {}))
    return out.loss, {}


@torch.no_grad()
def evaluate_lm(engine, data, collate, batch_size: int, world: dist.World) -> dict[str, float]:
    """Token-weighted eval loss and perplexity over the whole held-out share (sums stay on the
    device; one transfer at the end)."""
    engine.eval()
    total_nll = torch.zeros((), dtype=torch.float64, device=engine.device)
    total_tokens = 0.0
    for idx, weight in eval_batches(len(data), world.rank, world.world_size, batch_size):
        batch = collate([data[i] for i in idx])
        n = float((batch["labels"][:, 1:] != -100).sum()) * weight  # counted on the host
        batch = {k: v.to(engine.device, non_blocking=True) for k, v in batch.items()}
        out = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
        total_nll += out.loss.detach().double() * n
        total_tokens += n
    nll, tokens = dist.all_reduce_sum([total_nll, total_tokens])
    loss = nll / max(tokens, 1.0)
    return {"eval/loss": loss, "eval/perplexity": math.exp(min(loss, 50.0))}


def run_sft(cfg: Config, parent_run_id: str | None = None) -> str:
    """Train and export; returns the exported model directory."""
    with StageRun(cfg, parent_run_id=parent_run_id) as run:
        model_path = resolve_stage_output(resolve_model(cfg.model.name_or_path, cfg.model.catalog))
        tokenizer = load_tokenizer(cfg.model.tokenizer or model_path)
        if not cfg.data.sources:
            raise ForgeError("--data: at least one data source is required")
        train_raw, eval_raw = load_stage_data(cfg.data.sources, "sft", cfg.data.split, cfg.train.seed,
                                              cfg.data.eval_fraction, max_dropped_fraction=cfg.data.max_dropped_fraction,
                                              eval_max_samples=cfg.data.eval_max_samples)
        train_data = tokenize_sft(train_raw, tokenizer, cfg.data.max_seq_len, cfg.data.max_prompt_len, run.cache_dir)
        eval_data = tokenize_sft(eval_raw, tokenizer, cfg.data.max_seq_len, cfg.data.max_prompt_len,
                                 run.cache_dir) if len(eval_raw) else None
        if cfg.data.packing:
            train_data = pack_sequences(train_data, cfg.data.max_seq_len)
        collate = SFTCollator(tokenizer.pad_token_id)
        settings = loop_settings(cfg)
        steps = total_steps(len(train_data), run.world.world_size, settings)
        ds_json = build_ds_config(cfg, run.world)
        run.begin(
            fingerprint=run.data_fingerprint(model_path), ds_configs={"model": ds_json},
        )
        run.tracker.log_params({"data.train_samples": len(train_data),
                                "data.eval_samples": len(eval_data) if eval_data else 0, "train.total_steps": steps})

        lora = LoraSettings.from_model_config(cfg.model)

        def build_model():
            return load_causal_lm(model_path, dtype=cfg.train.dtype, tokenizer=tokenizer,
                                  gradient_checkpointing=cfg.model.gradient_checkpointing,
                                  lora=lora, trust_remote_code=cfg.model.trust_remote_code)

        engine = run.build_engine(ds_json, build_model, total_steps=steps)
        run.resume({"model": engine})
        settings.flops_per_token = train_flops_per_token(engine.module)
        evaluate = None
        if eval_data is not None:
            def evaluate(e):
                return evaluate_lm(e, eval_data, collate, cfg.train.per_device_batch_size, run.world)
        run.state = train_loop(
            engine=engine, train_data=train_data, collate=collate, loss_fn=lm_loss, evaluate=evaluate,
            settings=settings, world=run.world, tracker=run.tracker, output_dir=cfg.output_dir, state=run.state,
            stop=run.stop,
        )
        model_dir = export_pretrained(
            engine, run.output_dir / MODEL_SUBDIR,
            lambda: load_causal_lm(model_path, dtype=cfg.train.dtype, tokenizer=tokenizer, lora=lora,
                                   trust_remote_code=cfg.model.trust_remote_code),
            tokenizer, metadata={"stage": "sft", "base_model": model_path, "mlflow_run_id": run.state.run_id},
        )
        run.finish(model_dir)
        return str(model_dir)

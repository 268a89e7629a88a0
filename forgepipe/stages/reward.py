"""Stage 2: a reward model (causal-LM backbone + scalar head) trained on chosen/rejected pairs.

The score of a sequence is the head's value at its last real token, the end-of-sequence token
the template appends (TRL/OpenRLHF convention; DeepSpeed-Chat averaged over the tokens where the
two answers diverge). The loss is Bradley-Terry: -logsigmoid(score_chosen - score_rejected [- margin]).
The export is a transformers sequence-classification model with one label, which stage 3 loads as
both the reward model and the critic's starting point.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from forgepipe import distributed as dist
from forgepipe.checkpoint import export_pretrained
from forgepipe.config import Config
from forgepipe.data import load_stage_data
from forgepipe.data.collate import PairCollator
from forgepipe.data.tokenize import tokenize_pairs
from forgepipe.deepspeed_config import build_ds_config
from forgepipe.engine import train_flops_per_token
from forgepipe.errors import ForgeError
from forgepipe.loop import eval_batches, total_steps, train_loop
from forgepipe.models.catalog import resolve_model
from forgepipe.models.load import LoraSettings, load_tokenizer
from forgepipe.models.reward_model import last_token_scores, load_scalar_model
from forgepipe.stages.common import MODEL_SUBDIR, StageRun, loop_settings, resolve_stage_output

log = logging.getLogger(__name__)


def pairwise_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | None = None) -> torch.Tensor:
    """Bradley-Terry: mean of -log sigmoid(chosen - rejected - margin), in float32 whatever the
    model's dtype (a bf16 difference of two close scores is mostly rounding)."""
    diff = chosen.float() - rejected.float()
    if margin is not None:
        diff = diff - margin.float()
    return -F.logsigmoid(diff).mean()


def pair_scores(engine, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores of the B chosen rows and the B rejected rows of a PairCollator batch."""
    values = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    scores = last_token_scores(values, batch["attention_mask"])
    half = scores.shape[0] // 2
    return scores[:half], scores[half:]


def reward_loss(engine, batch):
    chosen, rejected = pair_scores(engine, batch)
    loss = pairwise_loss(chosen, rejected, batch.get("margin"))
    return loss, {"accuracy": (chosen > rejected).float().mean()}  # a device tensor: no sync here


@torch.no_grad()
def evaluate_reward(engine, data, collate, batch_size: int, world: dist.World) -> dict[str, float]:
    """Held-out accuracy (chosen scored above rejected), mean scores and their gap."""
    engine.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=engine.device)  # correct, chosen, rejected
    count = 0.0
    for idx, weight in eval_batches(len(data), world.rank, world.world_size, batch_size):
        batch = collate([data[i] for i in idx])
        batch = {k: v.to(engine.device, non_blocking=True) for k, v in batch.items()}
        chosen, rejected = pair_scores(engine, batch)
        chosen, rejected = chosen.double(), rejected.double()
        sums += torch.stack([(chosen > rejected).double().sum(), chosen.sum(), rejected.sum()]) * weight
        count += len(idx) * weight
    correct, chosen_sum, rejected_sum, count = dist.all_reduce_sum([*sums.unbind(), count])
    count = max(count, 1.0)
    return {
        "eval/accuracy": correct / count,
        "eval/chosen_score": chosen_sum / count,
        "eval/rejected_score": rejected_sum / count,
        "eval/score_gap": (chosen_sum - rejected_sum) / count,
    }


def run_reward(cfg: Config, parent_run_id: str | None = None) -> str:
    """Train and export the reward model; returns the export directory."""
    with StageRun(cfg, parent_run_id=parent_run_id) as run:
        model_path = resolve_stage_output(resolve_model(cfg.model.name_or_path, cfg.model.catalog))
        tokenizer = load_tokenizer(cfg.model.tokenizer or model_path)
        if not cfg.data.sources:
            raise ForgeError("--data: at least one data source is required")
        margin = cfg.reward.margin_field
        train_raw, eval_raw = load_stage_data(cfg.data.sources, "reward", cfg.data.split, cfg.train.seed,
                                              cfg.data.eval_fraction, keep_fields=[margin] if margin else (),
                                              max_dropped_fraction=cfg.data.max_dropped_fraction,
                                              eval_max_samples=cfg.data.eval_max_samples)
        sources = ", ".join(cfg.data.sources)
        train_data, dropped = tokenize_pairs(train_raw, tokenizer, cfg.data.max_seq_len, cfg.data.max_prompt_len,
                                             run.cache_dir, margin_field=margin, source=sources)
        eval_data, eval_dropped = (tokenize_pairs(eval_raw, tokenizer, cfg.data.max_seq_len, cfg.data.max_prompt_len,
                                                  run.cache_dir, margin_field=margin, source=sources)
                                   if len(eval_raw) else (None, 0))
        collate = PairCollator(tokenizer.pad_token_id)
        settings = loop_settings(cfg)
        steps = total_steps(len(train_data), run.world.world_size, settings)
        ds_json = build_ds_config(cfg, run.world)
        run.begin(
            fingerprint=run.data_fingerprint(model_path), ds_configs={"model": ds_json},
        )
        run.tracker.log_params({"data.train_pairs": len(train_data), "data.eval_pairs": len(eval_data or []),
                                "data.identical_pairs_dropped": dropped + eval_dropped,
                                "train.total_steps": steps})
        lora = LoraSettings.from_model_config(cfg.model)

        def build_model(gradient_checkpointing: bool):
            return load_scalar_model(model_path, dtype=cfg.train.dtype, tokenizer=tokenizer,
                                     gradient_checkpointing=gradient_checkpointing, lora=lora,
                                     trust_remote_code=cfg.model.trust_remote_code)

        engine = run.build_engine(ds_json, lambda: build_model(cfg.model.gradient_checkpointing), total_steps=steps)
        run.resume({"model": engine})
        settings.flops_per_token = train_flops_per_token(engine.module)
        evaluate = None
        if eval_data is not None and len(eval_data):
            def evaluate(e):
                return evaluate_reward(e, eval_data, collate, cfg.train.per_device_batch_size, run.world)
        run.state = train_loop(
            engine=engine, train_data=train_data, collate=collate, loss_fn=reward_loss, evaluate=evaluate,
            settings=settings, world=run.world, tracker=run.tracker, output_dir=cfg.output_dir, state=run.state,
            stop=run.stop,
        )
        model_dir = export_pretrained(
            engine, run.output_dir / MODEL_SUBDIR, lambda: build_model(False), tokenizer,
            metadata={"stage": "reward", "base_model": model_path, "mlflow_run_id": run.state.run_id},
        )
        run.finish(model_dir)
        return str(model_dir)

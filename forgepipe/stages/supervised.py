"""The supervised recipe: what SFT and the reward model share, with what differs plugged in.

A stage is a `SupervisedStage`: how to turn its raw rows into training examples and a collator,
how to build its model, its loss and its evaluation. The recipe around it is one sequence for all:
resolve the model, load and tokenize the data, open the run, build the engine, resume, train
through the step driver, export, record.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from forgepipe import distributed as dist
from forgepipe.checkpoint import export_pretrained
from forgepipe.config import Config
from forgepipe.data import load_stage_data
from forgepipe.deepspeed_config import build_ds_config
from forgepipe.engine import train_flops_per_token
from forgepipe.layout import MODEL_SUBDIR, StageResult, resolve_stage_output
from forgepipe.loop import LoopSettings, eval_batches, to_device, total_steps, train_loop
from forgepipe.models.catalog import resolve_model
from forgepipe.models.load import load_tokenizer
from forgepipe.stages.context import StageContext


@dataclass
class Prepared:
    """A stage's tokenized data and how to batch it."""

    train: Any
    eval: Any | None
    collate: Callable[[list[dict]], dict[str, torch.Tensor]]
    params: dict[str, Any] = field(default_factory=dict)  # logged to MLflow (row counts, drops)


@dataclass(frozen=True)
class SupervisedStage:
    name: str
    # (cfg, tokenizer, train rows, eval rows, cache dir) -> Prepared
    prepare: Callable[[Config, Any, Any, Any, str], Prepared]
    # (cfg, model path, tokenizer, gradient checkpointing) -> module
    build_model: Callable[[Config, str, Any, bool], torch.nn.Module]
    # (engine, device batch) -> (loss, metrics that may stay on the device)
    loss: Callable[[Any, dict[str, torch.Tensor]], tuple[torch.Tensor, dict[str, Any]]]
    # (engine, data, collate, batch size, world) -> eval metrics
    evaluate: Callable[..., dict[str, float]]
    keep_fields: Callable[[Config], Sequence[str]] = lambda cfg: ()  # raw fields beyond the format's
    # At each evaluation, after `evaluate`, on every rank: (engine, eval data, cfg, tokenizer, tracker,
    # step) -> None. What people read: SFT's generations, the reward model's scored pairs (issue 14).
    show: Callable[..., None] | None = None


@torch.no_grad()
def evaluation_sums(engine, data, collate, batch_size: int, world: dist.World,
                    sums_of: Callable[[Any, dict, dict], list]) -> list[float]:
    """Sum `sums_of(engine, host batch, device batch)` over the whole held-out share, every sample
    once over all ranks (eval_batches); sums stay on the device until the one transfer at the end."""
    engine.eval()
    total: list | None = None
    for idx, weight in eval_batches(len(data), world.rank, world.world_size, batch_size):
        host = collate([data[i] for i in idx])
        values = [v * weight for v in sums_of(engine, host, to_device(host, engine.device))]
        total = values if total is None else [a + b for a, b in zip(total, values, strict=True)]
    return dist.all_reduce_sum(total) if total else []


def run_supervised(stage: SupervisedStage, cfg: Config, parent_run_id: str | None = None) -> StageResult:
    """Train and export."""
    with StageContext(cfg, parent_run_id) as ctx:
        model_path = resolve_stage_output(resolve_model(cfg.model.name_or_path, cfg.model.catalog))
        tokenizer = load_tokenizer(cfg.model.tokenizer or model_path, trust_remote_code=cfg.model.trust_remote_code,
                                   chat_template=cfg.data.chat_template)
        d = cfg.data
        train_raw, eval_raw = load_stage_data(d.sources, stage.name, d.split, cfg.train.seed, d.eval_fraction,
                                              keep_fields=stage.keep_fields(cfg),
                                              max_dropped_fraction=d.max_dropped_fraction,
                                              eval_max_samples=d.eval_max_samples)
        data = stage.prepare(cfg, tokenizer, train_raw, eval_raw, ctx.cache_dir)
        settings = LoopSettings.from_config(cfg)
        steps = total_steps(data.train, ctx.world.world_size, settings)
        ds_json = build_ds_config(cfg, ctx.world)
        run = ctx.begin(models={"model": model_path}, ds_configs={"model": ds_json})
        run.tracker.log_params({**data.params, "train.total_steps": steps})
        run.tracker.log_datasets(d.sources, {"train": train_raw, "eval": eval_raw})

        engine = run.build_engine(
            ds_json, lambda: stage.build_model(cfg, model_path, tokenizer, cfg.model.gradient_checkpointing),
            total_steps=steps)
        run.resume({"model": engine})
        settings.flops_per_token = train_flops_per_token(engine.module)
        evaluate = None
        if data.eval is not None and len(data.eval):
            def evaluate(e):
                metrics = stage.evaluate(e, data.eval, data.collate, cfg.train.per_device_batch_size, run.world)
                if stage.show is not None:
                    stage.show(e, data.eval, cfg, tokenizer, run.tracker, run.state.step)
                return metrics
        run.state = train_loop(
            engine=engine, train_data=data.train, collate=data.collate, loss_fn=stage.loss, evaluate=evaluate,
            settings=settings, world=run.world, tracker=run.tracker, output_dir=cfg.output_dir, state=run.state,
            stop=run.stop,
        )
        model_dir = export_pretrained(
            engine, ctx.output_dir / MODEL_SUBDIR, lambda: stage.build_model(cfg, model_path, tokenizer, False),
            tokenizer, metadata={"stage": stage.name, "base_model": model_path, "mlflow_run_id": run.state.run_id},
        )
        return run.finish(model_dir)

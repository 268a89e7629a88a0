"""`forgepipe dpo`: direct preference optimisation of a causal LM on chosen/rejected pairs.

The policy (usually an SFT export) learns to raise the chosen answer's log-probability relative to
the rejected one's, measured against a frozen reference (DPO, IPO) or against nothing (SimPO):
no reward model, no generation, one engine trained. The data is the reward stage's: every pair
format, the reward share of --data-split (config.data_share), tokenized by the same function,
with the prompt's length kept so that only response tokens are scored. Chosen and rejected rows go
through the model in one forward of 2B rows. The loop is the supervised one (loop.train_loop
through loop.drive): checkpoints, resume, stop signals, evaluation and MLflow as for SFT; metrics
`dpo/loss`, `dpo/reward_chosen`, `dpo/reward_rejected`, `dpo/margin`, `dpo/accuracy` and their
`dpo/eval_*` twins on the held-out pairs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from forgepipe import distributed as dist
from forgepipe.checkpoint import export_pretrained
from forgepipe.config import Config, data_share
from forgepipe.data import load_stage_data
from forgepipe.data.chat_template import ChatRender
from forgepipe.data.collate import PairCollator, predicted_positions
from forgepipe.data.tokenize import IGNORE_INDEX, tokenize_pairs
from forgepipe.deepspeed_config import build_ds_config
from forgepipe.engine import train_flops_per_token
from forgepipe.errors import ForgeError
from forgepipe.generation import clip, generate_for_ids, log_table
from forgepipe.layout import MODEL_SUBDIR, StageResult, resolve_stage_output
from forgepipe.loop import LoopSettings, total_steps, train_loop
from forgepipe.models.catalog import resolve_model
from forgepipe.models.load import load_causal_lm, load_tokenizer
from forgepipe.stages.context import StageContext
from forgepipe.stages.dpo.losses import (
    REFERENCE_FREE,
    PreferenceOutput,
    PreferenceSettings,
    pair_metrics,
    preference_loss,
    sequence_logprob,
)
from forgepipe.stages.dpo.reference import (
    REF_CHOSEN,
    REF_REJECTED,
    Reference,
    cache_key,
    cached_logps,
    compute_logps,
    forward_logps,
    with_reference_columns,
)
from forgepipe.stages.record import RunRecord
from forgepipe.stages.sft import build_model
from forgepipe.stages.supervised import Prepared, evaluation_sums

log = logging.getLogger(__name__)

TABLE_FILE = "dpo_eval/generations.json"
CONSOLE_ROWS = 3


# ---------------------------------------------------------------------------
# Batches and the loss


class DPOCollator:
    """PairCollator's [2B, L] batch (the B chosen rows, then the B rejected rows, right-padded), plus
    `response_mask` (1 on each row's response and EOS: the tokens scored), the positions that predict
    them (`predicted_positions`: the LM head runs there only) and, when precomputed, the reference's
    summed log-probs of each side."""

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None, padding_mask: bool = True):
        self.pairs = PairCollator(pad_token_id, pad_to_multiple_of, padding_mask)
        self.multiple = pad_to_multiple_of

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = self.pairs(features)
        starts = torch.tensor([f["prompt_len"] for f in features] * 2)
        positions = torch.arange(batch["input_ids"].shape[1])
        batch["response_mask"] = ((positions[None, :] >= starts[:, None]) & batch["attention_mask"].bool()).long()
        scored = batch["input_ids"].masked_fill(batch["response_mask"] == 0, IGNORE_INDEX)
        batch["predict_positions"], batch["predict_labels"] = predicted_positions(scored, self.multiple)
        if REF_CHOSEN in features[0]:
            for name in (REF_CHOSEN, REF_REJECTED):
                batch[name] = torch.tensor([f[name] for f in features], dtype=torch.float64)
        return batch


def settings_of(cfg: Config) -> PreferenceSettings:
    d = cfg.dpo
    return PreferenceSettings(loss=d.loss, beta=d.beta, label_smoothing=d.label_smoothing,
                              gamma_beta_ratio=d.gamma_beta_ratio)


def pair_output(s: PreferenceSettings, policy: tuple[torch.Tensor, torch.Tensor],
                ref_sums: torch.Tensor | None) -> PreferenceOutput:
    """The loss of a 2B-row batch from the policy's (sums, tokens) and the reference's sums."""
    sums, tokens = policy
    chosen, rejected = sequence_logprob(sums, tokens, s.loss).chunk(2)
    if ref_sums is None:
        return preference_loss(s, chosen, rejected)
    ref_chosen, ref_rejected = sequence_logprob(ref_sums, tokens, s.loss).chunk(2)
    return preference_loss(s, chosen, rejected, ref_chosen, ref_rejected)


def make_loss(s: PreferenceSettings, reference: Reference | None):
    """loss_fn(engine, batch) for train_loop: the mean pair loss and the pair metrics, on the device."""
    def loss_fn(engine, batch):
        ref = reference.logps(batch) if reference is not None else None  # no grad; before the policy's pass
        out = pair_output(s, forward_logps(engine, batch), ref)
        return out.losses.mean(), pair_metrics(out)
    return loss_fn


def make_evaluate(s: PreferenceSettings, reference: Reference | None, data, collate, batch_size: int,
                  world: dist.World):
    """evaluate(engine) over every held-out pair once: loss, rewards, margin, accuracy."""
    def sums_of(engine, host, batch) -> list:
        out = pair_output(s, forward_logps(engine, batch), reference.logps(batch) if reference else None)
        margin = out.chosen_rewards.double() - out.rejected_rewards.double()
        return [out.losses.double().sum(), out.chosen_rewards.double().sum(), out.rejected_rewards.double().sum(),
                (margin > 0).double().sum(), float(host["input_ids"].shape[0] // 2)]

    def evaluate(engine) -> dict[str, float]:
        loss, chosen, rejected, correct, count = evaluation_sums(engine, data, collate, batch_size, world, sums_of)
        count = max(count, 1.0)
        return {"eval/loss": loss / count, "eval/reward_chosen": chosen / count,
                "eval/reward_rejected": rejected / count, "eval/margin": (chosen - rejected) / count,
                "eval/accuracy": correct / count}
    return evaluate


def show_generations(engine, data, cfg: Config, tokenizer, tracker, step: int) -> None:
    """The policy's greedy answers to the first held-out prompts beside the pair's two answers: an
    MLflow table (dpo_eval/generations.json) and a few console lines. Every rank generates (each
    generate call is collective under ZeRO-3); rank 0's tracker records."""
    examples = [data[k] for k in range(min(len(data), cfg.train.eval_generations))]
    if not examples:
        return
    answers = generate_for_ids(engine, tokenizer, [{"prompt_input_ids": e["chosen_input_ids"][:e["prompt_len"]]}
                                                   for e in examples],
                               max_new_tokens=cfg.train.eval_max_new_tokens,
                               batch_size=cfg.train.per_device_batch_size,
                               gather=engine.zero_optimization_partition_weights())
    if not tracker.enabled:
        return

    def text(e, side, start):
        return tokenizer.decode(e[f"{side}_input_ids"][start:], skip_special_tokens=True)
    table = {"prompt": [tokenizer.decode(e["chosen_input_ids"][:e["prompt_len"]], skip_special_tokens=True)
                        for e in examples],
             "chosen": [text(e, "chosen", e["prompt_len"]) for e in examples],
             "rejected": [text(e, "rejected", e["prompt_len"]) for e in examples], "response": answers}
    log_table(tracker, table, TABLE_FILE, step)
    for k in range(min(CONSOLE_ROWS, len(examples))):
        log.info("eval step %d, prompt %s\n  model: %s", step, clip(table["prompt"][k]), clip(answers[k]))


# ---------------------------------------------------------------------------
# Inputs, models, the stage


def reference_kind(cfg: Config) -> str:
    """none (SimPO), adapters (LoRA without --ref: the policy with its adapters off), or engine."""
    if cfg.dpo.loss in REFERENCE_FREE:
        return "none"
    return "adapters" if cfg.model.lora_dim > 0 and not cfg.dpo.ref_model else "engine"


@dataclass
class DPOInputs:
    """Everything the stage reads, checked and tokenized before any model is loaded."""

    model_path: str
    ref_path: str | None  # the reference engine's model (None: adapters off, or no reference)
    tokenizer: Any
    data: Prepared
    steps: int

    @property
    def ref_label(self) -> str:
        """The reference as a resume must find it again."""
        return self.ref_path or (f"{self.model_path} (adapters off)" if self.data.params["dpo.reference"] == "adapters"
                                 else "none")


def _resolve(name: str, cfg: Config, key: str) -> str:
    try:
        return resolve_stage_output(resolve_model(name, cfg.model.catalog))
    except ForgeError as exc:
        raise ForgeError(exc.message, key=key) from None


def prepare_inputs(cfg: Config, ctx: StageContext) -> DPOInputs:
    """Model paths, tokenizer, the tokenized pairs and the step count; every check that needs no model."""
    from forgepipe.stages.ppo.trainer import tokenizer_mismatch

    model_path = _resolve(cfg.model.name_or_path, cfg, "model.name_or_path")
    tokenizer = load_tokenizer(cfg.model.tokenizer or model_path, trust_remote_code=cfg.model.trust_remote_code,
                               chat_template=cfg.data.chat_template)
    kind = reference_kind(cfg)
    ref_path = None
    if kind == "engine":
        ref_path = _resolve(cfg.dpo.ref_model, cfg, "dpo.ref_model") if cfg.dpo.ref_model else model_path
        mismatch = tokenizer_mismatch(tokenizer, load_tokenizer(ref_path)) if ref_path != model_path else None
        if mismatch:
            raise ForgeError(f"the tokenizer of {ref_path} does not match the policy's ({mismatch})",
                             key="dpo.ref_model")
    d = cfg.data
    train_raw, eval_raw = load_stage_data(d.sources, data_share("dpo"), d.split, cfg.train.seed, d.eval_fraction,
                                          max_dropped_fraction=d.max_dropped_fraction,
                                          eval_max_samples=d.eval_max_samples)
    sources = ", ".join(d.sources)
    chat = ChatRender.of(tokenizer)

    def tokenize(rows):
        return tokenize_pairs(rows, tokenizer, d.max_seq_len, d.max_prompt_len, ctx.cache_dir, source=sources,
                              with_prompt_len=True, chat=chat)

    train, dropped = tokenize(train_raw)
    held_out, eval_dropped = tokenize(eval_raw) if len(eval_raw) else (None, 0)
    collate = DPOCollator(tokenizer.pad_token_id, d.pad_to_multiple_of, padding_mask=cfg.train.padding_mask)
    data = Prepared(train, held_out, collate,
                    {"data.train_pairs": len(train), "data.eval_pairs": len(held_out or []),
                     "data.identical_pairs_dropped": dropped + eval_dropped, "dpo.reference": kind})
    steps = total_steps(train, ctx.world.world_size, LoopSettings.from_config(cfg))
    return DPOInputs(model_path, ref_path, tokenizer, data, steps)


def precompute_reference(cfg: Config, ctx: StageContext, inputs: DPOInputs, make_reference) -> None:
    """--precompute-ref: the reference log-probs of every training and held-out pair become columns
    of the data, from the cache when this data and reference were scored before (then no reference is
    built at all); a reference engine built for it is freed at the end."""
    built: list[Reference] = []

    def reference() -> Reference:
        if not built:
            built.append(make_reference())
        return built[0]

    i, world = inputs, ctx.world
    for split in ("train", "eval"):
        data = getattr(i.data, split)
        if data is None or not len(data):
            continue
        key = cache_key(data, i.ref_path or i.model_path, cfg.train.dtype)
        values = cached_logps(ctx.cache_dir, key, lambda data=data: compute_logps(
            reference(), data, i.data.collate, cfg.train.per_device_batch_size, world, reference().device), world)
        setattr(i.data, split, with_reference_columns(data, values))
    for ref in built:
        ref.free()


def build_models(cfg: Config, ctx: StageContext, run: RunRecord, inputs: DPOInputs, ds_configs: dict[str, dict]):
    """(policy engine, Reference or None). With --precompute-ref the reference engine lives and
    dies before the policy is built, so the two are never in memory together."""
    i, kind = inputs, reference_kind(cfg)

    def policy():
        return run.build_engine(ds_configs["model"], lambda: build_model(cfg, i.model_path, i.tokenizer,
                                                                         cfg.model.gradient_checkpointing),
                                total_steps=i.steps)

    def reference_engine() -> Reference:
        return Reference(engine=run.build_engine(ds_configs["ref"], lambda: load_causal_lm(
            i.ref_path, dtype=cfg.train.dtype, tokenizer=i.tokenizer, trust_remote_code=cfg.model.trust_remote_code,
            attn_implementation=cfg.model.attn_implementation)))

    if kind == "none":
        return policy(), None
    if kind == "engine" and cfg.dpo.precompute_ref:
        precompute_reference(cfg, ctx, i, reference_engine)
        return policy(), Reference()
    engine = policy()
    reference = reference_engine() if kind == "engine" else Reference(policy=engine)
    if cfg.dpo.precompute_ref:  # adapters off: the policy at its start is the reference
        precompute_reference(cfg, ctx, i, lambda: reference)
        reference = Reference()
    return engine, reference


def run_dpo(cfg: Config, parent_run_id: str | None = None) -> StageResult:
    """Train the policy with DPO (or IPO, SimPO) and export it."""
    with StageContext(cfg, parent_run_id) as ctx:
        inputs = prepare_inputs(cfg, ctx)
        ds_configs = {"model": build_ds_config(cfg, ctx.world)}
        if inputs.ref_path:
            ds_configs["ref"] = build_ds_config(cfg, ctx.world, zeropp=False, train=False)
        run = ctx.begin(models={"model": inputs.model_path, "ref": inputs.ref_label}, ds_configs=ds_configs)
        run.tracker.log_params({**inputs.data.params, "train.total_steps": inputs.steps})
        run.tracker.log_datasets(cfg.data.sources, {"train": inputs.data.train, "eval": inputs.data.eval})
        engine, reference = build_models(cfg, ctx, run, inputs, ds_configs)
        run.resume({"model": engine})
        settings, s, data = LoopSettings.from_config(cfg), settings_of(cfg), inputs.data
        settings.flops_per_token = train_flops_per_token(engine.module)
        evaluate = None
        if data.eval is not None and len(data.eval):
            scores = make_evaluate(s, reference, data.eval, data.collate, cfg.train.per_device_batch_size, run.world)

            def evaluate(e):
                metrics = scores(e)
                show_generations(e, data.eval, cfg, inputs.tokenizer, run.tracker, run.state.step)
                return metrics
        run.state = train_loop(engine=engine, train_data=data.train, collate=data.collate, loss_fn=make_loss(s, reference),
                               evaluate=evaluate, settings=settings, world=run.world, tracker=run.tracker,
                               output_dir=cfg.output_dir, state=run.state, stop=run.stop)
        model_dir = export_pretrained(
            engine, ctx.output_dir / MODEL_SUBDIR, lambda: build_model(cfg, inputs.model_path, inputs.tokenizer, False),
            inputs.tokenizer, metadata={"stage": "dpo", "base_model": inputs.model_path, "reference": inputs.ref_label,
                                        "loss": s.loss, "beta": s.beta, "mlflow_run_id": run.state.run_id})
        return run.finish(model_dir)

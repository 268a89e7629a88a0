"""Stage 3: PPO of the actor against a frozen reward model, kept near a frozen reference.

Four models, as in DeepSpeed-Chat step 3: the actor (trained, ZeRO++ allowed), the reference
(frozen copy of the starting actor), the critic (trained, starts from the reward model unless
--critic says otherwise) and the reward model (frozen). One PPO step = one experience batch of
prompts per rank: sample and score (experience.py), then `ppo_epochs` passes of clipped policy and
value updates over it in micro-batches. The prompt order is a pure function of (seed, epoch) and
the loop state (step, epoch, experience batches consumed) goes into every checkpoint.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from forgepipe import distributed as dist
from forgepipe.checkpoint import consolidated_state_dict, export_pretrained, save_checkpoint
from forgepipe.config import Config
from forgepipe.data import load_stage_data, load_text_data
from forgepipe.data.chat_template import ChatRender, stop_token_id
from forgepipe.data.collate import PromptCollator, SFTCollator
from forgepipe.data.tokenize import tokenize_prompts, tokenize_text
from forgepipe.deepspeed_config import build_ds_config, engine_stages
from forgepipe.errors import ForgeError
from forgepipe.layout import MODEL_SUBDIR, StageResult, resolve_stage_output
from forgepipe.loop import LoopSettings, drive, epoch_order, memory_metrics, rank_batches
from forgepipe.models.catalog import resolve_model
from forgepipe.models.load import LoraSettings, load_causal_lm, load_tokenizer
from forgepipe.models.reward_model import has_scalar_head, load_scalar_model
from forgepipe.options import label
from forgepipe.rollout import RolloutEngine
from forgepipe.stages.context import StageContext
from forgepipe.stages.ppo.evaluation import EvalSettings, PolicyEvaluation
from forgepipe.stages.ppo.experience import (
    Experience,
    actor_logprobs,
    critic_values,
    make_experience,
    wall_clock,
)
from forgepipe.stages.ppo.losses import ema_update, masked_mean, policy_loss, value_loss
from forgepipe.stages.record import RunRecord

log = logging.getLogger(__name__)

EMA_FILE = "ema_actor.pt"


# ---------------------------------------------------------------------------
# Checks before any model is loaded


def tokenizer_mismatch(actor_tok, other_tok) -> str | None:
    """Why two tokenizers would give different ids for the same text, or None.

    Pad tokens (either side's) are left out: they are only ever masked, and load_tokenizer may add one.
    """
    pads = {actor_tok.pad_token, other_tok.pad_token}

    def vocab(tok):
        return {t: i for t, i in tok.get_vocab().items() if t not in pads}

    a, b = vocab(actor_tok), vocab(other_tok)
    if a != b:
        differ = sorted(set(a.items()) ^ set(b.items()), key=lambda kv: kv[1])
        return f"vocabularies differ ({len(a)} vs {len(b)} tokens; e.g. {differ[0][0]!r})"
    for name in ("eos_token", "bos_token"):
        if getattr(actor_tok, name) != getattr(other_tok, name):
            return f"{name} differs ({getattr(actor_tok, name)!r} vs {getattr(other_tok, name)!r})"
    return None


def check_one_hpz(ds_configs: dict[str, dict]) -> None:
    """hpZ's process group is a per-process global in DeepSpeed: only one engine may use it."""
    with_hpz = [name for name, js in ds_configs.items()
                if js.get("zero_optimization", {}).get("zero_hpz_partition_size", 1) > 1]
    if len(with_hpz) > 1:
        raise ForgeError(
            f"--zeropp/--hpz-size: hpZ is configured on {len(with_hpz)} engines ({', '.join(with_hpz)}); DeepSpeed "
            "supports it on one engine per process (issues 4901/7066), keep it on the actor only"
        )


def ppo_batch_sizes(cfg: Config) -> tuple[int, int]:
    """(prompts per rank per experience batch, micro-batches per experience batch)."""
    micro = cfg.train.per_device_batch_size
    gen = cfg.ppo.generation_batch_size or micro
    if gen < 1 or gen % micro or (gen // micro) % cfg.train.grad_accum:
        raise ForgeError(
            f"{gen} must be a multiple of --per-device-batch-size ({micro}) x "
            f"--grad-accum ({cfg.train.grad_accum})",
            key="ppo.generation_batch_size",
        )
    return gen, gen // micro


# ---------------------------------------------------------------------------
# The update


def train_on_experience(actor, critic, exp: Experience, cfg: Config, micro_batches: int, generator: torch.Generator,
                        ptx_batches=None) -> dict[str, float]:
    """`ppo_epochs` passes of clipped policy and value updates; returns summed stats and their count.

    The sums are 0-d tensors on the actor's device: nothing waits for the GPU until they are logged."""
    p = cfg.ppo
    actor.train()
    critic.train()
    zero = torch.zeros((), dtype=torch.float32, device=exp.sequences.device)
    sums = {k: zero.clone() for k in ("policy_loss", "value_loss", "clip_frac", "approx_kl", "ptx_loss")}
    count = 0
    for _ in range(p.ppo_epochs):
        order = torch.randperm(len(exp), generator=generator)
        for rows in order.chunk(micro_batches):
            mb = exp.select(rows.to(exp.sequences.device))
            logp = actor_logprobs(actor, mb.sequences, mb.attention_mask, mb.prompt_len, p.temperature)
            loss, clip_frac, approx_kl = policy_loss(logp, mb.logp_old, mb.advantages, mb.action_mask, p.policy_clip)
            sums["policy_loss"] += loss.detach().float()
            if ptx_batches is not None:
                batch = {k: v.to(mb.sequences.device) for k, v in next(ptx_batches).items()}
                ptx = actor(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                            labels=batch["labels"], use_cache=False).loss
                sums["ptx_loss"] += ptx.detach().float()
                loss = loss + p.ptx_coef * ptx
            actor.backward(loss)
            actor.step()

            values = critic_values(critic, mb.sequences, mb.attention_mask, mb.prompt_len)
            vloss = value_loss(values, mb.values_old, mb.returns, mb.action_mask, p.value_clip)
            critic.backward(vloss)
            critic.step()
            sums["value_loss"] += vloss.detach().float()
            sums["clip_frac"] += clip_frac.detach().float()
            sums["approx_kl"] += approx_kl.detach().float()
            count += 1
    return {**sums, "updates": float(count)}


def ptx_stream(data, collate, cfg: Config, world: dist.World, start: int):
    """Unsupervised micro-batches from global index `start` on: an endless, resumable sequence."""
    micro = cfg.train.per_device_batch_size
    per_epoch = len(data) // (world.world_size * micro)
    if per_epoch == 0:
        raise ForgeError(f"{len(data)} pieces are fewer than one micro-batch per rank "
                         f"({world.world_size} x {micro})", key="data.unsupervised_sources")
    k = start
    cached: tuple[int, list[list[int]]] | None = None
    while True:
        epoch, pos = divmod(k, per_epoch)
        if cached is None or cached[0] != epoch:
            cached = (epoch, rank_batches(epoch_order(len(data), cfg.train.seed + 1, epoch), world.rank,
                                          world.world_size, micro, 1))
        yield collate([data[i] for i in cached[1][pos]])
        k += 1


# ---------------------------------------------------------------------------
# EMA of the actor (kept on rank 0, on the CPU, float32)


def actor_parameters(actor):
    """(name, full parameter) pairs of the trainable actor weights; gathers under ZeRO-3 (collective)."""
    import deepspeed

    zero3 = actor.zero_optimization_partition_weights()
    for name, param in actor.module.named_parameters():
        if not param.requires_grad:
            continue
        with deepspeed.zero.GatheredParameters([param], enabled=zero3):
            yield name, param


def update_ema(ema: dict[str, torch.Tensor] | None, actor, decay: float, world: dist.World):
    """ema <- decay * ema + (1 - decay) * actor (starts as a copy); None on ranks other than 0."""
    fresh = ema is None
    out: dict[str, torch.Tensor] = {} if fresh else ema
    for name, param in actor_parameters(actor):
        if world.is_main:
            if fresh:
                out[name] = param.detach().float().cpu().clone()
            else:
                ema_update([out[name]], [param], decay)
    return out if world.is_main else None


class _StateDictSource:
    """Looks like an engine to export_pretrained, but hands it a ready state dict (the EMA export)."""

    def __init__(self, state: dict[str, torch.Tensor] | None):
        self.module = self
        self._state = state

    def zero_optimization_partition_weights(self) -> bool:
        return False

    def state_dict(self):
        return self._state


STEP_SUMS = ("rows", "tokens", "score", "kl", "reward", "policy_loss", "value_loss", "clip_frac", "approx_kl",
             "ptx_loss", "updates", "generation_s", "scoring_s", "training_s", "steps", "logprob_gap")


def step_sums(exp: Experience, stats: dict[str, Any], training_s: float) -> dict[str, Any]:
    """One PPO step's contribution to the logged figures: sums, tensors left on the device."""
    mask = exp.action_mask
    tokens = mask.sum().double()
    kl = masked_mean(exp.logp_old - exp.logp_ref, mask)
    rollout = exp.logp_old if exp.logp_rollout is None else exp.logp_rollout
    gap = (rollout - exp.logp_old).abs() * mask  # the sampler against the training forward
    return {"logprob_gap": gap.double().sum(), "logprob_gap_max": gap.max().double(),
            "rows": float(len(exp)), "tokens": tokens, "score": exp.scores.double().sum(), "kl": kl.double() * tokens,
            "reward": exp.rewards.double().sum(), **{k: stats[k] for k in ("policy_loss", "value_loss", "clip_frac",
                                                                            "approx_kl", "ptx_loss", "updates")},
            "generation_s": exp.generation_s, "scoring_s": exp.scoring_s, "training_s": training_s, "steps": 1.0}


def window_metrics(sums: dict[str, Any], world: dist.World, ptx: bool) -> tuple[dict[str, float], float, float]:
    """(figures, responses, response tokens) of the PPO steps since the last log, over all ranks
    (sums all-reduced, then divided; times are per step and rank). Collective."""
    total = dict(zip(STEP_SUMS, dist.all_reduce_sum([sums.get(k, 0.0) for k in STEP_SUMS]), strict=True))
    rows, tokens, updates = total["rows"], total["tokens"], max(total["updates"], 1.0)
    per_step = max(total["steps"], 1.0)  # steps x ranks
    record = {
        "ppo/score_mean": total["score"] / rows,
        "ppo/kl": total["kl"] / max(tokens, 1.0),  # per response token
        "ppo/reward_mean": total["reward"] / rows,  # KL-shaped return of a whole response
        "ppo/policy_loss": total["policy_loss"] / updates,
        "ppo/value_loss": total["value_loss"] / updates,
        "ppo/clip_frac": total["clip_frac"] / updates,
        "ppo/approx_kl": total["approx_kl"] / updates,
        "ppo/response_len": tokens / rows,
        "perf/gen_tokens_per_s": tokens / max(total["generation_s"] / world.world_size, 1e-9),
        "time/generation_s": total["generation_s"] / per_step,
        "time/scoring_s": total["scoring_s"] / per_step,
        "time/training_s": total["training_s"] / per_step,
        "time/generation_share": total["generation_s"] / max(total["generation_s"] + total["scoring_s"]
                                                             + total["training_s"], 1e-9),
        "ppo/rollout_logprob_gap": total["logprob_gap"] / max(tokens, 1.0),  # nats per response token
    }
    if "logprob_gap_max" in sums:
        record["ppo/rollout_logprob_gap_max"] = dist.min_max([sums["logprob_gap_max"]])[1][0]
    if ptx:
        record["ppo/ptx_loss"] = total["ptx_loss"] / updates
    return record, rows, tokens


def check_rollout_gap(gap: float, limit: float, step: int) -> None:
    """A sampler whose log-probs drift from the training forward's biases every PPO ratio without an
    error: stop in one line past `--max-rollout-logprob-gap` (the last checkpoint is kept)."""
    if gap > limit:
        raise ForgeError(f"the sampler's log-probs differ from the training forward's by {gap:.3g} nats per token "
                         f"in the steps up to {step}, more than {label('ppo.max_rollout_logprob_gap')} {limit:g}: "
                         "the rollout engine does not sample from the weights being trained")


def ema_state_dict(actor, ema: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor] | None:
    """The actor's full state dict with the EMA weights in place of the trained ones (rank 0)."""
    state = consolidated_state_dict(actor)
    if state is None or ema is None:
        return state
    return {k: ema[k].to(v.dtype) if k in ema else v for k, v in state.items()}


# ---------------------------------------------------------------------------
# The stage


def _model_path(name: str, cfg: Config, option: str) -> str:
    if not name:
        raise ForgeError(f"{option}: required")
    try:
        return resolve_stage_output(resolve_model(name, cfg.model.catalog))
    except ForgeError as exc:
        raise ForgeError(f"{option}: {exc}") from None


@dataclass
class PPOInputs:
    """Everything PPO reads, checked and tokenized before any model is loaded."""

    actor_path: str
    reward_path: str
    critic_path: str
    tokenizer: Any
    reward_tokenizer: Any
    mismatch: str | None  # why the reward model's tokenizer differs (then it reads re-tokenized text)
    prompts: Any
    ptx_data: Any
    generation_batch: int  # prompts per rank per experience batch
    micro_batches: int  # micro-batches per experience batch
    steps: int  # PPO steps (experience batches per rank)
    optimizer_steps: int
    eval_prompts: Any = None  # held-out prompts for PolicyEvaluation (None: no evaluation)


def prepare_inputs(cfg: Config, ctx: StageContext) -> PPOInputs:
    """Paths, tokenizers, prompts and step counts; every check that needs no model."""
    p, world = cfg.ppo, ctx.world
    actor_path = _model_path(cfg.model.name_or_path, cfg, "--actor")
    reward_path = _model_path(p.reward_model, cfg, "--reward")
    critic_path = _model_path(p.critic_model, cfg, "--critic") if p.critic_model else reward_path
    if not has_scalar_head(reward_path):
        raise ForgeError(f"{reward_path} is not a reward model export (no scalar head); "
                         "give the output of `forgepipe reward`", key="ppo.reward_model")
    tokenizer = load_tokenizer(cfg.model.tokenizer or actor_path, padding_side="left",
                               trust_remote_code=cfg.model.trust_remote_code, chat_template=cfg.data.chat_template)
    reward_tokenizer = load_tokenizer(reward_path, chat_template=cfg.data.chat_template)
    chat = ChatRender.of(tokenizer)
    mismatch = tokenizer_mismatch(tokenizer, reward_tokenizer)
    if mismatch and not p.allow_tokenizer_mismatch:
        raise ForgeError(f"the tokenizer of {reward_path} does not match the actor's ({mismatch}); "
                         "pass --allow-tokenizer-mismatch to re-tokenize responses as text for the reward model", key="ppo.reward_model")
    if mismatch:
        log.warning("actor and reward tokenizers differ (%s): the reward model reads re-tokenized text, "
                    "the critic reads the actor's ids", mismatch)
    gen_batch, micro_batches = ppo_batch_sizes(cfg)
    train_raw, eval_raw = load_stage_data(cfg.data.sources, "ppo", cfg.data.split, cfg.train.seed,
                                          cfg.data.eval_fraction, max_dropped_fraction=cfg.data.max_dropped_fraction,
                                          eval_max_samples=cfg.data.eval_max_samples)
    prompts = tokenize_prompts(train_raw, tokenizer, cfg.data.max_prompt_len, ctx.cache_dir, chat=chat)
    per_epoch = len(prompts) // (world.world_size * gen_batch)
    if per_epoch == 0:
        raise ForgeError(f"{len(prompts)} prompts are fewer than one experience batch "
                         f"({world.world_size} ranks x {gen_batch}); use a smaller batch or more data", key="ppo.generation_batch_size")
    steps = per_epoch * cfg.train.epochs
    steps = min(steps, cfg.train.max_steps) if cfg.train.max_steps else steps
    ptx_data = None
    if p.ptx_coef > 0:
        ptx_data = tokenize_text(load_text_data(cfg.data.unsupervised_sources, cfg.train.seed), tokenizer,
                                 cfg.data.max_seq_len, ctx.cache_dir)
    return PPOInputs(actor_path, reward_path, critic_path, tokenizer, reward_tokenizer, mismatch, prompts, ptx_data,
                     gen_batch, micro_batches, steps, steps * p.ppo_epochs * micro_batches // cfg.train.grad_accum,
                     held_out_prompts(cfg, eval_raw, tokenizer, ctx.cache_dir, chat))


def held_out_prompts(cfg: Config, eval_raw, tokenizer, cache_dir: str, chat: ChatRender | None = None):
    """The first `ppo.eval_prompts` held-out prompts that fit --max-prompt-len, or None (no evaluation)."""
    limit = cfg.ppo.eval_prompts
    if limit <= 0 or not len(eval_raw):
        return None
    try:
        prompts = tokenize_prompts(eval_raw, tokenizer, cfg.data.max_prompt_len, cache_dir, source="held-out prompts",
                                   chat=chat)
    except ForgeError as exc:  # every held-out prompt too long: train, but say why nothing is evaluated
        log.warning("PPO evaluation off: %s", exc)
        return None
    return prompts.select(range(min(limit, len(prompts))))


def ppo_ds_configs(cfg: Config, world: dist.World) -> dict[str, dict]:
    """One DeepSpeed JSON per engine: ZeRO++ on the actor only, the frozen ones without an optimizer."""
    p = cfg.ppo
    stages = engine_stages(cfg)  # as resolved at launch (--zero-stage auto)
    critic_stage, frozen_stage = stages["critic"], stages["ref"]
    ds_configs = {
        "actor": build_ds_config(cfg, world, zeropp=True),
        "critic": build_ds_config(cfg, world, zero_stage=critic_stage, zeropp=False, lr=p.critic_lr),
        "ref": build_ds_config(cfg, world, zero_stage=frozen_stage, zeropp=False, train=False),
        "reward": build_ds_config(cfg, world, zero_stage=frozen_stage, zeropp=False, train=False),
    }
    check_one_hpz(ds_configs)
    return ds_configs


@dataclass
class PPOModels:
    actor: Any  # trained
    critic: Any  # trained
    ref: Any  # frozen copy of the starting actor
    reward: Any  # frozen
    build_actor: Any  # () -> a fresh actor module (the export's CPU rebuild)


def build_models(cfg: Config, run: RunRecord, inputs: PPOInputs, ds_configs: dict[str, dict]) -> PPOModels:
    """The four engines, on this rank's device (each loads straight into ZeRO-3 partitions at stage 3)."""
    p, i = cfg.ppo, inputs
    actor_lora = LoraSettings.from_model_config(cfg.model)
    critic_lora = LoraSettings.from_model_config(cfg.model, dim=p.critic_lora_dim)
    remote, attn = cfg.model.trust_remote_code, cfg.model.attn_implementation

    def build_actor(gradient_checkpointing: bool = False, lora: LoraSettings | None = actor_lora):
        return load_causal_lm(i.actor_path, dtype=cfg.train.dtype, tokenizer=i.tokenizer, lora=lora,
                              gradient_checkpointing=gradient_checkpointing, trust_remote_code=remote,
                              attn_implementation=attn)

    actor = run.build_engine(ds_configs["actor"], lambda: build_actor(cfg.model.gradient_checkpointing),
                             total_steps=i.optimizer_steps)
    ref = run.build_engine(ds_configs["ref"], lambda: build_actor(lora=None))
    critic = run.build_engine(ds_configs["critic"], lambda: load_scalar_model(
        i.critic_path, dtype=cfg.train.dtype, tokenizer=i.tokenizer, lora=critic_lora,
        gradient_checkpointing=p.critic_gradient_checkpointing, trust_remote_code=remote, attn_implementation=attn),
        total_steps=i.optimizer_steps)
    reward = run.build_engine(ds_configs["reward"], lambda: load_scalar_model(
        i.reward_path, dtype=cfg.train.dtype, tokenizer=i.reward_tokenizer, trust_remote_code=remote,
        attn_implementation=attn))
    return PPOModels(actor, critic, ref, reward, build_actor)


def initial_ema(cfg: Config, run: RunRecord, actor) -> dict[str, torch.Tensor] | None:
    """The EMA copy: from the checkpoint when resuming, else the starting actor (None when off)."""
    if cfg.ppo.ema <= 0:
        return None
    saved = run.resume_from / EMA_FILE if run.resume_from is not None else None
    if saved is not None and saved.is_file():
        return torch.load(saved) if run.world.is_main else None
    return update_ema(None, actor, cfg.ppo.ema, run.world)


def ppo_loop(cfg: Config, run: RunRecord, inputs: PPOInputs, models: PPOModels,
             ema: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor] | None:
    """PPO steps through the step driver: one unit is one experience batch (sample, score, then
    `ppo_epochs` passes of updates). Returns the EMA copy (rank 0)."""
    p, i, m, world, state = cfg.ppo, inputs, models, run.world, run.state
    zero3 = m.actor.zero_optimization_partition_weights()
    gather = zero3 and p.gather_for_generation
    multiple = cfg.data.pad_to_multiple_of
    collate = PromptCollator(i.tokenizer.pad_token_id, multiple)
    ptx_batches = None
    if i.ptx_data is not None:
        ptx_batches = ptx_stream(i.ptx_data, SFTCollator(i.tokenizer.pad_token_id, multiple), cfg, world,
                                 start=state.step * p.ppo_epochs * i.micro_batches)
    per_epoch = len(i.prompts) // (world.world_size * i.generation_batch)
    # One rollout engine for the run; its draws are seeded by (seed, rank) and the PPO step (call=).
    rollout = RolloutEngine(m.actor, eos_token_id=stop_token_id(i.tokenizer), pad_token_id=i.tokenizer.pad_token_id,
                            seed=cfg.train.seed * 1_009 + world.rank, gather=gather,
                            synced=zero3 and world.world_size > 1 and not gather, cache=p.rollout_cache,
                            compile_decode=p.rollout_compile)
    window: dict[str, Any] = {}
    box = {"ema": ema}

    def units(epoch: int) -> list[list[int]]:
        return rank_batches(epoch_order(len(i.prompts), cfg.train.seed, epoch), world.rank, world.world_size,
                            i.generation_batch, 1)[:per_epoch]

    def run_unit(indices: list[int]) -> bool:
        exp = make_experience(
            m.actor, m.critic, m.ref, m.reward, collate([i.prompts[k] for k in indices]), ppo=p,
            eos_token_id=stop_token_id(i.tokenizer), pad_token_id=i.tokenizer.pad_token_id,
            forward_batch_size=cfg.train.per_device_batch_size, forward_tokens=p.scoring_tokens,
            synced_gpus=zero3 and world.world_size > 1 and not gather, gather=gather,
            actor_tokenizer=i.tokenizer, reward_tokenizer=i.reward_tokenizer if i.mismatch else None,
            rollout=rollout, call=state.step,
        )
        start = wall_clock(exp.sequences.device)
        generator = torch.Generator().manual_seed(cfg.train.seed * 1_000_003 + state.step)
        stats = train_on_experience(m.actor, m.critic, exp, cfg, i.micro_batches, generator, ptx_batches)
        for k, v in step_sums(exp, stats, wall_clock(exp.sequences.device) - start).items():
            window[k] = torch.maximum(window[k], v) if k.endswith("_max") and k in window else window.get(k, 0.0) + v
        if p.ema > 0:
            box["ema"] = update_ema(box["ema"], m.actor, p.ema, world)
        rollout.refresh()
        box["kv_cache_bytes"] = max(box.get("kv_cache_bytes", 0), rollout.cache_bytes)
        return True

    def log(step: int) -> dict[str, str]:
        record, rows, tokens = window_metrics(window, world, ptx=ptx_batches is not None)
        window.clear()
        check_rollout_gap(record["ppo/rollout_logprob_gap"], p.max_rollout_logprob_gap, step)
        record["mem/rollout_kv_cache_gib"] = box.get("kv_cache_bytes", 0) / 2**30  # this rank's largest so far
        record["train/lr"] = m.actor.get_lr()[0]
        record.update(memory_metrics())
        state.samples_seen += int(rows)
        state.tokens_seen += int(tokens)
        run.tracker.log_metrics(record, step=step)
        return {"score": f"{record['ppo/score_mean']:.3f}", "kl": f"{record['ppo/kl']:.3f}"}

    def checkpoint() -> None:
        path = save_checkpoint({"actor": m.actor, "critic": m.critic}, cfg.output_dir, f"step-{state.step:08d}",
                               state.to_dict(), cfg.train.keep_last)
        if box["ema"] is not None and world.is_main:
            torch.save(box["ema"], Path(path) / EMA_FILE)

    drive(state=state, total=i.steps, units=units, run_unit=run_unit, log=log,
          evaluate=policy_evaluation(cfg, run, inputs, models),
          checkpoint=checkpoint, settings=LoopSettings.from_config(cfg), stop=run.stop, world=world, desc="ppo")
    return box["ema"]


def policy_evaluation(cfg: Config, run: RunRecord, inputs: PPOInputs, models: PPOModels) -> PolicyEvaluation | None:
    """The held-out evaluation the driver runs every --eval-every steps and at the end (None
    without held-out prompts)."""
    if inputs.eval_prompts is None:
        return None
    p, tok = cfg.ppo, inputs.tokenizer
    settings = EvalSettings(
        eos_token_id=stop_token_id(tok), pad_token_id=tok.pad_token_id, max_new_tokens=p.max_new_tokens,
        temperature=p.temperature, top_p=p.top_p, batch_size=inputs.generation_batch,
        forward_batch_size=cfg.train.per_device_batch_size,
        table_rows=cfg.train.eval_generations, seed=cfg.train.seed,
        gather=p.gather_for_generation, synced_gpus=run.world.world_size > 1 and not p.gather_for_generation,
        reward_kwargs={"actor_tokenizer": tok, "reward_tokenizer": inputs.reward_tokenizer} if inputs.mismatch else {},
    )
    return PolicyEvaluation(inputs.eval_prompts, models.actor, models.ref, models.reward, tok, settings, run.world,
                            run.tracker)


def run_ppo(cfg: Config, parent_run_id: str | None = None) -> StageResult:
    """Train the actor with PPO and export it."""
    with StageContext(cfg, parent_run_id) as ctx:
        inputs = prepare_inputs(cfg, ctx)
        ds_configs = ppo_ds_configs(cfg, ctx.world)
        run = ctx.begin(
            models={"actor": inputs.actor_path, "reward": inputs.reward_path, "critic": inputs.critic_path},
            ds_configs=ds_configs)
        # On a resumed run the tracker keeps the first values and tags changed ones (resumed.*).
        run.tracker.log_params({"data.train_prompts": len(inputs.prompts), "train.total_steps": inputs.steps,
                                "data.eval_prompts": len(inputs.eval_prompts) if inputs.eval_prompts else 0,
                                "train.optimizer_steps": inputs.optimizer_steps})
        run.tracker.log_datasets(cfg.data.sources, {"train": inputs.prompts, "eval": inputs.eval_prompts})
        models = build_models(cfg, run, inputs, ds_configs)
        run.resume({"actor": models.actor, "critic": models.critic})
        ema = ppo_loop(cfg, run, inputs, models, initial_ema(cfg, run, models.actor))
        # The export: the EMA copy when enabled.
        source = _StateDictSource(ema_state_dict(models.actor, ema)) if cfg.ppo.ema > 0 else models.actor
        model_dir = export_pretrained(
            source, ctx.output_dir / MODEL_SUBDIR, lambda: models.build_actor(), inputs.tokenizer,
            metadata={"stage": "ppo", "base_model": inputs.actor_path, "reward_model": inputs.reward_path,
                      "ema": cfg.ppo.ema, "mlflow_run_id": run.state.run_id},
        )
        return run.finish(model_dir)

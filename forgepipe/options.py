"""The command-line options: which option sets which dotted config key, in one table.

The CLI builds its click options from these rows (types and defaults come from the config
dataclasses), and every error about a config key names the option through `label()`. Plain data:
importing it costs nothing, so config.py and the pre-launch checks use it too.
"""

from __future__ import annotations

# (flags, dotted config key, help). Types and defaults come from the config dataclasses.
COMMON_OPTIONS: list[tuple[str, str, str]] = [
    ("--data", "data.sources", "Data source: JSONL/JSON/Parquet file, saved-dataset dir, or Hub name (repeatable)."),
    ("--data-split", "data.split", "Shares of every source for stages sft,reward,ppo (DeepSpeed-Chat style)."),
    ("--eval-fraction", "data.eval_fraction", "Share of the stage's data held out for evaluation."),
    ("--max-seq-len", "data.max_seq_len", "Longest sequence in tokens (prompt + response)."),
    ("--max-prompt-len", "data.max_prompt_len", "Prompt budget in tokens."),
    ("--packing/--no-packing", "data.packing", "Pack several short SFT samples into one sequence."),
    ("--group-by-length/--no-group-by-length", "data.group_by_length",
     "Put samples of similar length in the same micro-batch (less padding; the order is still seeded by "
     "--seed and the epoch, so a resume continues exactly)."),
    ("--pad-to-multiple-of", "data.pad_to_multiple_of",
     "Round every batch's length up to a multiple of this (1: to its longest row). On GPUs, e.g. 64: a few "
     "batch shapes instead of a new one almost every step (cuDNN attention plans, --compile)."),
    ("--chat-template", "data.chat_template",
     "auto: the tokenizer's chat template when it has one, else forgepipe's '\\n\\nHuman: ...\\n\\nAssistant:' "
     "text; none: that text always; or a Jinja template file (saved with the export)."),
    ("--train-on-all-turns/--no-train-on-all-turns", "data.train_on_all_turns",
     "With a chat template: loss on every assistant turn of a conversation, not only the last."),
    ("--max-dropped-fraction", "data.max_dropped_fraction",
     "Largest share of a source's rows that may be dropped (no format fits) before it is an error."),
    ("--eval-max-samples", "data.eval_max_samples", "Held-out rows evaluated at most (0: all)."),
    ("--cache-dir", "data.cache_dir", "Tokenized-data cache (default: <output-dir>/.cache)."),
    ("--tokenizer", "model.tokenizer", "Tokenizer path (default: the model's)."),
    ("--catalog", "model.catalog", "Model catalog YAML (default: $FORGEPIPE_CATALOG, then the bundled one)."),
    ("--lora-dim", "model.lora_dim", "LoRA rank; 0 trains all weights."),
    ("--lora-alpha", "model.lora_alpha", "LoRA scaling alpha."),
    ("--lora-target-modules", "model.lora_target_modules", "Comma-separated module names (default: per architecture)."),
    ("--gradient-checkpointing/--no-gradient-checkpointing", "model.gradient_checkpointing", "Recompute activations."),
    ("--attn-implementation", "model.attn_implementation",
     "auto: PyTorch SDPA, the head dimension zero-padded to a multiple of 8 where its fused kernels need it "
     "(exact; FORGE-s: 86 -> 88); or a transformers name: sdpa, eager, flash_attention_2, ..."),
    ("--padding-mask/--no-padding-mask", "train.padding_mask",
     "Give the 2D padding mask to supervised forwards (SFT, reward, DPO). Off (default): right-padded batches "
     "go with the causal mask alone, which is exact and lets SDPA use its flash kernels."),
    ("--zero-stage", "deepspeed.zero_stage", "DeepSpeed ZeRO stage (0-3)."),
    ("--offload", "deepspeed.offload", "Offload optimizer (and ZeRO-3 params) to: none or cpu."),
    ("--zeropp/--no-zeropp", "deepspeed.zeropp", "ZeRO++: quantized weights, hpZ, quantized gradients (stage 3)."),
    ("--hpz-size", "deepspeed.hpz_size", "hpZ secondary partition size (default with --zeropp: ranks per node)."),
    ("--quantized-weights/--no-quantized-weights", "deepspeed.quantized_weights", "ZeRO++ qwZ alone."),
    ("--quantized-gradients/--no-quantized-gradients", "deepspeed.quantized_gradients", "ZeRO++ qgZ alone."),
    ("--torch-adam/--no-torch-adam", "deepspeed.torch_adam", "Use torch's AdamW instead of DeepSpeed's op."),
    ("--check-grad-overflow/--no-check-grad-overflow", "deepspeed.check_grad_overflow",
     "bf16: DeepSpeed's per-parameter inf/NaN check, which skips a bad step (costs a host sync and ~10 kernels "
     "per parameter every step). Off by default: a non-finite gradient norm stops the run at the next log."),
    ("--flops-profiler/--no-flops-profiler", "deepspeed.flops_profiler", "Run DeepSpeed's flops profiler."),
    ("--dtype", "train.dtype", "Training precision."),
    ("--per-device-batch-size", "train.per_device_batch_size", "Micro-batch per rank."),
    ("--tokens-per-micro-batch", "train.tokens_per_micro_batch",
     "SFT, reward, DPO: cut micro-batches by padded tokens (rows x longest length, pairs count both rows) "
     "instead of --per-device-batch-size rows: like lengths together, as many samples as fit; seeded and "
     "resumable like the row order. 0: off."),
    ("--grad-accum", "train.grad_accum", "Gradient accumulation steps."),
    ("--lr", "train.lr", "Peak learning rate."),
    ("--weight-decay", "train.weight_decay", "AdamW weight decay."),
    ("--warmup-ratio", "train.warmup_ratio", "Share of steps spent warming the LR up."),
    ("--epochs", "train.epochs", "Passes over the training share."),
    ("--max-steps", "train.max_steps", "Stop after this many optimizer steps (0: run the epochs)."),
    ("--seed", "train.seed", "Seed of data order and initialisation."),
    ("--eval-every", "train.eval_every", "Evaluate every N steps (0: at the end only)."),
    ("--eval-generations", "train.eval_generations",
     "Held-out generations (reward: scored pairs) logged as an MLflow table at each evaluation (0: off)."),
    ("--eval-max-new-tokens", "train.eval_max_new_tokens", "Longest answer generated for the evaluation table."),
    ("--log-every", "train.log_every", "Log metrics every N steps."),
    ("--save-every", "train.save_every", "Checkpoint every N steps (0: at the end only)."),
    ("--save-every-minutes", "train.save_every_minutes", "Checkpoint every M minutes (0: off)."),
    ("--keep-last", "train.keep_last", "Checkpoints kept on disk."),
    ("--final-checkpoint/--no-final-checkpoint", "train.final_checkpoint",
     "Write a resumable checkpoint (weights and optimizer state) at the end of the run. Without it only the "
     "export is written: a faster end, but the finished run cannot be extended with a larger --max-steps."),
    ("--compile/--no-compile", "train.compile",
     "torch.compile the trained models' forward and backward (dynamic shapes; generation stays eager). "
     "The first steps pay the compilation."),
    ("--peak-tflops", "train.peak_tflops", "Per-device peak TFLOP/s for MFU (MI250X GCD bf16: 191.5)."),
    ("--dist-timeout-minutes", "train.dist_timeout_minutes", "A collective stuck this long aborts the job."),
    ("--resume", "train.resume", "auto (continue from the output dir's checkpoint), never, or a checkpoint dir."),
    ("--allow-changed-inputs/--no-allow-changed-inputs", "train.allow_changed_inputs",
     "Resume although a data file or the --chat-template file changed in place since the checkpoint (its "
     "SHA-256 differs); without it such a resume is refused."),
    ("--overwrite/--no-overwrite", "overwrite",
     "Replace the outputs of an earlier run in --output-dir (removed first); without it a finished run is kept."),
    ("--tracking-uri", "tracking.uri", "MLflow URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlruns/mlflow.db)."),
    ("--experiment", "tracking.experiment", "MLflow experiment name."),
    ("--run-name", "tracking.run_name", "MLflow run name."),
    ("--log-checkpoints/--no-log-checkpoints", "tracking.log_checkpoints", "Copy the exported model into MLflow."),
]

PPO_OPTIONS: list[tuple[str, str, str]] = [
    ("--critic", "ppo.critic_model", "Critic start (default: the reward model)."),
    ("--critic-lr", "ppo.critic_lr", "Critic learning rate."),
    ("--critic-zero-stage", "ppo.critic_zero_stage", "Critic ZeRO stage (default: the actor's)."),
    ("--critic-lora-dim", "ppo.critic_lora_dim", "Critic LoRA rank."),
    ("--critic-gradient-checkpointing/--no-critic-gradient-checkpointing", "ppo.critic_gradient_checkpointing",
     "Recompute the critic's activations."),
    ("--ref-zero-stage", "ppo.ref_zero_stage", "ZeRO stage of the frozen reference and reward models."),
    ("--allow-tokenizer-mismatch/--no-allow-tokenizer-mismatch", "ppo.allow_tokenizer_mismatch",
     "Accept actor and reward tokenizers that differ (responses are re-tokenized)."),
    ("--max-new-tokens", "ppo.max_new_tokens", "Longest generated response."),
    ("--temperature", "ppo.temperature", "Sampling temperature."),
    ("--top-p", "ppo.top_p", "Nucleus sampling."),
    ("--generation-batch-size", "ppo.generation_batch_size", "Prompts per rank per experience batch."),
    ("--max-rollout-logprob-gap", "ppo.max_rollout_logprob_gap",
     "Stop when the sampler's log-probs drift from the training forward's by more than this (nats per token, "
     "mean over a log window; logged as ppo/rollout_logprob_gap)."),
    ("--scoring-tokens", "ppo.scoring_tokens",
     "Tokens per scoring forward over a rollout (actor, reference, critic, reward log-probs/values/scores): as "
     "many rows as fit at its longest length. 0: --per-device-batch-size rows."),
    ("--rollout-cache", "ppo.rollout_cache",
     "The sampler's KV cache: dynamic (grows a token at a time) or static (allocated once per generation call "
     "for prompt + --max-new-tokens; every decode step one shape)."),
    ("--rollout-compile/--no-rollout-compile", "ppo.rollout_compile",
     "torch.compile the decode step once for its shape (CUDA/HIP graphs on a GPU, inductor elsewhere); needs "
     "--rollout-cache static."),
    ("--rollout-check-every", "ppo.rollout_check_every",
     "Generated tokens between the checks whether every response has ended (each check is a host sync)."),
    ("--ppo-epochs", "ppo.ppo_epochs", "PPO passes over each experience batch."),
    ("--eval-prompts", "ppo.eval_prompts",
     "Held-out prompts answered by the policy and the reference at each evaluation (0: off)."),
    ("--kl-coef", "ppo.kl_coef", "KL penalty coefficient."),
    ("--reward-clip", "ppo.reward_clip", "Clip of the reward-model score."),
    ("--policy-clip", "ppo.policy_clip", "PPO ratio clip."),
    ("--value-clip", "ppo.value_clip", "Value clip."),
    ("--gamma", "ppo.gamma", "Discount."),
    ("--lam", "ppo.lam", "GAE lambda."),
    ("--whiten-advantages/--no-whiten-advantages", "ppo.whiten_advantages", "Whiten advantages per batch."),
    ("--unsupervised-data", "data.unsupervised_sources", "{text} documents for the unsupervised term (repeatable)."),
    ("--ptx-coef", "ppo.ptx_coef", "Unsupervised loss coefficient (0: off)."),
    ("--ema", "ppo.ema", "EMA decay of the actor for export (0: off)."),
]

DPO_OPTIONS: list[tuple[str, str, str]] = [
    ("--ref", "dpo.ref_model", "Frozen reference (default: the starting model; with LoRA the policy with adapters off)."),
    ("--loss", "dpo.loss", "Preference loss: dpo (sigmoid), ipo, or simpo (reference-free, length-normalised)."),
    ("--beta", "dpo.beta", "Inverse temperature of the implicit reward (DPO/IPO ~0.1, SimPO 2-10)."),
    ("--label-smoothing", "dpo.label_smoothing", "Share of preference labels assumed flipped (conservative DPO)."),
    ("--gamma-beta-ratio", "dpo.gamma_beta_ratio", "SimPO's target reward margin gamma, divided by beta."),
    ("--precompute-ref/--no-precompute-ref", "dpo.precompute_ref",
     "Reference log-probs computed once before training (cached by data), then the reference is freed."),
]

REPEATABLE = {"data.sources", "data.unsupervised_sources"}
# The option each key is set by, for messages: the stages' positional-like options too.
LABELS = {key: flags.split("/")[0] for flags, key, _ in COMMON_OPTIONS + PPO_OPTIONS + DPO_OPTIONS} | {
    "model.name_or_path": "--model", "output_dir": "--output-dir", "ppo.reward_model": "--reward",
    "reward.margin_field": "--margin-field"}


def label(key: str) -> str:
    """What an error says for a dotted config key: the option that sets it, else the key itself
    (keys without an option are set in a YAML file or with `config show KEY=VALUE`)."""
    return LABELS.get(key, key)

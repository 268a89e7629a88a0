"""The `forgepipe` command: one sub-command per stage, the whole pipeline, and `config show`.

Every option maps to one dotted config key; its default is the config's (shown in --help). A
YAML file (--config) sets the same keys; options given on the command line override it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import sys
import typing
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import yaml

from forgepipe import __version__
from forgepipe.config import Config, build_config, set_dotted, validate
from forgepipe.errors import ForgeError
from forgepipe.preflight import check_run, check_shown

# (flags, dotted config key, help). Types and defaults come from the config dataclasses.
COMMON_OPTIONS: list[tuple[str, str, str]] = [
    ("--data", "data.sources", "Data source: JSONL/JSON/Parquet file, saved-dataset dir, or Hub name (repeatable)."),
    ("--data-split", "data.split", "Shares of every source for stages sft,reward,ppo (DeepSpeed-Chat style)."),
    ("--eval-fraction", "data.eval_fraction", "Share of the stage's data held out for evaluation."),
    ("--max-seq-len", "data.max_seq_len", "Longest sequence in tokens (prompt + response)."),
    ("--max-prompt-len", "data.max_prompt_len", "Prompt budget in tokens."),
    ("--packing/--no-packing", "data.packing", "Pack several short SFT samples into one sequence."),
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
    ("--zero-stage", "deepspeed.zero_stage", "DeepSpeed ZeRO stage (0-3)."),
    ("--offload", "deepspeed.offload", "Offload optimizer (and ZeRO-3 params) to: none or cpu."),
    ("--zeropp/--no-zeropp", "deepspeed.zeropp", "ZeRO++: quantized weights, hpZ, quantized gradients (stage 3)."),
    ("--hpz-size", "deepspeed.hpz_size", "hpZ secondary partition size (default with --zeropp: ranks per node)."),
    ("--quantized-weights/--no-quantized-weights", "deepspeed.quantized_weights", "ZeRO++ qwZ alone."),
    ("--quantized-gradients/--no-quantized-gradients", "deepspeed.quantized_gradients", "ZeRO++ qgZ alone."),
    ("--torch-adam/--no-torch-adam", "deepspeed.torch_adam", "Use torch's AdamW instead of DeepSpeed's op."),
    ("--flops-profiler/--no-flops-profiler", "deepspeed.flops_profiler", "Run DeepSpeed's flops profiler."),
    ("--dtype", "train.dtype", "Training precision."),
    ("--per-device-batch-size", "train.per_device_batch_size", "Micro-batch per rank."),
    ("--grad-accum", "train.grad_accum", "Gradient accumulation steps."),
    ("--lr", "train.lr", "Peak learning rate."),
    ("--weight-decay", "train.weight_decay", "AdamW weight decay."),
    ("--warmup-ratio", "train.warmup_ratio", "Share of steps spent warming the LR up."),
    ("--epochs", "train.epochs", "Passes over the training share."),
    ("--max-steps", "train.max_steps", "Stop after this many optimizer steps (0: run the epochs)."),
    ("--seed", "train.seed", "Seed of data order and initialisation."),
    ("--eval-every", "train.eval_every", "Evaluate every N steps (0: at the end only)."),
    ("--log-every", "train.log_every", "Log metrics every N steps."),
    ("--save-every", "train.save_every", "Checkpoint every N steps (0: at the end only)."),
    ("--save-every-minutes", "train.save_every_minutes", "Checkpoint every M minutes (0: off)."),
    ("--keep-last", "train.keep_last", "Checkpoints kept on disk."),
    ("--peak-tflops", "train.peak_tflops", "Per-device peak TFLOP/s for MFU (MI250X GCD bf16: 191.5)."),
    ("--dist-timeout-minutes", "train.dist_timeout_minutes", "A collective stuck this long aborts the job."),
    ("--resume", "train.resume", "auto (continue from the output dir's checkpoint), never, or a checkpoint dir."),
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
    ("--ppo-epochs", "ppo.ppo_epochs", "PPO passes over each experience batch."),
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

REPEATABLE = {"data.sources", "data.unsupervised_sources"}
# Error messages name the option the user typed.
LABELS = {key: flags.split("/")[0] for flags, key, _ in COMMON_OPTIONS + PPO_OPTIONS} | {
    "model.name_or_path": "--model", "output_dir": "--output-dir", "ppo.reward_model": "--reward",
    "reward.margin_field": "--margin-field"}


def _field(key: str) -> tuple[Any, Any]:
    """(type annotation, default) of a dotted config key."""
    node: Any = Config()
    parts = key.split(".")
    for part in parts[:-1]:
        node = getattr(node, part)
    hints = typing.get_type_hints(type(node))
    return hints[parts[-1]], getattr(node, parts[-1])


def _param_name(flags: str) -> str:
    return flags.split("/")[0].lstrip("-").replace("-", "_")


def _click_option(flags: str, key: str, help_text: str) -> Callable:
    annotation, default = _field(key)
    shown = "" if default in (None, "", []) else f"  [default: {default}]"
    name = _param_name(flags)
    if "/" in flags:
        return click.option(flags, name, default=None, help=help_text + shown)
    if key in REPEATABLE:
        return click.option(flags, name, multiple=True, help=help_text, metavar="SOURCE")
    choices = [str(a) for a in typing.get_args(annotation)] if typing.get_origin(annotation) is typing.Literal else None
    if choices is None:  # Literal inside an Optional
        for arg in typing.get_args(annotation):
            if typing.get_origin(arg) is typing.Literal:
                choices = [str(a) for a in typing.get_args(arg)]
    click_type = click.Choice(choices) if choices else None
    return click.option(flags, name, default=None, type=click_type, help=help_text + shown)


def with_options(table: list[tuple[str, str, str]]) -> Callable:
    def decorate(fn):
        for flags, key, help_text in reversed(table):
            fn = _click_option(flags, key, help_text)(fn)
        return fn
    return decorate


def overrides_from(kwargs: dict[str, Any], table: list[tuple[str, str, str]]) -> dict[str, Any]:
    out = {}
    for flags, key, _ in table:
        value = kwargs.get(_param_name(flags))
        if key in REPEATABLE:
            value = list(value) if value else None
        out[key] = value
    return out


def setup_logging(verbose: bool) -> None:
    rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", 0)))
    world = int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", 1)))
    prefix = f"[rank {rank}] " if world > 1 else ""
    level = logging.INFO if rank == 0 else logging.WARNING
    logging.basicConfig(level=logging.DEBUG if verbose else level,
                        format=f"%(asctime)s {prefix}%(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed", "httpx", "urllib3", "alembic", "mlflow"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if verbose else logging.WARNING)
    if not verbose:
        # torch.distributed's deprecation notices repeat at every ZeRO step.
        warnings.filterwarnings("ignore", category=FutureWarning)
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("DATASETS_VERBOSITY", "error")


def run_stage(fn: Callable[[], Any]) -> Any:
    """Run a stage, turning user errors into one line and a signal stop into its exit status."""
    from forgepipe.loop import EXIT_PREEMPTED, Preempted

    try:
        result = fn()
    except ForgeError as exc:
        close_progress_bars()
        click.echo(f"forgepipe: error: {exc}", err=True)
        sys.exit(2)
    except Preempted as exc:
        close_progress_bars()
        done = "nothing to checkpoint yet" if "during start-up" in str(exc) else "checkpoint written"
        click.echo(f"forgepipe: {exc}; {done}, resubmit to continue", err=True)
        sys.exit(EXIT_PREEMPTED)
    # Finished: a stop signal from here on (a walltime warning racing the end of the job) must not
    # turn a finished run's exit status into 143.
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)
    return result


def close_progress_bars() -> None:
    """End an open tqdm bar's line, so that the message after it starts a line of its own."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


def preflight(check: Callable[[], None]) -> None:
    """The pre-launch checks (preflight.py): one line and exit 2 before anything heavy starts."""
    try:
        check()
    except ForgeError as exc:
        click.echo(f"forgepipe: error: {exc}", err=True)
        sys.exit(2)


def catch_stop_signals() -> None:
    """From the start of a stage command: Slurm's walltime warning (SIGUSR1/SIGTERM) asks for a
    checkpoint at the next step boundary instead of killing the process mid-start-up."""
    from forgepipe.signals import catch_early

    catch_early()  # forgepipe.loop (and its StopRequest) imports torch and transformers: seconds


def make_config(stage: str, config_file: str | None, overrides: dict[str, Any]) -> Config:
    catch_stop_signals()
    try:
        return build_config(stage, config_file, overrides, LABELS)
    except ForgeError as exc:
        click.echo(f"forgepipe: error: {exc}", err=True)
        sys.exit(2)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="forgepipe")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging, DeepSpeed's included.")
def main(verbose: bool) -> None:
    """forgepipe: RLHF fine-tuning (SFT -> reward model -> PPO) with DeepSpeed, on a laptop or on Frontier.

    Launch under torchrun, the deepspeed launcher, or directly under Slurm's srun (one task per GPU).
    """
    setup_logging(verbose)


def _done(what: str, model_dir: str, cfg: Config) -> None:
    from forgepipe.distributed import is_main_process
    from forgepipe.stages.common import RUN_FILE
    from forgepipe.tracking import resolve_tracking_uri

    if is_main_process():
        run_file = Path(cfg.output_dir) / RUN_FILE
        run_id = json.loads(run_file.read_text()).get("mlflow_run_id") if run_file.is_file() else None
        click.echo(f"{what} model: {model_dir}")
        click.echo(f"MLflow: {resolve_tracking_uri(cfg.tracking.uri)} (experiment {cfg.tracking.experiment!r}"
                   + (f", run {run_id})" if run_id else ")"))


@main.command()
@click.option("--model", "model", default=None, help="Model: catalog name (forge-s, ...), local dir, or Hub name.")
@click.option("--output-dir", default=None, help="Where checkpoints and the exported model go.")
@click.option("--config", "config_file", type=click.Path(), default=None, help="YAML config file.")
@with_options(COMMON_OPTIONS)
def sft(model, output_dir, config_file, **kwargs):
    """Stage 1: supervised fine-tuning on prompt/response pairs and documents."""
    overrides = {"model.name_or_path": model, "output_dir": output_dir, **overrides_from(kwargs, COMMON_OPTIONS)}
    cfg = make_config("sft", config_file, overrides)
    preflight(lambda: check_run(cfg))
    from forgepipe.stages.sft import run_sft

    _done("SFT", run_stage(lambda: run_sft(cfg)), cfg)


@main.command()
@click.option("--model", "model", default=None, help="Backbone: SFT output, catalog name, local dir, or Hub name.")
@click.option("--output-dir", default=None, help="Where checkpoints and the exported reward model go.")
@click.option("--config", "config_file", type=click.Path(), default=None, help="YAML config file.")
@click.option("--margin-field", default=None, help="Numeric data field added as a margin to the pairwise loss.")
@with_options(COMMON_OPTIONS)
def reward(model, output_dir, config_file, margin_field, **kwargs):
    """Stage 2: reward model (backbone + scalar head) on chosen/rejected pairs."""
    overrides = {"model.name_or_path": model, "output_dir": output_dir, "reward.margin_field": margin_field,
                 **overrides_from(kwargs, COMMON_OPTIONS)}
    cfg = make_config("reward", config_file, overrides)
    preflight(lambda: check_run(cfg))
    from forgepipe.stages.reward import run_reward

    _done("Reward", run_stage(lambda: run_reward(cfg)), cfg)


@main.command()
@click.option("--actor", default=None, help="Actor start (and reference): SFT output or model.")
@click.option("--reward", "reward_model", default=None, help="Reward model: stage-2 output.")
@click.option("--output-dir", default=None, help="Where checkpoints and the exported actor go.")
@click.option("--config", "config_file", type=click.Path(), default=None, help="YAML config file.")
@with_options(COMMON_OPTIONS + PPO_OPTIONS)
def ppo(actor, reward_model, output_dir, config_file, **kwargs):
    """Stage 3: PPO of the actor against the frozen reward model, close to the frozen reference."""
    overrides = {"model.name_or_path": actor, "ppo.reward_model": reward_model, "output_dir": output_dir,
                 **overrides_from(kwargs, COMMON_OPTIONS + PPO_OPTIONS)}
    cfg = make_config("ppo", config_file, overrides)
    preflight(lambda: check_run(cfg))
    from forgepipe.stages.ppo.trainer import run_ppo

    _done("PPO actor", run_stage(lambda: run_ppo(cfg)), cfg)


@main.command()
@click.option("--model", "model", default=None, help="Actor base model (stage 1 input).")
@click.option("--reward-model", default=None, help="Reward backbone (stage 2 input); may differ from --model.")
@click.option("--output-dir", default=None, help="Parent directory: sft/, reward/, ppo/ go inside.")
@click.option("--config", "config_file", type=click.Path(), default=None,
              help="YAML: shared keys at the top, per-stage keys under stages: {sft: ..., reward: ..., ppo: ...}.")
@with_options(COMMON_OPTIONS + PPO_OPTIONS)
def pipeline(model, reward_model, output_dir, config_file, **kwargs):
    """Stages 1, 2 and 3 in order, each on its share of the data, each export feeding the next."""
    from forgepipe.preflight import check_pipeline
    from forgepipe.stages.pipeline import pipeline_configs, run_pipeline

    catch_stop_signals()
    overrides = overrides_from(kwargs, COMMON_OPTIONS + PPO_OPTIONS)
    try:
        configs = pipeline_configs(model, reward_model, output_dir, config_file, overrides, LABELS)
    except ForgeError as exc:
        click.echo(f"forgepipe: error: {exc}", err=True)
        sys.exit(2)
    preflight(lambda: check_pipeline(configs))
    result = run_stage(lambda: run_pipeline(configs))
    _done("PPO actor", result, configs["ppo"])


@main.group()
def config():
    """Inspect configuration."""


@config.command("show")
@click.option("--stage", type=click.Choice(["sft", "reward", "ppo"]), default="sft", show_default=True)
@click.option("--model", "model", default=None, help="Model (or PPO actor).")
@click.option("--output-dir", default=None)
@click.option("--config", "config_file", type=click.Path(), default=None, help="YAML config file.")
@click.option("--format", "fmt", type=click.Choice(["yaml", "json"]), default="yaml", show_default=True)
@click.option("--assume-gpu", is_flag=True, help="Check as for a GPU job (dry runs on a CPU login node).")
@with_options(COMMON_OPTIONS + PPO_OPTIONS)
@click.argument("assignments", nargs=-1, metavar="[KEY=VALUE]...")
def config_show(stage, model, output_dir, config_file, fmt, assume_gpu, assignments, **kwargs):
    """Print the fully resolved config and its DeepSpeed JSON for this launch, and exit.

    KEY=VALUE pairs set any dotted key, e.g. deepspeed.stage3_max_live_parameters=1e9.
    """
    from forgepipe.deepspeed_config import build_ds_config, validate_launch
    from forgepipe.distributed import detect_world

    overrides = {"model.name_or_path": model, "output_dir": output_dir,
                 **overrides_from(kwargs, COMMON_OPTIONS + PPO_OPTIONS)}
    try:
        cfg = build_config(stage, config_file, overrides, LABELS)
        for item in assignments:
            if "=" not in item:
                raise ForgeError(f"{item!r}: expected KEY=VALUE")
            key, value = item.split("=", 1)
            set_dotted(cfg, key, yaml.safe_load(value))
        validate(cfg)
        check_shown(cfg)
        world = detect_world()
        import torch

        validate_launch(cfg, world, has_gpu=assume_gpu or torch.cuda.is_available())
        resolved = {"config": dataclasses.asdict(cfg), "deepspeed": build_ds_config(cfg, world),
                    "world": dataclasses.asdict(world)}
    except ForgeError as exc:
        click.echo(f"forgepipe: error: {exc}", err=True)
        sys.exit(2)
    if fmt == "json":
        click.echo(json.dumps(resolved, indent=2))
    else:
        click.echo(yaml.safe_dump(resolved, sort_keys=False))


@main.command("models")
@click.option("--catalog", default=None, help="Catalog YAML (default: $FORGEPIPE_CATALOG, then the bundled one).")
def models_cmd(catalog):
    """List the named models of the catalog and where they resolve."""
    from forgepipe.models.catalog import list_models

    try:
        for name, path in list_models(catalog).items():
            click.echo(f"{name}\t{path}")
    except ForgeError as exc:
        click.echo(f"forgepipe: error: {exc}", err=True)
        sys.exit(2)


from forgepipe.runs_cli import runs  # noqa: E402  (the `forgepipe runs` group)

main.add_command(runs)


if __name__ == "__main__":
    main()

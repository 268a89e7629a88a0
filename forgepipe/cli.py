"""The `forgepipe` command: one sub-command per stage, the whole pipeline, and `config show`.

Every option maps to one dotted config key (options.py); its type and default are the config's
(shown in --help). A YAML file (--config) sets the same keys; options given on the command line
override it. Every error, click's own included, is one line `forgepipe: error: ...` and exit 2.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import types
import typing
import warnings
from collections.abc import Callable
from typing import Any

import click
import yaml

from forgepipe import __version__
from forgepipe.config import DEFAULT_NOTES, Config, build_config, set_dotted, validate
from forgepipe.errors import ForgeError
from forgepipe.layout import StageResult, share_with_group
from forgepipe.options import COMMON_OPTIONS, DPO_OPTIONS, PPO_OPTIONS, REPEATABLE
from forgepipe.preflight import check_run, check_shown, resolve_zero_stage
from forgepipe.signals import EXIT_PREEMPTED, STOP, Preempted, StartupStop


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


def click_type(annotation: Any) -> click.ParamType:
    """The click type of a config field's annotation (its Optional and Literal unwrapped)."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) is typing.Literal:
        return click.Choice([str(a) for a in typing.get_args(annotation)])
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(args) == 1:
        return click_type(args[0])
    return {int: click.INT, float: click.FLOAT}.get(annotation, click.STRING)


def _click_option(flags: str, key: str, help_text: str) -> Callable:
    annotation, default = _field(key)
    shown = "" if default in (None, "", []) else f"  [default: {default}]"
    if key in DEFAULT_NOTES:
        shown = f"  [default: {DEFAULT_NOTES[key]}]"
    name = _param_name(flags)
    if "/" in flags:
        return click.option(flags, name, default=None, help=help_text + shown)
    if key in REPEATABLE:
        return click.option(flags, name, multiple=True, help=help_text, metavar="SOURCE")
    return click.option(flags, name, default=None, type=click_type(annotation), help=help_text + shown)


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


def close_progress_bars() -> None:
    """End an open tqdm bar's line, so that the message after it starts a line of its own."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


def fail(message: str, status: int = 2) -> typing.NoReturn:
    close_progress_bars()
    click.echo(f"forgepipe: {message}", err=True)
    sys.exit(status)


class Forgepipe(click.Group):
    """The command group, and the one place where errors become exit statuses: a ForgeError or a
    usage error of click's is one line and exit 2, a stop signal's Preempted is EXIT_PREEMPTED (the
    batch scripts resubmit), and once a command has finished a stop signal is ignored (a walltime
    warning racing the end of the job must not turn a finished run's status into 143)."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            status = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except ForgeError as exc:
            fail(f"error: {exc}")
        except StartupStop as exc:
            fail(f"{exc}; nothing to checkpoint yet, resubmit to continue", EXIT_PREEMPTED)
        except Preempted as exc:
            fail(f"{exc}; checkpoint written, resubmit to continue", EXIT_PREEMPTED)
        except click.ClickException as exc:
            hint = f" (see '{exc.ctx.command_path} --help')" if getattr(exc, "ctx", None) else ""
            fail(f"error: {exc.format_message()}{hint}".replace("\n", " "), exc.exit_code)
        except click.Abort:
            fail("aborted", 1)
        STOP.ignore()
        sys.exit(status if isinstance(status, int) else 0)


def stage_config(stage: str, config_file: str | None, overrides: dict[str, Any]) -> Config:
    """A stage command's config, checked before anything heavy starts (preflight.py). From here on
    Slurm's walltime warning (SIGUSR1/SIGTERM) stops the run instead of killing the process."""
    STOP.install()
    cfg = build_config(stage, config_file, overrides)
    check_run(cfg)
    return cfg


@click.group(cls=Forgepipe, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="forgepipe")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging, DeepSpeed's included.")
def main(verbose: bool) -> None:
    """forgepipe: RLHF fine-tuning (SFT -> reward model -> PPO) with DeepSpeed, on a laptop or on Frontier.

    Launch under torchrun, the deepspeed launcher, or directly under Slurm's srun (one task per GPU).
    """
    setup_logging(verbose)
    share_with_group()  # Frontier projects share directories: what forgepipe writes is group-readable


def report(what: str, result: StageResult, cfg: Config) -> None:
    """Where the model and the MLflow run of a finished stage are (rank 0 only)."""
    from forgepipe.distributed import is_main_process

    if is_main_process():
        click.echo(f"{what} model: {result.model_dir}")
        click.echo(f"MLflow: {result.tracking_uri} (experiment {cfg.tracking.experiment!r}"
                   + (f", run {result.run_id})" if result.run_id else ")"))
        if result.run_id:
            from forgepipe.runs import run_summary

            click.echo(run_summary(result.tracking_uri, result.run_id))


@main.command()
@click.option("--model", "model", default=None, help="Model: catalog name (forge-s, ...), local dir, or Hub name.")
@click.option("--output-dir", default=None, help="Where checkpoints and the exported model go.")
@click.option("--config", "config_file", type=click.Path(), default=None, help="YAML config file.")
@with_options(COMMON_OPTIONS)
def sft(model, output_dir, config_file, **kwargs):
    """Stage 1: supervised fine-tuning on prompt/response pairs and documents."""
    cfg = stage_config("sft", config_file, {"model.name_or_path": model, "output_dir": output_dir,
                                            **overrides_from(kwargs, COMMON_OPTIONS)})
    from forgepipe.stages.sft import run_sft

    report("SFT", run_sft(cfg), cfg)


@main.command()
@click.option("--model", "model", default=None, help="Backbone: SFT output, catalog name, local dir, or Hub name.")
@click.option("--output-dir", default=None, help="Where checkpoints and the exported reward model go.")
@click.option("--config", "config_file", type=click.Path(), default=None, help="YAML config file.")
@click.option("--margin-field", default=None, help="Numeric data field added as a margin to the pairwise loss.")
@with_options(COMMON_OPTIONS)
def reward(model, output_dir, config_file, margin_field, **kwargs):
    """Stage 2: reward model (backbone + scalar head) on chosen/rejected pairs."""
    cfg = stage_config("reward", config_file, {"model.name_or_path": model, "output_dir": output_dir,
                                               "reward.margin_field": margin_field,
                                               **overrides_from(kwargs, COMMON_OPTIONS)})
    from forgepipe.stages.reward import run_reward

    report("Reward", run_reward(cfg), cfg)


@main.command()
@click.option("--actor", default=None, help="Actor start (and reference): SFT output or model.")
@click.option("--reward", "reward_model", default=None, help="Reward model: stage-2 output.")
@click.option("--output-dir", default=None, help="Where checkpoints and the exported actor go.")
@click.option("--config", "config_file", type=click.Path(), default=None, help="YAML config file.")
@with_options(COMMON_OPTIONS + PPO_OPTIONS)
def ppo(actor, reward_model, output_dir, config_file, **kwargs):
    """Stage 3: PPO of the actor against the frozen reward model, close to the frozen reference."""
    cfg = stage_config("ppo", config_file, {"model.name_or_path": actor, "ppo.reward_model": reward_model,
                                            "output_dir": output_dir,
                                            **overrides_from(kwargs, COMMON_OPTIONS + PPO_OPTIONS)})
    from forgepipe.stages.ppo.trainer import run_ppo

    report("PPO actor", run_ppo(cfg), cfg)


@main.command()
@click.option("--model", "model", default=None, help="Policy start (and reference): SFT output or model.")
@click.option("--output-dir", default=None, help="Where checkpoints and the exported policy go.")
@click.option("--config", "config_file", type=click.Path(), default=None, help="YAML config file.")
@with_options(COMMON_OPTIONS + DPO_OPTIONS)
def dpo(model, output_dir, config_file, **kwargs):
    """Direct preference optimisation (DPO, IPO, SimPO) on chosen/rejected pairs: no reward model."""
    cfg = stage_config("dpo", config_file, {"model.name_or_path": model, "output_dir": output_dir,
                                            **overrides_from(kwargs, COMMON_OPTIONS + DPO_OPTIONS)})
    from forgepipe.stages.dpo.trainer import run_dpo

    report("DPO policy", run_dpo(cfg), cfg)


@main.command()
@click.option("--model", "model", default=None, help="Actor base model (stage 1 input).")
@click.option("--reward-model", default=None, help="Reward backbone (stage 2 input); may differ from --model.")
@click.option("--output-dir", default=None, help="Parent directory: sft/, reward/, ppo/ (or dpo/) go inside.")
@click.option("--config", "config_file", type=click.Path(), default=None,
              help="YAML: shared keys at the top, per-stage keys under stages: {sft: ..., reward: ..., ppo: ...}.")
@click.option("--method", type=click.Choice(["ppo", "dpo"]), default="ppo", show_default=True,
              help="ppo: sft -> reward -> ppo. dpo: sft -> dpo (DPO on the reward share of --data-split).")
@with_options(COMMON_OPTIONS + PPO_OPTIONS + DPO_OPTIONS)
def pipeline(model, reward_model, output_dir, config_file, method, **kwargs):
    """SFT, then reward model and PPO (--method ppo) or DPO (--method dpo), each on its share of the
    data, each export feeding the next, under one MLflow parent run."""
    from forgepipe.preflight import check_pipeline
    from forgepipe.stages.pipeline import pipeline_configs, run_pipeline

    STOP.install()
    overrides = overrides_from(kwargs, COMMON_OPTIONS + PPO_OPTIONS + DPO_OPTIONS)
    configs = pipeline_configs(model, reward_model, output_dir, config_file, overrides, method=method)
    check_pipeline(configs)
    last = list(configs)[-1]
    result = run_pipeline(configs)
    report("PPO actor" if last == "ppo" else "DPO policy", result, configs[last])
    from forgepipe.distributed import is_main_process

    if is_main_process():
        from forgepipe.runs import pipeline_summary
        from forgepipe.stages.pipeline import parent_run_id

        click.echo(pipeline_summary(result.tracking_uri, parent_run_id(configs)))


@main.group()
def config():
    """Inspect configuration."""


@config.command("show")
@click.option("--stage", type=click.Choice(["sft", "reward", "ppo", "dpo"]), default="sft", show_default=True)
@click.option("--model", "model", default=None, help="Model (or PPO actor).")
@click.option("--output-dir", default=None)
@click.option("--config", "config_file", type=click.Path(), default=None, help="YAML config file.")
@click.option("--format", "fmt", type=click.Choice(["yaml", "json"]), default="yaml", show_default=True)
@click.option("--assume-gpu", is_flag=True, help="Check as for a GPU job (dry runs on a CPU login node).")
@click.option("--paths", "list_paths", is_flag=True,
              help="Only list the paths this config reads and writes, one a line: ACCESS<TAB>KEY<TAB>PATH.")
@with_options(COMMON_OPTIONS + PPO_OPTIONS + DPO_OPTIONS)
@click.argument("assignments", nargs=-1, metavar="[KEY=VALUE]...")
def config_show(stage, model, output_dir, config_file, fmt, assume_gpu, list_paths, assignments, **kwargs):
    """Print the fully resolved config and its DeepSpeed JSON for this launch, and exit.

    KEY=VALUE pairs set any dotted key, e.g. deepspeed.stage3_max_live_parameters=1e9.
    """
    overrides = {"model.name_or_path": model, "output_dir": output_dir,
                 **overrides_from(kwargs, COMMON_OPTIONS + PPO_OPTIONS + DPO_OPTIONS)}
    if list_paths:
        from forgepipe.paths import apply_assignments, config_paths, format_paths, unvalidated_config

        cfg = unvalidated_config(stage, config_file, overrides)
        apply_assignments(cfg, assignments)
        click.echo(format_paths(config_paths(cfg, config_file)))
        return
    from forgepipe.deepspeed_config import build_ds_config, validate_launch
    from forgepipe.distributed import detect_world

    cfg = build_config(stage, config_file, overrides)
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
    resolve_zero_stage(cfg, world)
    resolved = {"config": dataclasses.asdict(cfg), "deepspeed": build_ds_config(cfg, world),
                "world": dataclasses.asdict(world)}
    if fmt == "json":
        click.echo(json.dumps(resolved, indent=2))
    else:
        click.echo(yaml.safe_dump(resolved, sort_keys=False))


# Each stage command's own options -> (its option table, the config keys of its named parameters).
_STAGE_PARAMS: dict[str, tuple[list[tuple[str, str, str]], dict[str, str]]] = {
    "sft": (COMMON_OPTIONS, {"model": "model.name_or_path"}),
    "reward": (COMMON_OPTIONS, {"model": "model.name_or_path", "margin_field": "reward.margin_field"}),
    "ppo": (COMMON_OPTIONS + PPO_OPTIONS, {"actor": "model.name_or_path", "reward_model": "ppo.reward_model"}),
    "dpo": (COMMON_OPTIONS + DPO_OPTIONS, {"model": "model.name_or_path"}),
    "pipeline": (COMMON_OPTIONS + PPO_OPTIONS + DPO_OPTIONS, {}),
}


@config.command("paths", context_settings={"ignore_unknown_options": True, "help_option_names": []})
@click.argument("stage", type=click.Choice(list(_STAGE_PARAMS)))
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def config_paths_cmd(stage, args):
    """The paths `forgepipe STAGE ARGS...` reads and writes, one a line: ACCESS<TAB>KEY<TAB>PATH.

    ARGS are the stage's own command line, parsed by the stage command itself; nothing is checked
    or started. The Frontier and Docker launch scripts bind what this lists (forgepipe/paths.py).
    """
    from forgepipe.paths import (
        WRITE,
        PathUse,
        all_paths,
        format_paths,
        pipeline_stage_configs,
        unvalidated_config,
    )

    params = main.commands[stage].make_context(f"forgepipe {stage}", list(args)).params
    table, named = _STAGE_PARAMS[stage]
    config_file = params.get("config_file")
    overrides = overrides_from(params, table)
    if stage == "pipeline":
        configs = pipeline_stage_configs(params["model"], params["reward_model"], params["output_dir"],
                                         config_file, overrides, params["method"])
        parent = params["output_dir"] or (configs[0].output_dir and os.path.dirname(configs[0].output_dir))
        uses = [PathUse(WRITE, "output_dir", os.path.abspath(parent))] if parent else []
    else:
        overrides.update({key: params[name] for name, key in named.items()}, output_dir=params["output_dir"])
        configs = [unvalidated_config(stage, config_file, overrides)]
        uses = []
    click.echo(format_paths(uses + [u for u in all_paths(configs, config_file) if u not in uses]))


@main.command("models")
@click.option("--catalog", default=None, help="Catalog YAML (default: $FORGEPIPE_CATALOG, then the bundled one).")
def models_cmd(catalog):
    """List the named models of the catalog and where they resolve."""
    from forgepipe.models.catalog import list_models

    for name, path in list_models(catalog).items():
        click.echo(f"{name}\t{path}")


from forgepipe.runs_cli import runs  # noqa: E402  (the `forgepipe runs` group)

main.add_command(runs)


from forgepipe.chat import chat, score  # noqa: E402  (`forgepipe chat`, `forgepipe score`: chat.py)

main.add_command(chat)
main.add_command(score)


from forgepipe.doctor import doctor  # noqa: E402  (`forgepipe doctor`: doctor.py)

main.add_command(doctor)


if __name__ == "__main__":
    main()

"""`forgepipe runs list|compare|show`: the click group over forgepipe/runs.py.

Registered on the main command in cli.py (`main.add_command(runs)`). Every sub-command reads any
MLflow URI: --tracking-uri, else $MLFLOW_TRACKING_URI, else ./mlruns/mlflow.db, as the stages do.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable

import click

from forgepipe.errors import ForgeError

RUN_HELP = "RUN: a run name, an id or id prefix, or a pipeline's parent run (its stages)."


def tracking_option(fn: Callable) -> Callable:
    return click.option("--tracking-uri", default=None,
                        help="MLflow URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlruns/mlflow.db).")(fn)


def one_line_errors(fn: Callable) -> Callable:
    """A ForgeError (a bad run reference or option) is one line and exit 2, as in the stage commands."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ForgeError as exc:
            click.echo(f"forgepipe: error: {exc}", err=True)
            sys.exit(2)
    return wrapper


def check_plot_target(plot: str) -> None:
    """--plot can be written, checked before the comparison is printed: no parent is a file, the
    directory it goes in exists or can be made, and the file can be created there (tried, and
    removed again) or, when it is there already, opened for writing (not changed)."""
    from pathlib import Path

    from forgepipe.preflight import check_writable_dir

    path = Path(plot).expanduser()
    if path.is_dir():
        raise ForgeError(f"--plot: {path} is a directory")
    above = next((p for p in path.parents if p.exists()), None)
    if above is not None and not above.is_dir():
        raise ForgeError(f"--plot: {path} has a parent that is a file ({above})")
    check_writable_dir(path.parent, "--plot")
    if not path.parent.is_dir():
        return  # made by the plot; check_writable_dir tried that
    try:
        if path.exists():
            with open(path, "ab"):
                pass
        else:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
            os.unlink(path)
    except OSError as exc:
        raise ForgeError(f"--plot: {path} cannot be written ({exc.strerror or type(exc).__name__})") from None


@click.group()
def runs():
    """See and compare runs of an MLflow store from a terminal (no server needed)."""


@runs.command("list")
@tracking_option
@click.option("--experiment", default=None, help="Only this experiment's runs.")
@click.option("--stage", type=click.Choice(["sft", "reward", "ppo", "dpo", "pipeline"]), default=None,
              help="Only this stage's runs.")
@click.option("--parent", default=None, metavar="RUN", help="Only the stages of this pipeline run.")
@click.option("--limit", default=50, show_default=True, help="Newest runs shown (0: all).")
@one_line_errors
def list_cmd(tracking_uri, experiment, stage, parent, limit):
    """A table of runs, newest first: id, name, stage, status, start, duration, model, ranks, ZeRO,
    final train and eval figures (SFT: loss, eval loss; reward and DPO: loss, eval accuracy;
    PPO: reward-model score, held-out score), tokens/s."""
    from forgepipe.runs import Store, list_runs

    click.echo(list_runs(Store(tracking_uri), experiment=experiment, stage=stage, parent=parent, limit=limit))


@runs.command("compare")
@tracking_option
@click.argument("refs", nargs=-1, required=True, metavar="RUN RUN [RUN]...")
@click.option("--all", "show_all", is_flag=True, help="All params and DeepSpeed keys, not only those that differ.")
@click.option("--metric", "metrics", multiple=True,
              help="Metric to compare and plot (repeatable; default: all in the table, the stage's loss, eval "
                   "figure and throughput in the plot).")
@click.option("--last", "last_n", default=5, show_default=True, help="N of the last-N mean.")
@click.option("--plot", type=click.Path(dir_okay=False), default=None, metavar="FILE.png|FILE.html",
              help="Also draw the metric curves: one panel per metric, one line per run.")
@one_line_errors
def compare_cmd(tracking_uri, refs, show_all, metrics, last_n, plot):
    """Params that differ, the DeepSpeed JSON of each engine diffed, and each metric's final, best and
    last-N mean side by side with the ratio to the first run.

    RUN: a run name, an id or id prefix, or a pipeline's parent run (its stages)."""
    from forgepipe.runs import Store, check_plot_path, compare_runs, plot_runs

    if plot:
        check_plot_path(plot)
        check_plot_target(plot)
    store = Store(tracking_uri)
    text, compared = compare_runs(store, list(refs), show_all=show_all, metrics=metrics, last_n=last_n)
    click.echo(text)
    if plot:
        try:
            written = plot_runs(store, compared, metrics, plot)
        except OSError as exc:  # the disk filled, or the directory went, since the check
            raise ForgeError(f"--plot: {plot} cannot be written ({exc.strerror or type(exc).__name__})") from None
        click.echo(f"\nplot: {written}")


@runs.command("show")
@tracking_option
@click.argument("ref", metavar="RUN")
@click.option("--as-command", is_flag=True,
              help="Print a command line that trains the run's config again from scratch, into a new output "
                   "directory: the run's own plus '-rerun' (change it as you like). In the run's own directory "
                   "the same command does nothing: the run is finished there.")
@one_line_errors
def show_cmd(tracking_uri, ref, as_command):
    """The run's config as YAML, where its checkpoints and export are, its environment and versions.

    RUN: a run name, an id or id prefix, or a pipeline's parent run (its stages)."""
    from forgepipe.runs import Store, command_line, show_run, stage_of

    store = Store(tracking_uri)
    selected = store.resolve([ref])
    for i, run in enumerate(selected):
        if as_command:
            config = store.artifact_text(run, "config.yaml")
            if config is None:
                raise ForgeError(f"run {ref!r}: {run.info.run_id} logged no config.yaml to rebuild a command from")
            command, left = command_line(stage_of(run), config)
            click.echo(command)
            if left:
                pairs = ", ".join(f"{k}={v!r}" for k, v in sorted(left.items()))
                click.echo(f"# not settable by an option (put them in a --config YAML): {pairs}", err=True)
        else:
            click.echo(("\n" if i else "") + show_run(store, run))

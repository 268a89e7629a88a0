"""Reading an MLflow store from a terminal: list, compare and show runs (`forgepipe runs`).

Frontier users work on login nodes with no browser next to the store, so everything the MLflow UI
would answer ("which ZeRO setting was faster?", "what did this run train with?") is answered here
as plain text, plus a PNG (or an HTML page holding it) of the metric curves. Any MLflow URI works;
nothing here starts a server or writes to the store.

Runs are named on the command line by (in this order) their full id, their name, or an id prefix
of four or more hex digits; a pipeline's parent run stands for its children, stage by stage.
"""

from __future__ import annotations

import base64
import datetime as _dt
import io
import json
import math
import re
import shlex
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from forgepipe.errors import ForgeError
from forgepipe.tracking import resolve_tracking_uri, short_model_name

SEARCH_MAX = 50000  # MLflow's largest page of runs
STAGE_ORDER = {"sft": 0, "reward": 1, "ppo": 2, "dpo": 2}
# Per stage: the (train, eval, throughput) figures, each a list of names, newest naming first, so
# that stores written before metric names carried the stage read the same.
FIGURES: dict[str, tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]] = {
    "sft": (("sft/loss", "train/loss"), ("sft/eval_loss", "eval/loss"), ("perf/tokens_per_s",)),
    "reward": (("reward/loss", "train/loss"), ("reward/eval_accuracy", "eval/accuracy"), ("perf/tokens_per_s",)),
    "ppo": (("ppo/score_mean",), ("ppo/eval_score",), ("perf/gen_tokens_per_s",)),
    "dpo": (("dpo/loss", "train/loss"), ("dpo/eval_accuracy", "eval/accuracy"), ("perf/tokens_per_s",)),
    # A pipeline's parent: its last stage's results, recorded on it (tracking.CHILD_RESULTS).
    "pipeline": (("ppo/final_score_mean",), ("ppo/final_eval_score", "dpo/final_eval_accuracy"), ()),
}
# Name fragments saying which way a metric is better (for "best"); neither: no best (lr, lengths).
HIGHER_IS_BETTER = ("accuracy", "tokens_per_s", "samples_per_s", "tflops", "mfu", "score", "reward", "gap",
                    "win_rate")
LOWER_IS_BETTER = ("loss", "perplexity", "kl", "_gib", "_s")
# Tags `forgepipe runs show` prints, by heading.
VERSION_TAGS = ("forgepipe_version", "git_commit", "torch_version", "deepspeed_version", "transformers_version",
                "datasets_version", "python_version", "cuda_version", "hip_version")
ENVIRONMENT_TAGS = ("world_size", "num_nodes", "launcher", "hostname", "device", "gpu_name", "gpu_kind",
                    "container_image", "image_build", "slurm_job_id", "tracking_uri")


# ---------------------------------------------------------------------------
# The store and run references


class Store:
    """One MLflow store, read only: its runs across experiments and the resolution of references."""

    def __init__(self, uri: str | None):
        import os

        from mlflow.tracking import MlflowClient

        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # keep the output a table
        self.uri = resolve_tracking_uri(uri)
        if self.uri.startswith(("http://", "https://")):
            check_server(self.uri)
        if self.uri.startswith("sqlite:///") and not Path(self.uri[len("sqlite:///"):]).is_file():
            # MLflow would create an empty store there; a wrong path should say so instead.
            raise ForgeError(f"no MLflow store at {self.uri[len('sqlite:///'):]}", key="tracking.uri")
        if self.uri.startswith("sqlite:///"):
            # MLflow turns an empty file or database into a store, and upgrades an old one, on opening.
            db = Path(self.uri[len("sqlite:///"):])
            problem = sqlite_store_problem(db)
            if problem:
                raise ForgeError(f"{db} {problem}; a read command leaves a store as it is", key="tracking.uri")
        self._runs: list | None = None
        try:
            self.client = MlflowClient(tracking_uri=self.uri)
        except Exception as exc:
            raise self.unusable(exc) from None

    def unusable(self, exc: Exception) -> ForgeError:
        """An unusable store (not an MLflow database, a server that does not answer): one line."""
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        return ForgeError(f"{self.uri}: {first}", key="tracking.uri")

    def experiments(self) -> dict[str, str]:
        """Experiment id -> name (the first read of a server store)."""
        try:
            return {e.experiment_id: e.name for e in self.client.search_experiments()}
        except Exception as exc:
            raise self.unusable(exc) from None

    def runs(self) -> list:
        """Every (active) run of every experiment, newest first; read once per command."""
        if self._runs is None:
            ids = list(self.experiments())
            self._runs = self.client.search_runs(ids, max_results=SEARCH_MAX,
                                                 order_by=["attributes.start_time DESC"]) if ids else []
        return self._runs

    def children(self, run) -> list:
        """The child runs of a (pipeline) parent, in stage order."""
        kids = [r for r in self.runs() if r.data.tags.get("mlflow.parentRunId") == run.info.run_id]
        return sorted(kids, key=lambda r: (STAGE_ORDER.get(stage_of(r), 9), r.info.start_time or 0))

    def find(self, ref: str) -> Any:
        """The one run `ref` names: a full id, a run name, or an id prefix (4+ hex digits)."""
        runs = self.runs()
        exact = [r for r in runs if r.info.run_id == ref]
        if exact:
            return exact[0]
        named = [r for r in runs if r.info.run_name == ref]
        if len(named) > 1:
            ids = ", ".join(short_id(r) for r in named[:5])
            raise ForgeError(f"run {ref!r}: {len(named)} runs have this name ({ids}); give an id prefix")
        if named:
            return named[0]
        if re.fullmatch(r"[0-9a-f]{4,32}", ref):
            prefixed = [r for r in runs if r.info.run_id.startswith(ref)]
            if len(prefixed) > 1:
                ids = ", ".join(short_id(r, 12) for r in prefixed[:5])
                raise ForgeError(f"run {ref!r}: the id prefix matches {len(prefixed)} runs ({ids}); give more digits")
            if prefixed:
                return prefixed[0]
        raise ForgeError(f"run {ref!r}: no run has this name or id in {self.uri}")

    def resolve(self, refs: list[str]) -> list:
        """The runs the references name, a pipeline parent replaced by its children; each run once."""
        out: list = []
        for ref in refs:
            run = self.find(ref)
            for r in self.children(run) or [run]:
                if all(r.info.run_id != seen.info.run_id for seen in out):
                    out.append(r)
        return out

    def history(self, run, key: str) -> list[tuple[int, float]]:
        """(step, value) of a metric, by step."""
        return sorted((m.step, m.value) for m in self.client.get_metric_history(run.info.run_id, key))

    def artifact_text(self, run, path: str) -> str | None:
        """A small artifact's text, or None when the run has none by that name."""
        try:
            with tempfile.TemporaryDirectory() as tmp:
                local = self.client.download_artifacts(run.info.run_id, path, tmp)
                return Path(local).read_text()
        except Exception:  # absent, or an artifact store that cannot be reached: shown as missing
            return None

    def deepspeed_configs(self, run) -> dict[str, dict]:
        """Engine name -> the DeepSpeed JSON the run logged for it (`deepspeed/<engine>.json`)."""
        try:
            files = self.client.list_artifacts(run.info.run_id, "deepspeed")
        except Exception:
            return {}
        out = {}
        for f in files:
            if f.path.endswith(".json"):
                text = self.artifact_text(run, f.path)
                if text:
                    out[Path(f.path).stem] = json.loads(text)
        return out


# A read command's patience with a tracking server that answered /health: MLflow's own defaults (7
# retries with a growing pause, 120 s a request) make a server that goes away take minutes to be
# reported. A user's own settings of these variables are kept.
READ_HTTP_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                 "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}


def check_server(uri: str) -> None:
    """A tracking server is probed before MLflow's client talks to it, as a training command's
    preflight does (preflight.check_tracking: a TCP connect, then GET /health, 3 s each): one that
    refuses, or accepts and never answers, is one line in seconds instead of MLflow's minutes of
    retries. MLflow's own retries and timeout are then kept short for the reads that follow."""
    import os

    from forgepipe.preflight import check_tracking

    for key, value in READ_HTTP_ENV.items():
        os.environ.setdefault(key, value)
    check_tracking(uri)


def sqlite_store_problem(db: Path) -> str | None:
    """Why an SQLite file cannot be read as an MLflow store without MLflow writing to it (it would
    create the tables of an empty file or database, upgrade an old schema, add the default
    experiment); None when it can. Read through a read-only connection."""
    import sqlite3

    try:
        with open(db, "rb") as f:
            head = f.read(16)
    except OSError as exc:
        return f"cannot be read ({exc.strerror or type(exc).__name__})"
    if not head:
        return "is an empty file, not an MLflow store"
    if head != b"SQLite format 3\x00":
        return "is not an SQLite database"
    try:
        con = sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True, timeout=30)
        try:
            tables = {name for (name,) in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            default = "experiments" in tables and con.execute(
                "SELECT 1 FROM experiments WHERE experiment_id = 0").fetchone() is not None
        finally:
            con.close()
    except sqlite3.Error as exc:
        return f"cannot be read as a database ({exc})"
    if not {"experiments", "runs"} <= tables:
        return "is an SQLite database but not an MLflow store (no experiments and runs tables)"
    from mlflow.store.db.base_sql_model import Base
    from mlflow.store.tracking.dbmodels import models  # noqa: F401  (registers the tables)

    missing = sorted(set(Base.metadata.tables) - tables)
    if missing:
        return (f"was written by an older MLflow (no {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''} "
                "tables), which opening it would upgrade; back it up and run `mlflow db upgrade` first")
    if not default:
        return "has no default experiment (id 0), which opening it would add"
    return None


def stage_of(run) -> str:
    return run.data.tags.get("stage") or run.data.params.get("stage") or "-"


def short_id(run, n: int = 8) -> str:
    return run.info.run_id[:n]


# ---------------------------------------------------------------------------
# Formatting


def fmt(value: Any) -> str:
    """A number in at most ~6 characters of significance; '-' for nothing."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, (int, float)):
        if abs(value) >= 1e4:
            return f"{value:.0f}"
        return f"{value:.4g}"
    return str(value)


def fmt_ratio(value: float | None, first: float | None) -> str:
    """`x1.31`: the run's figure over the first run's (x0.5 is half)."""
    if value is None or first is None or first == 0:
        return "-"
    ratio = value / first
    return f"x{ratio:.2f}" if 0.1 <= abs(ratio) < 100 else f"x{ratio:.3g}"


def table(headers: list[str], rows: list[list[str]], indent: str = "", numbers_right: bool = True) -> str:
    """Columns padded to their widest cell; with numbers_right, the columns after the first whose
    cells are all numbers (or ratios, or '-') right-aligned, header included."""
    columns = list(zip(headers, *rows, strict=True))
    widths = [max(len(str(c)) for c in col) for col in columns]
    numeric = re.compile(r"^x?[+-]?[\d.]+(e[+-]?\d+)?$|^-?$")
    right = [numbers_right and i > 0 and all(numeric.match(str(c)) for c in col[1:]) for i, col in enumerate(columns)]

    def line(cells):
        parts = [str(c).rjust(w) if r else str(c).ljust(w) for c, w, r in zip(cells, widths, right, strict=True)]
        return (indent + "  ".join(parts)).rstrip()

    return "\n".join([line(headers)] + [line(r) for r in rows])


def when(ms: int | None) -> str:
    if not ms:
        return "-"
    return _dt.datetime.fromtimestamp(ms / 1000).strftime("%Y-%m-%d %H:%M")


def duration(run) -> str:
    """Wall time of the run (so far, for one still running)."""
    start, end = run.info.start_time, run.info.end_time
    if not start:
        return "-"
    if not end:
        end = int(_dt.datetime.now().timestamp() * 1000)
    seconds = max(0, (end - start) // 1000)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def first_metric(run, names: tuple[str, ...]) -> float | None:
    """The final value of the first of `names` the run has."""
    for name in names:
        if name in run.data.metrics:
            return run.data.metrics[name]
    return None


def figure_keys(run) -> list[str]:
    """The stage's train, eval and throughput metric names this run has (the default plot)."""
    keys = []
    for names in FIGURES.get(stage_of(run), ()):
        found = next((n for n in names if n in run.data.metrics), None)
        if found:
            keys.append(found)
    return keys


def model_of(run) -> str:
    p = run.data.params
    name = run.data.tags.get("model") or p.get("model.name_or_path") or p.get("sft.model.name_or_path") or ""
    return short_model_name(name) if name else "-"


def zero_of(run) -> str:
    """The ZeRO setting: the run's tag, else worked out from its params (older stores)."""
    tags, p = run.data.tags, run.data.params
    if tags.get("zero"):
        return tags["zero"]
    if "deepspeed.zero_stage" not in p:
        return "-"
    label = f"z{p.get('deepspeed.zero_stage_resolved', p['deepspeed.zero_stage'])}"
    if p.get("deepspeed.zeropp") == "True":
        label += "++"
    if p.get("deepspeed.offload") not in (None, "none", "None"):
        label += "+off"
    return label


# ---------------------------------------------------------------------------
# runs list


def list_runs(store: Store, *, experiment: str | None = None, stage: str | None = None,
              parent: str | None = None, limit: int = 50) -> str:
    """The table of `forgepipe runs list`, newest first."""
    if limit < 0:
        raise ForgeError(f"--limit: the number of runs shown, 0 for all; not {limit}")
    runs = store.runs()
    if experiment:
        ids = [i for i, name in store.experiments().items() if name == experiment]
        if not ids:
            known = ", ".join(sorted(store.experiments().values()))
            raise ForgeError(f"no experiment {experiment!r} in {store.uri} (there: {known})", key="tracking.experiment")
        runs = [r for r in runs if r.info.experiment_id in ids]
    if parent:
        runs = store.children(store.find(parent))
    if stage:
        runs = [r for r in runs if stage_of(r) == stage]
    if not runs:
        return f"no runs in {store.uri}" + (" matching the filters" if experiment or stage or parent else "")
    shown = runs[:limit] if limit else runs
    headers = ["id", "name", "stage", "status", "start", "duration", "model", "ranks", "zero", "train", "eval",
               "tok/s"]
    rows = []
    for r in shown:
        train, evaluation, speed = FIGURES.get(stage_of(r), ((), (), ()))
        rows.append([short_id(r), r.info.run_name or "-", stage_of(r), r.info.status, when(r.info.start_time),
                     duration(r), model_of(r), r.data.tags.get("world_size", "-"), zero_of(r),
                     fmt(first_metric(r, train)), fmt(first_metric(r, evaluation)), fmt(first_metric(r, speed))])
    text = table(headers, rows)
    if limit and len(runs) > limit:
        text += f"\n({len(runs) - limit} older runs not shown; --limit 0 shows all)"
    return text


# ---------------------------------------------------------------------------
# runs compare


def flatten_json(tree: Any, prefix: str = "") -> dict[str, str]:
    """Dotted keys -> JSON-encoded leaves (lists kept whole)."""
    if not isinstance(tree, dict):
        return {prefix: json.dumps(tree)}
    out: dict[str, str] = {}
    for k, v in tree.items():
        out.update(flatten_json(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def differing(values: list[dict[str, str]], show_all: bool) -> list[list[str]]:
    """Rows of key and value per run, for the keys whose values differ (every key with show_all)."""
    keys = sorted({k for v in values for k in v})
    rows = []
    for key in keys:
        cells = [v.get(key, "-") for v in values]
        if show_all or len(set(cells)) > 1:
            rows.append([key, *cells])
    return rows


def better(key: str) -> str | None:
    """'max', 'min' or None: which way the metric improves, from its name."""
    name = key.split("/")[-1]
    if name == "lr" or name.endswith("_len") or "clip_frac" in name:
        return None
    if any(f in name for f in HIGHER_IS_BETTER) and "kl" not in name:
        return "max"
    if any(f in name for f in LOWER_IS_BETTER) or key.startswith(("mem/", "time/")):
        return "min"
    return None


@dataclass
class MetricStats:
    final: float | None
    best: float | None
    last_mean: float | None


def stats(points: list[tuple[int, float]], key: str, last_n: int) -> MetricStats:
    if not points:
        return MetricStats(None, None, None)
    values = [v for _, v in points]
    way = better(key)
    best = (max(values) if way == "max" else min(values)) if way else None
    tail = values[-last_n:]
    return MetricStats(values[-1], best, sum(tail) / len(tail))


def metric_order(key: str) -> tuple[int, str]:
    """Stage figures first, then throughput, time and memory."""
    group = {"perf": 1, "time": 2, "mem": 3}.get(key.split("/")[0], 0)
    return group, key


def chosen_metrics(runs: list, metrics: tuple[str, ...] | list[str] | None, default_all: bool) -> list[str]:
    """--metric names (each must exist in some run), else every metric (table) or the stage figures (plot)."""
    present = {k for r in runs for k in r.data.metrics}
    if metrics:
        for m in metrics:
            if m not in present:
                raise ForgeError(f"--metric: no run compared has {m!r} (they have: {', '.join(sorted(present))})")
        return list(metrics)
    if default_all:
        return sorted(present, key=metric_order)
    keys: list[str] = []
    for r in runs:
        keys += [k for k in figure_keys(r) if k not in keys]
    return keys


def compare_runs(store: Store, refs: list[str], *, show_all: bool = False, metrics: tuple[str, ...] = (),
                 last_n: int = 5) -> tuple[str, list]:
    """The text of `forgepipe runs compare` and the runs it compared."""
    runs = store.resolve(refs)
    if len(runs) < 2:
        raise ForgeError(f"runs compare: {' '.join(refs)} names one run ({short_id(runs[0])}); give two or more")
    if last_n < 1:
        raise ForgeError(f"--last: {last_n}: must be 1 or more")
    labels = [f"[{i + 1}]" for i in range(len(runs))]
    out = ["runs:"]
    out += [f"  {label} {r.info.run_id}  {r.info.run_name}  ({stage_of(r)}, {r.info.status}, {duration(r)})"
            for label, r in zip(labels, runs, strict=True)]

    rows = differing([dict(r.data.params) for r in runs], show_all)
    title = "params" if show_all else "params that differ"
    out += ["", f"{title} ({len(rows)} of {len({k for r in runs for k in r.data.params})}):"]
    out.append(table(["param", *labels], rows, "  ", numbers_right=False) if rows else "  (none)")

    configs = [store.deepspeed_configs(r) for r in runs]
    for engine in sorted({e for c in configs for e in c}):
        flat = [flatten_json(c[engine]) if engine in c else {} for c in configs]
        rows = differing(flat, show_all)
        absent = [label for label, c in zip(labels, configs, strict=True) if engine not in c]
        note = f"; absent from {' '.join(absent)}" if absent else ""
        out += ["", f"deepspeed {engine}.json{'' if show_all else ', keys that differ'}{note}:"]
        out.append(table(["key", *labels], rows, "  ", numbers_right=False) if rows else "  (identical)")

    keys = chosen_metrics(runs, metrics, default_all=True)
    out += ["", f"metrics (final, best, mean of the last {last_n} logged; ratio to [1]):"]
    headers = ["metric", "", labels[0]]
    for label in labels[1:]:
        headers += [label, f"{label}/[1]"]
    rows = []
    for key in keys:
        per_run = [stats(store.history(r, key), key, last_n) for r in runs]
        for stat in ("final", "best", f"last{last_n}"):
            attr = "last_mean" if stat.startswith("last") else stat
            if stat == "best" and better(key) is None:
                continue
            values = [getattr(s, attr) for s in per_run]
            row = [key if stat == "final" else "", stat, fmt(values[0])]
            for v in values[1:]:
                row += [fmt(v), fmt_ratio(v, values[0])]
            rows.append(row)
    out.append(table(headers, rows, "  ") if rows else "  (no metrics)")
    return "\n".join(out), runs


def check_plot_path(path: str | Path) -> Path:
    """--plot names a .png or an .html file (checked before the comparison is printed)."""
    path = Path(path)
    if path.suffix.lower() not in (".png", ".html"):
        raise ForgeError(f"--plot: {path}: the file must end in .png or .html")
    return path


def plot_runs(store: Store, runs: list, metrics: tuple[str, ...], path: str | Path) -> Path:
    """One panel per metric, one line per run, against the step: a PNG, or an HTML page holding it."""
    path = check_plot_path(path)
    keys = chosen_metrics(runs, metrics, default_all=False)
    if not keys:
        raise ForgeError("--plot: the runs have no metrics to plot; name some with --metric")
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a login node
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    cols = 1 if len(keys) == 1 else 2
    rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6.5 * cols, 3.6 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys, strict=False):
        for i, r in enumerate(runs):
            points = store.history(r, key)
            if points:
                steps, values = zip(*points, strict=True)
                ax.plot(steps, values, marker="." if len(points) < 30 else None,
                        label=f"[{i + 1}] {r.info.run_name or short_id(r)}")
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    for ax in list(axes.flat)[len(keys):]:
        ax.set_visible(False)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".png":
        fig.savefig(path, dpi=110)
    else:
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=110)
        names = "".join(f"<li>[{i + 1}] {r.info.run_name} ({r.info.run_id})</li>" for i, r in enumerate(runs))
        image = base64.b64encode(buffer.getvalue()).decode()
        path.write_text(f"<!doctype html><html><head><meta charset='utf-8'><title>forgepipe runs compare</title>"
                        f"</head><body><ul>{names}</ul><img src='data:image/png;base64,{image}'></body></html>\n")
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------
# runs show


def checkpoints_line(directory: str | None) -> str:
    if not directory:
        return "-"
    path = Path(directory)
    if not path.is_dir():
        return f"{directory} (not on this machine)"
    found = sorted(p.name for p in path.iterdir() if p.is_dir() and p.name.startswith("step-"))
    return f"{directory} ({len(found)} kept{', newest ' + found[-1] if found else ''})"


def export_line(directory: str | None) -> str:
    if not directory:
        return "- (not exported yet)"
    state = "" if (Path(directory) / "config.json").is_file() else " (not on this machine)"
    return directory + state


def dataset_line(dataset_input) -> str:
    """`training    pairs.jsonl (digest)  rows: train 54, eval 6  /data/pairs.jsonl`."""
    ds = dataset_input.dataset
    context = next((t.value for t in dataset_input.tags if t.key == "mlflow.data.context"), "-")
    try:
        rows = json.loads(ds.profile or "{}").get("rows", {})
        where = json.loads(ds.source).get("uri", ds.source)
    except (ValueError, AttributeError):
        rows, where = {}, ds.source
    counts = ", ".join(f"{split} {n}" for split, n in rows.items())
    where = " ".join(where) if isinstance(where, list) else where
    return f"{context:10}  {ds.name} ({ds.digest})  rows: {counts or '-'}  {where}"


def show_run(store: Store, run) -> str:
    """`forgepipe runs show`: what the run is, where its files are, its environment and its config."""
    tags, info = run.data.tags, run.info
    exp = store.experiments().get(info.experiment_id, info.experiment_id)
    output_dir = tags.get("output_dir") or run.data.params.get("output_dir")
    checkpoints = tags.get("checkpoint_dir") or (str(Path(output_dir) / "checkpoints") if output_dir else None)
    out = [f"run {info.run_id}  {info.run_name}",
           f"  experiment  {exp}",
           f"  stage       {stage_of(run)}    status {info.status}    started {when(info.start_time)}    "
           f"took {duration(run)}"]
    if tags.get("mlflow.parentRunId"):
        out.append(f"  parent      {tags['mlflow.parentRunId']}")
    out += ["", "files:", f"  output       {output_dir or '-'}", f"  checkpoints  {checkpoints_line(checkpoints)}",
            f"  export       {export_line(tags.get('model_dir'))}", f"  store        {store.uri}"]
    inputs = getattr(getattr(run, "inputs", None), "dataset_inputs", None) or []
    if inputs:
        out += ["", "data:"]
        for di in inputs:
            out.append("  " + dataset_line(di))
    out += ["", "versions:"]
    out += [f"  {k.removesuffix('_version'):14} {tags[k]}" for k in VERSION_TAGS if k in tags]
    out += ["", "environment:"]
    out += [f"  {k:14} {tags[k]}" for k in ENVIRONMENT_TAGS if k in tags]
    env = store.artifact_text(run, "environment.json")
    if env:
        variables = json.loads(env)
        out += [f"  {k}={v}" for k, v in variables.items()] or []
    config = store.artifact_text(run, "config.yaml")
    out += ["", "config (config.yaml):" if config else "config (from params; no config.yaml logged):"]
    if config:
        out += ["  " + line for line in config.rstrip().splitlines()]
    else:
        out += [f"  {k}: {v}" for k, v in sorted(run.data.params.items())]
    return "\n".join(out)


# Options named by the stage command rather than the shared table, in the order printed.
STAGE_FLAGS = {
    "sft": {"model.name_or_path": "--model", "output_dir": "--output-dir"},
    "reward": {"model.name_or_path": "--model", "output_dir": "--output-dir", "reward.margin_field": "--margin-field"},
    "ppo": {"model.name_or_path": "--actor", "ppo.reward_model": "--reward", "output_dir": "--output-dir"},
    "dpo": {"model.name_or_path": "--model", "output_dir": "--output-dir"},
}
# Config sections a stage never reads (a pipeline sets every stage's config from one command line).
UNUSED_SECTIONS = {"sft": ("ppo.", "reward.", "dpo."), "reward": ("ppo.", "dpo."), "ppo": ("reward.", "dpo."),
                   "dpo": ("ppo.", "reward.")}


def option_table(stage: str) -> tuple[list[tuple[str, str, str]], set[str]]:
    """(flags, dotted key, help) rows of the stage's command and the repeatable keys."""
    from forgepipe import options

    extra = {"ppo": "PPO_OPTIONS", "dpo": "DPO_OPTIONS"}.get(stage)
    return options.COMMON_OPTIONS + (getattr(options, extra, []) if extra else []), set(options.REPEATABLE)


# Where `runs show --as-command` sends the rerun: the run's own directory holds it finished (a launch
# there answers "already finished: nothing to do"), so the command trains afresh beside it.
RERUN_SUFFIX = "-rerun"
# How the original run was started, not what it trained: a fresh output directory needs neither.
NOT_REPEATED = {"train.resume", "overwrite",  # and what a launch sets itself (--zero-stage auto):
                "deepspeed.zero_stage_resolved", "ppo.critic_zero_stage_resolved", "ppo.ref_zero_stage_resolved"}


def command_line(stage: str, config_yaml: str) -> tuple[str, dict[str, Any]]:
    """The `forgepipe <stage> ...` command that runs a config again from scratch: every key that
    differs from the default as its option, the output directory the run's own plus RERUN_SUFFIX
    (`--resume`/`--overwrite` left out). Returns the command and the keys no option sets (they need
    --config)."""
    import yaml

    from forgepipe.config import Config, flatten

    if stage not in STAGE_FLAGS:
        raise ForgeError(f"--as-command: the run's stage is {stage!r}; only {', '.join(STAGE_FLAGS)} runs are commands")
    values = flatten(yaml.safe_load(config_yaml) or {})
    if values.get("output_dir"):
        values["output_dir"] = str(values["output_dir"]).rstrip("/") + RERUN_SUFFIX
    defaults = Config(stage=stage).flat()
    rows, repeatable = option_table(stage)
    flags = {key: f for f, key, _ in rows} | STAGE_FLAGS[stage]
    words = ["forgepipe", stage]
    left: dict[str, Any] = {}
    first = [k for k in STAGE_FLAGS[stage] if k in values]
    for key in first + [k for k in values if k not in first]:
        value = values[key]
        if key == "stage" or key in NOT_REPEATED or key.startswith(UNUSED_SECTIONS[stage]):
            continue
        if (key in defaults and value == defaults[key]) or (key not in defaults and not value):
            continue
        flag = flags.get(key)
        if flag is None:
            left[key] = value
        elif "/" in flag:
            on, off = flag.split("/")
            words.append(on if value else off)
        elif key in repeatable:
            for item in value or []:
                words += [flag.split("/")[0], str(item)]
        elif value is not None:
            words += [flag, json.dumps(value) if isinstance(value, (list, dict)) else str(value)]
    return " ".join(shlex.quote(w) for w in words), left


# ---------------------------------------------------------------------------
# The summary a finished stage (or pipeline) prints


def run_summary(uri: str | None, run_id: str) -> str:
    """What a finished stage prints last: steps, wall time, the final and best of its figures,
    tokens/s, where its model is and how to look at its run again. Read back from the store, so
    the console says exactly what MLflow recorded."""
    try:
        store = Store(uri)
        run = store.client.get_run(run_id)
    except Exception as exc:  # noqa: BLE001 - a store that failed during the run (Tracker.write_failed)
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        return f"MLflow run {run_id}: its record cannot be read back from {uri} ({first})"
    keys = figure_keys(run)
    steps = max((s for k in keys for s, _ in store.history(run, k)), default=0)
    parts = []
    for key in keys:
        s = stats(store.history(run, key), key, 1)
        best = f" (best {fmt(s.best)})" if s.best is not None and s.best != s.final else ""
        parts.append(f"{key} {fmt(s.final)}{best}")
    model = run.data.tags.get("model_dir")
    lines = [f"{run.info.run_name} ({short_id(run)}) {run.info.status}: {steps} steps in {duration(run)}",
             "  " + "   ".join(parts) if parts else "  (no metrics logged)"]
    if model:
        lines.append(f"  model: {model}")
    lines.append(f"  run:   forgepipe runs show {short_id(run)} --tracking-uri {store.uri}")
    return "\n".join(lines)


def pipeline_summary(uri: str | None, parent_run_id: str) -> str:
    """What a finished pipeline prints last: its parent run and the table of its stages."""
    store = Store(uri)
    return (f"pipeline run {parent_run_id} (its stages: forgepipe runs list --parent {parent_run_id[:8]} "
            f"--tracking-uri {store.uri})\n" + list_runs(store, parent=parent_run_id))

"""The files and directories a resolved config reads and writes: what a container must see.

`forgepipe config paths STAGE [options...]` (the stage's own command line) and `forgepipe config
show --paths` print them one a line, `ACCESS<TAB>WHAT<TAB>PATH`:

    read    model.name_or_path  /lustre/orion/abc123/models/forge-m2
    read    dpo.ref_model       /lustre/orion/abc123/runs/sft
    read    data.chat_template  /ccs/home/me/chatml.jinja
    write   tracking.uri        /lustre/orion/abc123/mlruns

ACCESS is read or write; WHAT the config key (or the setting: config, FORGEPIPE_MODEL_ROOT,
catalog:<name>) the path comes from; PATH is absolute, as given (symlinks kept: that is the path the
stage is handed), except the tracking store's directory, which is resolved exactly as forgepipe
resolves the URI (tracking.resolve_tracking_uri: a relative sqlite:///mlruns/mlflow.db is under the
working directory). The scripts in scripts/frontier/ and scripts/local/ bind the directory of every
existing read path and every write path (creating those that do not exist yet).

The configs are built as the stages build them, paths from a --config YAML and KEY=VALUE overrides
included, but not validated: a path that does not exist is still listed (the stage's own checks
report it), and nothing here needs a model, data or torch. Catalog names resolve through the
catalog (`$VARS` and `~` expanded, relative entries under $FORGEPIPE_MODEL_ROOT); Hub names and
server URIs are not paths and are left out.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from forgepipe.config import Config, _apply, load_yaml, set_dotted
from forgepipe.errors import ForgeError

READ, WRITE = "read", "write"


@dataclass(frozen=True)
class PathUse:
    access: str  # read | write
    what: str  # the config key or setting it comes from
    path: str  # absolute


def unvalidated_config(stage: str, config_file: str | None, overrides: dict[str, Any],
                       layers: list[tuple[dict[str, Any], str]] | None = None) -> Config:
    """config.build_config without its checks (a missing file must be listed, not refused)."""
    cfg = Config(stage=stage)
    all_layers = [(load_yaml(config_file), f"{config_file}: ")] if config_file else []
    for tree, where in all_layers + list(layers or []):
        _apply(cfg, tree, where)
        cfg.stage = stage
    for key, value in overrides.items():
        if value is not None:
            set_dotted(cfg, key, value)
    return cfg


def pipeline_stage_configs(model: str | None, reward_model: str | None, output_dir: str | None,
                           config_file: str | None, overrides: dict[str, Any], method: str) -> list[Config]:
    """The pipeline's per-stage configs, layered as stages/pipeline.py layers them (unvalidated)."""
    from forgepipe.stages.pipeline import METHODS, stage_models

    tree = load_yaml(config_file) if config_file else {}
    sections = tree.pop("stages", {}) or {}
    model = model or (tree.get("model") or {}).get("name_or_path") or ""
    output_dir = output_dir or tree.get("output_dir") or ""
    models = stage_models(method, model, reward_model, Path(output_dir)) if output_dir else {}
    configs = []
    for stage in METHODS[method]:
        layers = [(tree, f"{config_file}: ")] if tree else []
        if isinstance(sections, dict) and sections.get(stage):
            layers.append((sections[stage], f"{config_file}: stages.{stage}."))
        stage_out = str(Path(output_dir) / stage) if output_dir else None
        stage_overrides = {**overrides, **models.get(stage, {"model.name_or_path": model}), "output_dir": stage_out}
        configs.append(unvalidated_config(stage, None, stage_overrides, layers))
    return configs


def apply_assignments(cfg: Config, assignments: tuple[str, ...] | list[str]) -> None:
    """KEY=VALUE pairs (config show's), each value read as YAML."""
    import yaml

    for item in assignments:
        if "=" not in item:
            raise ForgeError(f"{item!r}: expected KEY=VALUE")
        key, value = item.split("=", 1)
        set_dotted(cfg, key, yaml.safe_load(value))


def _absolute(path: str | Path) -> str:
    """Absolute, `~` expanded, symlinks kept (normalised like realpath -s)."""
    return os.path.abspath(os.path.expanduser(str(path)))


def _local(source: str) -> str | None:
    """A data source or path-valued setting that names a local path (else a Hub name: None)."""
    if not source:
        return None
    expanded = os.path.expanduser(source)
    if source.startswith(("/", ".", "~")) or Path(expanded).exists():
        return _absolute(expanded)
    return None


def _catalog(cfg: Config) -> dict[str, Any]:
    """The catalog the config's model names resolve through; an unreadable user catalog is the
    stage's error to report, so the bundled one alone is used here."""
    from forgepipe.models import catalog as cat

    try:
        return cat.load_catalog(cfg.model.catalog)
    except ForgeError:
        return cat._read_catalog(cat.bundled_catalog())


def _model(name: str, entries: dict[str, Any]) -> str | None:
    """Where a model option points: a local path, a catalog name's directory, else a Hub id (None)."""
    if not name:
        return None
    local = Path(os.path.expanduser(name))
    if local.exists():
        return _absolute(local)
    if name in entries:
        return _absolute(entries[name].local_path())
    return _local(name)


def resolve_store_uri(uri: str | None) -> str:
    """The store a run opens: tracking.resolve_tracking_uri (--tracking-uri, else $MLFLOW_TRACKING_URI,
    else ./mlruns/mlflow.db, a local store made absolute). tracking.py imports no torch, so this stays light."""
    from forgepipe.tracking import resolve_tracking_uri

    return resolve_tracking_uri(uri)


def _store_dir(uri: str | None) -> str | None:
    """The local directory of the MLflow store, resolved as forgepipe resolves the URI."""
    resolved = resolve_store_uri(uri)
    if resolved.startswith("sqlite:///"):
        db = resolved[len("sqlite:///"):]
        return None if db == ":memory:" else str(Path(db).parent)
    if resolved.startswith("file:"):
        from urllib.parse import unquote, urlparse

        return unquote(urlparse(resolved).path)
    if resolved.startswith("/"):
        return resolved  # a plain directory: MLflow's file store
    return None  # a server


def config_paths(cfg: Config, config_file: str | None = None) -> list[PathUse]:
    """Every path one stage's config reads or writes, in a stable order."""
    from forgepipe.models.catalog import CATALOG_ENV, MODEL_ROOT_ENV, _read_catalog

    out: list[PathUse] = []

    def add(access: str, what: str, path: str | None) -> None:
        if path:
            out.append(PathUse(access, what, path))

    if config_file:
        add(READ, "config", _absolute(config_file))
    entries = _catalog(cfg)
    models = [("model.name_or_path", cfg.model.name_or_path), ("model.tokenizer", cfg.model.tokenizer or "")]
    if cfg.stage == "ppo":
        models += [("ppo.reward_model", cfg.ppo.reward_model), ("ppo.critic_model", cfg.ppo.critic_model or "")]
    if cfg.stage == "dpo":
        models.append(("dpo.ref_model", cfg.dpo.ref_model or ""))
    for key, name in models:
        add(READ, key, _model(name, entries))
    for source in cfg.data.sources:
        add(READ, "data.sources", _local(source))
    for source in cfg.data.unsupervised_sources:
        add(READ, "data.unsupervised_sources", _local(source))
    if cfg.data.chat_template not in ("auto", "none"):
        add(READ, "data.chat_template", _absolute(cfg.data.chat_template))
    if cfg.train.resume not in ("auto", "never"):
        add(READ, "train.resume", _absolute(cfg.train.resume))
    user_catalog = cfg.model.catalog or os.environ.get(CATALOG_ENV)
    if user_catalog:
        add(READ, "model.catalog", _absolute(user_catalog))
        try:
            for name, entry in _read_catalog(Path(os.path.expanduser(user_catalog))).items():
                add(READ, f"catalog:{name}", _absolute(entry.local_path()))
        except ForgeError:
            pass  # the stage reports it; this listing is for binding what can be read
    if os.environ.get(MODEL_ROOT_ENV):
        add(READ, MODEL_ROOT_ENV, _absolute(os.environ[MODEL_ROOT_ENV]))
    if cfg.output_dir:
        add(WRITE, "output_dir", _absolute(cfg.output_dir))
    if cfg.data.cache_dir:
        add(WRITE, "data.cache_dir", _absolute(cfg.data.cache_dir))
    add(WRITE, "tracking.uri", _store_dir(cfg.tracking.uri))
    return out


def all_paths(configs: list[Config], config_file: str | None = None) -> list[PathUse]:
    """The union over several configs (a pipeline's stages), each (access, path) once."""
    seen: set[tuple[str, str]] = set()
    out = []
    for cfg in configs:
        for use in config_paths(cfg, config_file):
            if (use.access, use.path) not in seen:
                seen.add((use.access, use.path))
                out.append(use)
    return out


def format_paths(uses: list[PathUse]) -> str:
    for use in uses:
        if any(c in use.path for c in "\t\n"):
            raise ForgeError(f"{use.what}: a path with a tab or newline cannot be bound: {use.path!r}")
    return "\n".join(f"{u.access}\t{u.what}\t{u.path}" for u in uses)

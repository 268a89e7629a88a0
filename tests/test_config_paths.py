"""forgepipe/paths.py: the paths a resolved config reads and writes (`forgepipe config paths`,
`forgepipe config show --paths`), which the launch scripts bind (issue 22 items 5 and 6). Fast:
no model, no data, no torch."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from forgepipe.cli import main
from forgepipe.paths import resolve_store_uri


def listing(*args: str) -> list[tuple[str, str, str]]:
    out = CliRunner().invoke(main, list(args))
    assert out.exit_code == 0, out.output
    return [tuple(line.split("\t")) for line in out.output.splitlines()]


def test_dpo_lists_its_reference_template_yaml_paths_and_catalog_vars(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PROJWORK", str(tmp_path / "proj"))
    catalog = tmp_path / "cat.yaml"
    catalog.write_text("models:\n  mine: $PROJWORK/models/mine\n")
    config = tmp_path / "run.yaml"
    config.write_text(f"model:\n  tokenizer: {tmp_path}/tok\ndata:\n  sources: [{tmp_path}/pairs.jsonl]\n")
    rows = listing("config", "paths", "dpo", "--model", "mine", "--catalog", str(catalog), "--ref", "refs/sft",
                   "--chat-template", "chatml.jinja", "--config", str(config), "--output-dir", "out", "--beta", "0.2")
    assert ("read", "model.name_or_path", f"{tmp_path}/proj/models/mine") in rows
    assert ("read", "dpo.ref_model", f"{tmp_path}/refs/sft") not in rows  # relative, absent: not a path yet
    assert ("read", "model.tokenizer", f"{tmp_path}/tok") in rows
    assert ("read", "data.sources", f"{tmp_path}/pairs.jsonl") in rows
    assert ("read", "data.chat_template", f"{tmp_path}/chatml.jinja") in rows
    assert ("read", "config", str(config)) in rows and ("read", "model.catalog", str(catalog)) in rows
    assert ("write", "output_dir", f"{tmp_path}/out") in rows
    (tmp_path / "refs" / "sft").mkdir(parents=True)
    rows = listing("config", "paths", "dpo", "--model", "m", "--ref", "refs/sft", "--output-dir", "out",
                   "--data", "Anthropic/hh-rlhf")
    assert not any("Anthropic" in path for _, _, path in rows)  # a Hub name is no path
    assert ("read", "dpo.ref_model", f"{tmp_path}/refs/sft") in rows


def test_config_show_paths_takes_key_value_overrides(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rows = listing("config", "show", "--paths", "--stage", "dpo", "--model", "/models/a", "dpo.ref_model=/models/ref",
                   "data.cache_dir=/scratch/cache", "--output-dir", "/runs/dpo")
    assert ("read", "dpo.ref_model", "/models/ref") in rows and ("read", "model.name_or_path", "/models/a") in rows
    assert ("write", "data.cache_dir", "/scratch/cache") in rows and ("write", "output_dir", "/runs/dpo") in rows


def test_the_pipeline_lists_every_stages_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "p.yaml"
    config.write_text("stages:\n  dpo:\n    dpo:\n      ref_model: /models/ref\n")
    rows = listing("config", "paths", "pipeline", "--method", "dpo", "--model", "/models/base", "--config", str(config),
                   "--output-dir", "runs")
    assert rows[0] == ("write", "output_dir", f"{tmp_path}/runs")
    assert ("read", "dpo.ref_model", "/models/ref") in rows and ("write", "output_dir", f"{tmp_path}/runs/dpo") in rows


@pytest.mark.parametrize("uri", [None, "sqlite:///mlruns/mlflow.db", "sqlite:////abs/mlflow.db", "file:store",
                                 "file:///abs/store", "plain/dir", "http://mlflow:5000", "sqlite:///:memory:"])
@pytest.mark.parametrize("env", [None, "sqlite:///from-env/mlflow.db"])
def test_the_store_is_resolved_as_forgepipe_resolves_it(uri, env, tmp_path, monkeypatch):
    from forgepipe.tracking import resolve_tracking_uri

    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")  # resolve() follows it, as forgepipe does
    monkeypatch.chdir(tmp_path / "link")
    if env:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", env)
    else:
        monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_store_uri(uri) == resolve_tracking_uri(uri)


def test_a_relative_sqlite_store_is_listed_under_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    rows = listing("config", "paths", "sft", "--model", "m", "--output-dir", "o", "--tracking-uri",
                   "sqlite:///mlruns/mlflow.db")
    assert ("write", "tracking.uri", f"{tmp_path.resolve()}/mlruns") in rows

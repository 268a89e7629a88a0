"""`forgepipe runs list|compare|show` on real MLflow stores.

Fast tests build a store directly with the MLflow client (real SQLite store, real artifacts); the
slow test reads a store written by real short runs: two SFT runs at different ZeRO stages and a
pipeline."""

from __future__ import annotations

import json
import re
import shlex

import pytest
from click.testing import CliRunner
from conftest import SAMPLE_PAIRS, run_forgepipe

from forgepipe.config import Config
from forgepipe.errors import ForgeError
from forgepipe.runs import (
    Store,
    better,
    command_line,
    compare_runs,
    fmt_ratio,
    list_runs,
    plot_runs,
    show_run,
)
from forgepipe.runs_cli import runs as runs_group


def make_run(client, exp_id, name, *, params, metrics, tags=None, artifacts=None):
    """A finished run with params, metric histories (step 1, 2, ...) and JSON/text artifacts."""
    from mlflow.entities import Metric, Param

    run = client.create_run(exp_id, run_name=name, tags=tags or {})
    rid = run.info.run_id
    client.log_batch(rid, params=[Param(k, str(v)) for k, v in params.items()],
                     metrics=[Metric(k, v, 0, step) for k, values in metrics.items()
                              for step, v in enumerate(values, start=1)])
    for path, content in (artifacts or {}).items():
        if isinstance(content, dict):
            client.log_dict(rid, content, path)
        else:
            client.log_text(rid, content, path)
    client.set_terminated(rid, "FINISHED")
    return rid


def sft_config(zero: int, out: str) -> Config:
    cfg = Config(stage="sft", output_dir=out)
    cfg.model.name_or_path = "forge-s"
    cfg.data.sources = ["/data/pairs.jsonl"]
    cfg.deepspeed.zero_stage = zero
    cfg.train.max_steps = 6
    return cfg


def ds_json(zero: int) -> dict:
    return {"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": zero, "overlap_comm": True}}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """Two SFT runs (ZeRO 2 and 3, the second faster), a pipeline parent with two children, and two
    runs of the same name. Read only: the tests share it (a new store takes seconds to create)."""
    import mlflow

    tmp_path = tmp_path_factory.mktemp("store")
    uri = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    client = mlflow.MlflowClient(uri)
    exp = client.create_experiment("forgepipe", artifact_location=(tmp_path / "artifacts").as_uri())
    ids = {}
    for zero, speed, name in ((2, 100.0, "sft forge-s z2 4r"), (3, 150.0, "sft forge-s z3 4r")):
        cfg = sft_config(zero, f"/out/z{zero}")
        ids[zero] = make_run(
            client, exp, name, params=cfg.flat(),
            metrics={"sft/loss": [6.0, 5.0, 4.0, 3.0], "sft/eval_loss": [5.5, 3.5],
                     "perf/tokens_per_s": [speed, speed, speed, speed]},
            tags={"stage": "sft", "world_size": "4", "model": "forge-s", "zero": f"z{zero}",
                  "output_dir": f"/out/z{zero}", "torch_version": "2.13.0"},
            artifacts={"deepspeed/model.json": ds_json(zero), "config.yaml": cfg.to_yaml(),
                       "environment.json": {"SLURM_JOB_ID": "77"}})
    from mlflow.entities import Dataset, DatasetInput, InputTag

    client.log_inputs(ids[3], datasets=[DatasetInput(
        Dataset("pairs.jsonl", "0123abcd", "local", json.dumps({"uri": "/data/pairs.jsonl"}),
                profile=json.dumps({"rows": {"train": 54, "eval": 6}})),
        tags=[InputTag("mlflow.data.context", "training")])])
    parent = client.create_run(exp, run_name="pipeline-pipe", tags={"stage": "pipeline"}).info.run_id
    child = {"mlflow.parentRunId": parent, "world_size": "1"}
    ids["reward"] = make_run(client, exp, "reward tiny z0 1r", params={"deepspeed.zero_stage": 0},
                             metrics={"reward/loss": [0.7, 0.6], "reward/eval_accuracy": [0.5, 0.75]},
                             tags={**child, "stage": "reward"})
    ids["sft"] = make_run(client, exp, "sft tiny z0 1r", params={"deepspeed.zero_stage": 0},
                          metrics={"sft/loss": [7.0, 6.5]}, tags={**child, "stage": "sft"})
    ids["parent"] = parent
    for _ in range(2):
        make_run(client, exp, "twin", params={}, metrics={})
    return Store(uri), ids


def test_references_by_name_id_prefix_and_a_parent_meaning_its_children(store):
    st, ids = store
    assert st.find("sft forge-s z3 4r").info.run_id == ids[3]
    assert st.find(ids[2][:6]).info.run_id == ids[2]
    assert [r.info.run_id for r in st.resolve(["pipeline-pipe"])] == [ids["sft"], ids["reward"]]  # stage order
    with pytest.raises(ForgeError, match=r"run 'nope': no run has this name or id in sqlite:///"):
        st.find("nope")


def test_an_ambiguous_name_asks_for_an_id_prefix(store):
    st, _ = store
    with pytest.raises(ForgeError, match=r"run 'twin': 2 runs have this name \(\w{8}, \w{8}\); give an id prefix"):
        st.find("twin")


def test_a_missing_store_is_one_error_not_a_new_empty_store(tmp_path):
    with pytest.raises(ForgeError, match="--tracking-uri: no MLflow store at"):
        Store(f"sqlite:///{tmp_path}/none/mlflow.db")
    assert not (tmp_path / "none").exists()
    (tmp_path / "junk.db").write_text("not a database")
    with pytest.raises(ForgeError, match=rf"--tracking-uri: {tmp_path}/junk.db is not an SQLite database"):
        Store(f"sqlite:///{tmp_path}/junk.db").runs()


def test_list_shows_stage_model_ranks_zero_and_final_figures(store):
    st, ids = store
    text = list_runs(st)
    lines = {line.split()[0]: line for line in text.splitlines()[1:]}
    assert text.splitlines()[0].split() == ["id", "name", "stage", "status", "start", "duration", "model", "ranks",
                                            "zero", "train", "eval", "tok/s"]
    assert re.search(r"sft\s+FINISHED .* forge-s\s+4\s+z3\s+3\s+3\.5\s+150$", lines[ids[3][:8]])
    assert re.search(r"reward .* 0\.6\s+0\.75\s+-$", lines[ids["reward"][:8]])
    only_children = list_runs(st, parent="pipeline-pipe").splitlines()[1:]
    assert sorted(line.split()[0] for line in only_children) == sorted([ids["sft"][:8], ids["reward"][:8]])
    assert all(" sft " in line for line in list_runs(st, stage="sft").splitlines()[1:])
    with pytest.raises(ForgeError, match="--experiment: no experiment 'other'"):
        list_runs(st, experiment="other")


def test_compare_shows_only_differing_params_the_deepspeed_diff_and_ratios(store):
    st, ids = store
    text, compared = compare_runs(st, [ids[2][:8], "sft forge-s z3 4r"], last_n=2)
    assert [r.info.run_id for r in compared] == [ids[2], ids[3]]
    params = text.split("params that differ")[1].split("\n\n")[0]
    assert re.search(r"deepspeed\.zero_stage\s+2\s+3", params)
    assert re.search(r"output_dir\s+/out/z2\s+/out/z3", params)
    assert "train.max_steps" not in params  # equal in both: only with --all
    assert "train.max_steps" in compare_runs(st, [ids[2], ids[3]], show_all=True)[0]
    deepspeed = text.split("deepspeed model.json")[1].split("\n\n")[0]
    assert re.search(r"zero_optimization\.stage\s+2\s+3", deepspeed) and "overlap_comm" not in deepspeed
    metrics = text.split("metrics (")[1]
    lines = metrics.splitlines()
    speed = lines.index(next(line for line in lines if line.lstrip().startswith("perf/tokens_per_s")))
    assert lines[speed].split()[1:] == ["final", "100", "150", "x1.50"]
    loss = lines.index(next(line for line in lines if line.lstrip().startswith("sft/loss")))
    assert lines[loss].split()[1:] == ["final", "3", "3", "x1.00"]
    assert lines[loss + 1].split() == ["best", "3", "3", "x1.00"]
    assert lines[loss + 2].split() == ["last2", "3.5", "3.5", "x1.00"]


def test_compare_needs_two_runs_and_known_metrics(store):
    st, ids = store
    with pytest.raises(ForgeError, match="names one run"):
        compare_runs(st, [ids[2]])
    with pytest.raises(ForgeError, match=r"--metric: no run compared has 'sft/nope' \(they have: "):
        compare_runs(st, [ids[2], ids[3]], metrics=("sft/nope",))


@pytest.mark.parametrize("suffix", ["png", "html"])
def test_plot_writes_one_panel_per_metric(store, tmp_path, suffix):
    st, ids = store
    path = plot_runs(st, st.resolve([ids[2], ids[3]]), (), tmp_path / f"curves.{suffix}")
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG") if suffix == "png" else b"data:image/png;base64," in data


def test_show_prints_files_versions_environment_and_config(store):
    st, ids = store
    text = show_run(st, st.find(ids[3]))
    assert "output       /out/z3" in text
    assert "checkpoints  /out/z3/checkpoints (not on this machine)" in text
    assert "  training    pairs.jsonl (0123abcd)  rows: train 54, eval 6  /data/pairs.jsonl" in text
    assert re.search(r"torch\s+2\.13\.0", text) and "SLURM_JOB_ID=77" in text
    assert "    zero_stage: 3" in text.split("config (config.yaml):")[1]


def test_as_command_rebuilds_the_options_that_differ_from_the_defaults():
    cfg = sft_config(1, "/out/z3")
    cfg.deepspeed.torch_adam = True
    cfg.data.sources = ["/data/a b.jsonl", "/data/c.jsonl"]
    cfg.ppo.max_new_tokens = 8  # a pipeline sets it for every stage; `forgepipe sft` has no such option
    cfg.train.resume, cfg.overwrite = "/out/z3/checkpoints/step-00000004", True  # how it started: not repeated
    command, left = command_line("sft", cfg.to_yaml())
    words = shlex.split(command)
    # A new directory: in the run's own, the same command finds the run finished and does nothing.
    assert words[:6] == ["forgepipe", "sft", "--model", "forge-s", "--output-dir", "/out/z3-rerun"]
    assert " ".join(words[6:]).split(" --") == ["--data /data/a b.jsonl", "data /data/c.jsonl", "max-steps 6",
                                                "zero-stage 1", "torch-adam"]
    assert left == {}


def test_cli_errors_are_one_line_and_exit_2(store):
    st, ids = store
    result = CliRunner().invoke(runs_group, ["compare", ids[2], "missing-run", "--tracking-uri", st.uri])
    assert result.exit_code == 2
    assert result.output.strip() == f"forgepipe: error: run 'missing-run': no run has this name or id in {st.uri}"
    result = CliRunner().invoke(runs_group, ["compare", ids[2], ids[3], "--plot", "x.pdf", "--tracking-uri", st.uri])
    assert result.exit_code == 2 and "runs:" not in result.output  # checked before anything is printed


def test_which_way_is_better():
    assert [better(k) for k in ("sft/loss", "reward/eval_accuracy", "perf/tokens_per_s", "ppo/kl", "sft/lr",
                                "ppo/eval_win_rate", "mem/host_peak_rss_gib_max", "ppo/response_len")] == \
        ["min", "max", "max", "min", None, "max", "min", None]
    assert (fmt_ratio(150, 100), fmt_ratio(1, 0), fmt_ratio(None, 1), fmt_ratio(1, 1000)) == \
        ("x1.50", "-", "-", "x0.001")


# ---------------------------------------------------------------------------
# A store made by real runs


def stage_args(model, out, db, *extra):
    return ["--model", str(model), "--data", str(SAMPLE_PAIRS), "--output-dir", str(out),
            "--tracking-uri", f"sqlite:///{db}", "--dtype", "fp32", "--torch-adam", "--per-device-batch-size", "2",
            "--max-steps", "3", "--eval-every", "2", "--max-seq-len", "192", "--max-prompt-len", "128", *extra]


@pytest.fixture(scope="module")
def real_store(tiny_model, tmp_path_factory):
    """SFT at ZeRO 0 and ZeRO 2, and a pipeline, in one store."""
    root = tmp_path_factory.mktemp("runs")
    db = root / "mlruns" / "mlflow.db"
    for zero in (0, 2):
        proc = run_forgepipe(["sft", *stage_args(tiny_model, root / f"sft-z{zero}", db, "--zero-stage", str(zero))])
        assert proc.returncode == 0, proc.stderr[-3000:]
    proc = run_forgepipe(["pipeline", *stage_args(tiny_model, root / "pipe", db, "--max-new-tokens", "8")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    ids = {z: json.loads((root / f"sft-z{z}" / "forgepipe-run.json").read_text())["mlflow_run_id"] for z in (0, 2)}
    ids["pipeline"] = json.loads((root / "pipe" / "forgepipe-pipeline.json").read_text())["parent_run_id"]
    return root, f"sqlite:///{db}", ids


@pytest.mark.slow
def test_runs_commands_on_a_store_of_real_runs(real_store):
    root, uri, ids = real_store
    listed = run_forgepipe(["runs", "list", "--tracking-uri", uri])
    assert listed.returncode == 0, listed.stderr[-3000:]
    assert len(listed.stdout.strip().splitlines()) == 1 + 2 + 1 + 3  # header, two SFT, a parent, its stages
    children = run_forgepipe(["runs", "list", "--parent", ids["pipeline"][:8], "--tracking-uri", uri]).stdout
    stage_column = re.compile(r"\s(sft|reward|ppo)\s+FINISHED\s")  # run names have spaces: find the column
    assert [stage_column.search(line).group(1) for line in children.strip().splitlines()[1:]] == ["sft", "reward", "ppo"]

    plot = root / "compare.png"
    compared = run_forgepipe(["runs", "compare", ids[0][:8], ids[2][:8], "--plot", str(plot), "--tracking-uri", uri])
    assert compared.returncode == 0, compared.stderr[-3000:]
    text = compared.stdout
    params = text.split("params that differ")[1].split("\n\n")[0]
    assert re.search(r"deepspeed\.zero_stage\s+0\s+2", params) and "train.max_steps" not in params
    assert re.search(r"zero_optimization\.stage\s+0\s+2", text.split("deepspeed model.json")[1])
    loss = re.search(r"^\s+(?:sft|train)/loss\s+final\s+(\S+)\s+(\S+)\s+(x\S+)$", text, re.M)
    assert loss and loss.group(3) == "x1.00"  # the same losses at both ZeRO stages
    assert re.search(r"^\s+perf/tokens_per_s\s+final\s+\S+\s+\S+\s+x\d+\.\d\d$", text, re.M)
    assert plot.read_bytes().startswith(b"\x89PNG")

    # A pipeline parent stands for its three stages.
    stages = run_forgepipe(["runs", "compare", ids["pipeline"], "--tracking-uri", uri, "--metric", "perf/tokens_per_s"])
    assert stages.returncode == 0, stages.stderr[-3000:]
    assert len(re.findall(r"^  \[\d\] ", stages.stdout, re.M)) == 3

    shown = run_forgepipe(["runs", "show", ids[2][:8], "--tracking-uri", uri])
    assert shown.returncode == 0, shown.stderr[-3000:]
    assert f"export       {(root / 'sft-z2' / 'model').resolve()}" in shown.stdout
    assert "zero_stage: 2" in shown.stdout and "torch " in shown.stdout

    command = run_forgepipe(["runs", "show", ids[2][:8], "--as-command", "--tracking-uri", uri]).stdout.strip()
    words = shlex.split(command)
    assert words[:2] == ["forgepipe", "sft"] and "--zero-stage" in words
    assert words[words.index("--max-steps") + 1] == "3" and words[words.index("--output-dir") + 1] == str(
        root / "sft-z2") + "-rerun"
    # The command re-runs: the same config (into another directory, stopped before training by a bad option).
    again = run_forgepipe([*words[1:], "--output-dir", str(root / "again"), "--max-steps", "-1"])
    assert again.returncode == 2 and again.stderr.startswith("forgepipe: error: --max-steps")

    missing = run_forgepipe(["runs", "show", "no-such-run", "--tracking-uri", uri])
    assert missing.returncode == 2
    assert missing.stderr.strip() == f"forgepipe: error: run 'no-such-run': no run has this name or id in {uri}"


def test_the_summary_a_stage_prints_at_its_end(store):
    from forgepipe.runs import pipeline_summary, run_summary

    st, ids = store
    lines = run_summary(st.uri, ids[2]).splitlines()
    assert re.fullmatch(rf"sft forge-s z2 4r \({ids[2][:8]}\) FINISHED: 4 steps in \d+s", lines[0])
    assert lines[1].split("   ") == ["  sft/loss 3", "sft/eval_loss 3.5", "perf/tokens_per_s 100"]
    assert lines[-1] == f"  run:   forgepipe runs show {ids[2][:8]} --tracking-uri {st.uri}"
    text = pipeline_summary(st.uri, ids["parent"])
    assert text.startswith(f"pipeline run {ids['parent']} ") and ids["reward"][:8] in text


def test_runs_list_refuses_a_negative_limit(store):
    st, _ = store
    result = CliRunner().invoke(runs_group, ["list", "--limit", "-1", "--tracking-uri", st.uri])
    assert result.exit_code == 2
    assert result.output.strip() == "forgepipe: error: --limit: the number of runs shown, 0 for all; not -1"


@pytest.mark.parametrize("content, problem", [
    (b"", "is an empty file, not an MLflow store"),
    (b"not a database at all", "is not an SQLite database"),
    ("sqlite", "is an SQLite database but not an MLflow store (no experiments and runs tables)"),
])
def test_read_commands_never_turn_a_file_into_a_store(tmp_path, content, problem):
    """MLflow creates its tables in an empty file or database it is pointed at: `runs list` on a
    zero-byte file used to make it an MLflow store. It is checked before MLflow opens it."""
    import hashlib
    import sqlite3

    db = tmp_path / "mlflow.db"
    if content == "sqlite":
        with sqlite3.connect(db) as con:
            con.execute("CREATE TABLE notes (x)")
    else:
        db.write_bytes(content)
    before = hashlib.sha256(db.read_bytes()).hexdigest()
    for command in (["list"], ["show", "abcd"], ["compare", "abcd", "ef01"]):
        result = CliRunner().invoke(runs_group, [*command, "--tracking-uri", f"sqlite:///{db}"])
        assert result.exit_code == 2, result.output
        assert result.output.strip() == f"forgepipe: error: --tracking-uri: {db} {problem}; a read command leaves " \
                                         "a store as it is"
    assert hashlib.sha256(db.read_bytes()).hexdigest() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlflow.db"]


def test_a_server_that_never_answers_is_one_error_in_seconds_with_mlflows_retries_kept_short(monkeypatch):
    """issue 22 item 14: MLflow's client alone retries for minutes (250 s refused, 20 min silent)."""
    import os
    import time

    from fake_servers import silent_server_port

    from forgepipe.runs import READ_HTTP_ENV

    for key in READ_HTTP_ENV:
        monkeypatch.setenv(key, "")  # so that the test's settings are undone afterwards
        monkeypatch.delenv(key)
    port = silent_server_port()
    started = time.monotonic()
    with pytest.raises(ForgeError, match=rf"--tracking-uri: http://127.0.0.1:{port} does not answer \(timed out"):
        Store(f"http://127.0.0.1:{port}")
    assert time.monotonic() - started < 10
    assert {k: os.environ[k] for k in READ_HTTP_ENV} == READ_HTTP_ENV

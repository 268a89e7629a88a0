"""The command line: help, version, config show, and bad input -> one line, non-zero, nothing left behind."""

from __future__ import annotations

import json

import pytest
import yaml
from click.testing import CliRunner
from conftest import SAMPLE_DOCS, SAMPLE_PAIRS, run_forgepipe

from forgepipe import __version__
from forgepipe.cli import main


def test_help_and_version():
    runner = CliRunner()
    assert __version__ in runner.invoke(main, ["--version"]).output
    out = runner.invoke(main, ["sft", "--help"]).output
    for flag in ("--zero-stage", "--zeropp / --no-zeropp", "--hpz-size", "--lora-dim", "--data-split", "--tracking-uri"):
        assert flag in out
    assert "[default: all of the stage's data; pipeline: 2,4,4]" in " ".join(out.split())  # --data-split
    assert runner.invoke(main, ["--help"]).exit_code == 0


def test_config_show_resolves_yaml_options_and_deepspeed_json(tmp_path):
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text("train:\n  lr: 2.0e-5\ndeepspeed:\n  zero_stage: 3\n  zeropp: true\n")
    result = CliRunner().invoke(
        main, ["config", "show", "--config", str(cfg_file), "--grad-accum", "4", "--no-quantized-weights",
               "--no-quantized-gradients", "--format", "json", "deepspeed.max_live_parameters=1000"],
        env={"SLURM_PROCID": "0", "SLURM_NTASKS": "8", "SLURM_NTASKS_PER_NODE": "4", "SLURM_LOCALID": "0",
             "SLURM_JOB_NODELIST": "node[01-02]"},
    )
    assert result.exit_code == 0, result.output
    resolved = json.loads(result.output)
    assert resolved["config"]["train"]["lr"] == 2e-5
    assert resolved["config"]["train"]["grad_accum"] == 4
    ds = resolved["deepspeed"]
    assert ds["gradient_accumulation_steps"] == 4
    assert ds["train_batch_size"] == 4 * 4 * 8
    assert ds["zero_optimization"]["zero_hpz_partition_size"] == 4  # ranks per node, from Slurm
    assert ds["zero_optimization"]["stage3_max_live_parameters"] == 1000
    assert resolved["world"]["master_addr"] == "node01"


def test_config_show_yaml_is_the_default_format():
    result = CliRunner().invoke(main, ["config", "show", "--stage", "reward", "--lr", "1e-4"])
    assert result.exit_code == 0, result.output
    assert yaml.safe_load(result.output)["config"]["stage"] == "reward"


def write(path, text):
    path.write_text(text)
    return path


BAD_INPUTS = {
    "missing data file": (lambda d: ["--data", str(d / "nope.jsonl")], "nope.jsonl"),
    "malformed line": (lambda d: ["--data", str(write(d / "bad.jsonl", '{"prompt": "a", "response": "b"}\n{oops\n'))],
                       "bad.jsonl:2: invalid JSON"),
    "unknown fields": (lambda d: ["--data", str(write(d / "odd.jsonl", '{"question": "a", "answer": "b"}\n' * 20))],
                       "question"),
    "split leaves no data": (lambda d: ["--data", str(SAMPLE_PAIRS), "--data-split", "0,5,5"], "--data-split"),
    "unknown model": (lambda d: ["--data", str(SAMPLE_PAIRS), "--model", "forge-xl-unknown"], "forge-xl-unknown"),
    "zero++ without stage 3": (lambda d: ["--data", str(SAMPLE_PAIRS), "--zeropp", "--zero-stage", "2"], "--zero-stage"),
    "max length below every prompt": (lambda d: ["--data", str(SAMPLE_PAIRS), "--max-seq-len", "8"], "--max-seq-len 8"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line_and_leaves_nothing(case, tiny_model, tmp_path):
    make_args, needle = BAD_INPUTS[case]
    out = tmp_path / "out"
    args = ["sft", "--model", str(tiny_model), "--output-dir", str(out), "--tracking-uri",
            f"sqlite:///{tmp_path}/mlflow.db", "--torch-adam", *make_args(tmp_path)]
    # A later --model wins in click, so the unknown-model case overrides the tiny model.
    proc = run_forgepipe(args, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("forgepipe: error:")]
    assert len(errors) == 1, proc.stderr[-2000:]
    assert needle in errors[0]
    assert "Traceback" not in proc.stderr
    assert not out.exists()


def test_reward_refuses_sft_only_data(tiny_model, tmp_path):
    out = tmp_path / "out"
    proc = run_forgepipe(["reward", "--model", str(tiny_model), "--data", str(SAMPLE_DOCS), "--output-dir", str(out),
                          "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db"], timeout=300)
    assert proc.returncode == 2
    assert "no chosen/rejected pairs" in proc.stderr and "sample_docs.jsonl" in proc.stderr
    assert not out.exists()

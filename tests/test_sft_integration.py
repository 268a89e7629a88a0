"""Stage 1 end to end on a tiny GPT-NeoX: real DeepSpeed engines, a real MLflow store, real ranks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import SAMPLE_DOCS, SAMPLE_PAIRS, artifact_json, metric_values, mlflow_run, run_forgepipe

pytestmark = pytest.mark.slow


def sft_args(model: Path, out: Path, db: Path, *extra: str) -> list[str]:
    return ["sft", "--model", str(model), "--data", str(SAMPLE_PAIRS), "--data", str(SAMPLE_DOCS),
            "--output-dir", str(out), "--tracking-uri", f"sqlite:///{db}", "--dtype", "fp32", "--torch-adam",
            "--per-device-batch-size", "4", "--lr", "2e-3", "--warmup-ratio", "0", "--max-steps", "12",
            "--eval-every", "6", "--max-seq-len", "192", "--seed", "7", *extra]


def check_export_generates(model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = tok("\n\nHuman: What is a GPU?\n\nAssistant:", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[1] > ids["input_ids"].shape[1]


@pytest.mark.parametrize("zero_stage", [0, 2, 3])
def test_sft_single_process(tiny_model, tmp_path, zero_stage):
    out, db = tmp_path / "sft", tmp_path / "mlflow.db"
    proc = run_forgepipe(sft_args(tiny_model, out, db, "--zero-stage", str(zero_stage)))
    assert proc.returncode == 0, proc.stderr[-3000:]

    client, run = mlflow_run(db)
    losses = metric_values(client, run.info.run_id, "sft/loss")
    assert len(losses) == 12
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, losses
    assert run.data.params["deepspeed.zero_stage"] == str(zero_stage)
    assert run.data.params["stage"] == "sft"
    assert run.data.tags["world_size"] == "1"
    assert run.data.tags["git_commit"]
    assert "sft/eval_perplexity" in run.data.metrics
    ds_json = artifact_json(client, run.info.run_id, "deepspeed/model.json")
    assert ds_json["zero_optimization"]["stage"] == zero_stage

    model_dir = out / "model"
    assert (model_dir / "model.safetensors").is_file()
    assert not list(out.glob("*.partial")) and not list((out / "checkpoints").glob(".partial-*"))
    assert run.data.tags["model_dir"] == str(model_dir.resolve())
    check_export_generates(model_dir)


def test_compiled_sft_follows_the_eager_losses(tiny_model, tmp_path):
    """--compile (engine.compile, dynamic shapes) trains the same numbers as eager mode, its
    evaluation table generates (eagerly) and its export is an ordinary model."""
    losses = {}
    for mode in ("eager", "compiled"):
        out, db = tmp_path / mode, tmp_path / f"{mode}.db"
        extra = ["--zero-stage", "2", "--max-steps", "4", "--eval-every", "0", "--eval-generations", "2"]
        proc = run_forgepipe(sft_args(tiny_model, out, db, *extra, *(["--compile"] if mode == "compiled" else [])))
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert ("torch.compile (dynamic shapes)" in proc.stderr) == (mode == "compiled")
        client, run = mlflow_run(db)
        losses[mode] = metric_values(client, run.info.run_id, "sft/loss")
    assert run.data.params["train.compile"] == "True"
    assert losses["compiled"] == pytest.approx(losses["eager"], rel=1e-3), losses
    check_export_generates(tmp_path / "compiled" / "model")


def test_sft_zero3_two_ranks_and_checkpoint_reload(tiny_model, tmp_path):
    out, db = tmp_path / "sft", tmp_path / "mlflow.db"
    proc = run_forgepipe(sft_args(tiny_model, out, db, "--zero-stage", "3", "--per-device-batch-size", "2"), nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    client, run = mlflow_run(db)
    assert run.data.tags["world_size"] == "2"
    losses = metric_values(client, run.info.run_id, "sft/loss")
    assert sum(losses[-3:]) < sum(losses[:3]), losses
    final_eval = metric_values(client, run.info.run_id, "sft/eval_loss")[-1]

    # The DeepSpeed checkpoint (2 ZeRO-3 partitions) reloads into a fresh 2-rank job, and so does
    # the HF export in a plain process: both give the loss the run logged.
    check = tmp_path / "reload.py"
    check.write_text(RELOAD_SCRIPT)
    import subprocess

    from conftest import child_env, torchrun

    reload = subprocess.run(
        torchrun(2, str(check), str(tiny_model), str(out)),
        env=child_env(), capture_output=True, text=True, timeout=600,
    )
    assert reload.returncode == 0, reload.stderr[-3000:]
    ckpt_loss = float(reload.stdout.strip().splitlines()[-1])
    assert ckpt_loss == pytest.approx(final_eval, rel=1e-4)
    check_export_generates(out / "model")


RELOAD_SCRIPT = r'''
import sys
from pathlib import Path
from forgepipe.config import build_config
from forgepipe.distributed import init_distributed, teardown, detect_world
from forgepipe.deepspeed_config import build_ds_config
from forgepipe.engine import initialize
from forgepipe.checkpoint import find_latest, load_checkpoint
from forgepipe.models.load import load_causal_lm, load_tokenizer
from forgepipe.data import load_stage_data
from forgepipe.data.tokenize import tokenize_sft
from forgepipe.data.collate import SFTCollator
from forgepipe.stages.sft import evaluate_lm

model_path, out = sys.argv[1], Path(sys.argv[2])
cfg = build_config("sft", out / "config.yaml")
world = init_distributed(detect_world())
tok = load_tokenizer(model_path)
_, eval_raw = load_stage_data(cfg.data.sources, "sft", cfg.data.split, cfg.train.seed, cfg.data.eval_fraction)
eval_data = tokenize_sft(eval_raw, tok, cfg.data.max_seq_len, cfg.data.max_prompt_len, str(out / ".cache"))
engine = initialize(load_causal_lm(model_path, dtype="fp32", tokenizer=tok), build_ds_config(cfg, world), total_steps=1)
load_checkpoint({"model": engine}, find_latest(out))
metrics = evaluate_lm(engine, eval_data, SFTCollator(tok.pad_token_id), cfg.train.per_device_batch_size, world)
if world.is_main:
    print(metrics["eval/loss"])
teardown()
'''


def test_packed_sft_on_real_hh_sample(tiny_model, tmp_path):
    """Packing and lengths rounded to a multiple, through the CLI on real data (their numbers:
    test_sft_packing.py)."""
    from conftest import HH_SAMPLE

    if not HH_SAMPLE.is_file():
        pytest.skip(f"real data sample not present at {HH_SAMPLE}")
    out, db = tmp_path / "sft", tmp_path / "mlflow.db"
    args = sft_args(tiny_model, out, db, "--zero-stage", "2", "--packing", "--pad-to-multiple-of", "64")
    args[args.index(str(SAMPLE_PAIRS))] = str(HH_SAMPLE)
    proc = run_forgepipe(args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    client, run = mlflow_run(db)
    assert run.data.params["data.packing"] == "True" and run.data.params["data.pad_to_multiple_of"] == "64"
    assert int(run.data.params["data.train_samples"]) > 20  # packed rows of up to 192 tokens
    assert torch.isfinite(torch.tensor(metric_values(client, run.info.run_id, "sft/loss"))).all()


def test_a_diverged_bf16_run_stops_on_its_gradient_norm(tiny_model, tmp_path):
    """bf16 runs skip DeepSpeed's per-parameter overflow check by default; a run whose gradient norm
    is no longer finite stops at the next log in one line. With --check-grad-overflow DeepSpeed
    skips those steps instead, and the run goes on."""
    diverging = ["--dtype", "bf16", "--zero-stage", "2", "--lr", "1e30", "--max-steps", "4", "--eval-generations", "0"]
    out, db = tmp_path / "guarded", tmp_path / "guarded.db"
    proc = run_forgepipe([*sft_args(tiny_model, out, db), *diverging])
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("forgepipe: error: the gradient norm is") and "training diverged" in last, last
    assert not (out / "model").exists()

    out, db = tmp_path / "checked", tmp_path / "checked.db"
    proc = run_forgepipe([*sft_args(tiny_model, out, db), *diverging, "--check-grad-overflow"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "OVERFLOW! Skipping step" in proc.stderr + proc.stdout

"""Engine construction: ZeRO-3 models load straight into partitions (no whole copy per rank)."""

from __future__ import annotations

import subprocess

import pytest
from conftest import child_env, torchrun

SCRIPT = r'''
import sys
from forgepipe.config import build_config
from forgepipe.distributed import detect_world, init_distributed, teardown
from forgepipe.deepspeed_config import build_ds_config
from forgepipe.engine import initialize, parameter_count, zero3_loading
from forgepipe.models.load import LoraSettings, load_causal_lm, load_tokenizer
from forgepipe.models.reward_model import load_scalar_model
from transformers.integrations import is_deepspeed_zero3_enabled

path = sys.argv[1]
cfg = build_config("sft", None, {"deepspeed.zero_stage": 3, "deepspeed.torch_adam": True, "train.dtype": "fp32"})
world = init_distributed(detect_world())
ds = build_ds_config(cfg, world)
tok = load_tokenizer(path)
with zero3_loading(ds):
    lm = load_causal_lm(path, dtype="fp32", tokenizer=tok, lora=LoraSettings(dim=4))
    scorer = load_scalar_model(path, dtype="fp32", tokenizer=tok)
assert not is_deepspeed_zero3_enabled()  # nothing leaks into later loads (e.g. the export's CPU rebuild)
for model in (lm, scorer):
    frozen = [p for p in model.parameters() if not p.requires_grad or model is scorer]
    assert all(hasattr(p, "ds_id") and p.numel() == 0 for p in frozen), "not partitioned"
full = parameter_count(load_causal_lm(path, dtype="fp32"))
assert parameter_count(lm) >= full, (parameter_count(lm), full)
engine = initialize(lm, ds, total_steps=1)
batch = tok(["\n\nHuman: hi\n\nAssistant: hello"], return_tensors="pt")
loss = engine(**batch, labels=batch["input_ids"]).loss
engine.backward(loss)
engine.step()
print(f"rank {world.rank} ok")
teardown()
'''


@pytest.mark.slow
def test_zero3_models_load_into_partitions(tiny_model, tmp_path):
    script = tmp_path / "zero3_load.py"
    script.write_text(SCRIPT)
    proc = subprocess.run(
        torchrun(2, str(script), str(tiny_model)),
        env=child_env(), capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rank 0 ok" in proc.stdout and "rank 1 ok" in proc.stdout

"""`make gpu-perf` runs here at toy size (CPU), so the script a GPU loan runs first cannot rot."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import REPO, child_env


@pytest.mark.slow
def test_gpu_perf_tiny_writes_the_table_and_json(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_perf.py"), "--size", "tiny", "--out", str(out),
                           "--work", str(tmp_path / "work"), "--parts", "attention,rollout,ceiling,forgepipe", "--rows", "0"],
                          env=child_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads((out / "gpu_perf.json").read_text())
    kinds = [(r["kind"], r["error"]) for r in result["rows"]]
    assert ("ceiling", "") in kinds and ("forgepipe", "") in kinds, kinds
    forgepipe = next(r for r in result["rows"] if r["kind"] == "forgepipe")
    assert forgepipe["tokens_per_s"] > 0 and "ZeRO 1" in forgepipe["note"]  # bf16 auto: stage 1 at least
    assert result["attention"] and all("math" in a["backends"] for a in result["attention"])
    assert {r["rollout"].split(",")[0] for r in result["rollouts"]} == {"transformers generate (PPO before)",
                                                                         "rollout engine"}
    table = (out / "gpu_perf.md").read_text()
    assert "| sft defaults |" in table and (out / "logs.tgz").is_file()

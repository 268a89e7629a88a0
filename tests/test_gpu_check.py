"""`make gpu-check` runs here too (tiny sizes, CPU), so the script cannot rot between GPU loans."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import REPO, child_env

sys.path.insert(0, str(REPO / "bench"))
import gpu_check  # noqa: E402


def test_a_missing_package_is_named_with_the_way_out(monkeypatch, tmp_path):
    monkeypatch.setattr(gpu_check, "NEEDED", ("torch", "forgepipe_absent_pkg"))
    with pytest.raises(SystemExit, match=r"missing Python packages: forgepipe_absent_pkg; no wheels in .*make gpu-wheels"):
        gpu_check.ensure_packages([tmp_path / "none"], tmp_path / "site")


def test_a_missing_package_is_installed_from_local_wheels(monkeypatch, tmp_path):
    """No index: the wheel beside the script is what gets installed."""
    project = tmp_path / "proj"
    (project / "fp_wheel_probe").mkdir(parents=True)
    (project / "fp_wheel_probe" / "__init__.py").write_text("VALUE = 42\n")
    (project / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["setuptools"]\nbuild-backend = "setuptools.build_meta"\n'
        '[project]\nname = "fp-wheel-probe"\nversion = "1.0"\n')
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                    "-w", str(wheels), str(project)], check=True)
    monkeypatch.setattr(gpu_check, "NEEDED", ("torch", "fp_wheel_probe"))
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setenv("PYTHONPATH", "")
    gpu_check.ensure_packages([tmp_path / "absent", wheels], tmp_path / "site")
    import fp_wheel_probe

    assert fp_wheel_probe.VALUE == 42 and str(tmp_path / "site") in fp_wheel_probe.__file__


def test_the_table_marks_a_failed_check():
    rows = [gpu_check.Row("sft", "ZeRO-3", 1, 100.0, 1.5, 0.3, 2.0, {"loss": True, "resume": False})]
    info = {"device": "cpu", "gpus": 0, "torch": "t", "cuda": None, "hip": None, "deepspeed": "d",
            "transformers": "x"}
    text = gpu_check.table(rows, info, 1.0, "python3 bench/gpu_check.py")
    assert "resume FAIL" in text and "| FAIL" in text and "30.0%" in text
    assert not rows[0].ok


@pytest.mark.slow
def test_gpu_check_smoke_on_the_cpu(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py"), "--size", "tiny", "--out", str(out),
                           "--work", str(tmp_path / "work")], env=child_env(), capture_output=True, text=True,
                          timeout=900, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    result = json.loads((out / "gpu_check.json").read_text())
    rows = {(r["stage"], r["zero"]): r for r in result["rows"]}
    assert set(rows) == {("sft", "ZeRO-2"), ("sft", "ZeRO-3"), ("reward", "ZeRO-2"), ("reward", "ZeRO-3"),
                         ("ppo", "ZeRO-3"), ("ppo", "ZeRO-2")}
    assert all(r["ok"] for r in rows.values())
    assert rows[("sft", "ZeRO-3")]["checks"] == {"loss": True, "export": True, "resume": True}
    assert rows[("ppo", "ZeRO-3")]["checks"]["generate"]
    assert all(r["tokens_per_s"] > 0 and r["peak_mem_gib"] > 0 for r in rows.values())
    table = (out / "gpu_check.md").read_text()
    assert table.count("| pass |") == 6 and "Measured bf16 matmul peak" in table

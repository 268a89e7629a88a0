"""The comparison benchmark's own parts (bench/compare.py): data in each contender's format, the
table, the RESULTS.md section; and `make bench`'s quick mode end to end where its environment exists.

No timing is asserted: speed is what the benchmark measures, not what a test checks."""

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

import compare  # noqa: E402


def _hh(path: Path) -> Path:
    rows = [{"chosen": "\n\nHuman: hi\n\nAssistant: hello", "rejected": "\n\nHuman: hi\n\nAssistant: go away"},
            {"chosen": "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant: d",
             "rejected": "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant: e"}]
    with gzip.open(path, "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return path


def test_read_pairs_splits_at_the_last_assistant_turn(tmp_path):
    pairs = compare.read_pairs(_hh(tmp_path / "hh.jsonl.gz"))
    assert pairs[0] == {"prompt": "\n\nHuman: hi\n\nAssistant:", "chosen": " hello", "rejected": " go away"}
    assert pairs[1]["prompt"].endswith("c\n\nAssistant:") and pairs[1]["chosen"] == " d"


def test_write_data_gives_every_contender_the_same_rows(tmp_path):
    import datasets

    pairs = compare.read_pairs(_hh(tmp_path / "hh.jsonl.gz")) * 5
    paths = compare.write_data(pairs, tmp_path / "data", eval_rows=2)
    fp = [json.loads(x) for x in paths["pairs"].read_text().splitlines()]
    trl = [json.loads(x) for x in paths["trl_sft"].read_text().splitlines()]
    ds = datasets.load_from_disk(str(paths["dschat"]))
    assert "Dahoas/rm-static" in str(paths["dschat"])  # the name DeepSpeed-Chat dispatches on
    assert len(fp) == len(trl) == len(ds["train"]) == 8 and len(ds["test"]) == 2
    assert [r["prompt"] + r["chosen"] for r in fp] == [r["prompt"] + r["completion"] for r in trl]
    assert [r["prompt"] + r["chosen"] for r in fp] == [r["prompt"] + r["chosen"] for r in ds["train"]]


def test_table_medians_and_ratio():
    s = compare.Settings(steps=3, warmup=1, batch=4)
    runs = [compare.Result("forgepipe", "sft", 10.0, 5.0, [(9.0, 1, 1), (1.0, 300, 400), (1.0, 300, 400)], 100),
            compare.Result("trl", "sft", 20.0, 9.0, [(9.0, 1, 1), (2.0, 300, 400), (2.0, 300, 400)], 100)]
    text = compare.table(runs, s)
    assert "| sft | forgepipe | 1 | 1.00 | 4.00 | 300 | 400 | 75% |" in text
    assert text.splitlines()[-1].endswith("| 2.00x |")  # forgepipe takes half TRL's time per step


def test_mfu_counts_six_flops_per_parameter_per_computed_token():
    s = compare.Settings(peak_tflops=1.0, params=1_000_000)
    assert compare.mfu(50_000, s) == "30.0%"  # 6 * 1e6 * 5e4 = 3e11 FLOP/s of a 1e12 peak
    assert compare.mfu(50_000, compare.Settings()) == "-"  # no peak measured: no column value


def test_forgepipe_commands_carry_the_levers_and_the_optimizer(tmp_path):
    data = {"pairs": tmp_path / "pairs.jsonl"}
    compiled = compare.forgepipe_cmd("sft", "compiled", tmp_path, data, tmp_path / "out", compare.Settings())
    assert "--compile" in compiled and "--group-by-length" in compiled and "--torch-adam" in compiled
    fused = compare.forgepipe_cmd("sft", "dynamic", tmp_path, data, tmp_path / "out",
                                  compare.Settings(optimizer="fused"))
    assert "--torch-adam" not in fused and "--compile" not in fused


def test_write_results_replaces_only_its_section(tmp_path):
    path = tmp_path / "RESULTS.md"
    path.write_text("# Benchmark results\n\n## GPU check\nkept\n")
    compare.write_results("first", path)
    compare.write_results("second", path)
    compare.write_results("prep", path, marker="prep")
    text = path.read_text()
    assert "kept" in text and "second" in text and "first" not in text and text.count("bench:compare:start") == 1
    assert "<!-- bench:prep:start -->\nprep\n" in text


@pytest.mark.slow
def test_make_bench_quick_runs_forgepipe_against_trl(tmp_path):
    """`bench/compare.py --quick` (what `make bench BENCH_ARGS=--quick` runs) gives a table with a
    forgepipe row and a ratio, where bench/setup_contenders.sh has set up its environment."""
    env_dir = Path(os.environ.get("BENCH_ENV", "/work/bench-env"))
    if not (env_dir / "venv" / "bin" / "python").exists() or not (env_dir / "models" / "smollm2-135m").exists():
        pytest.skip(f"no contender environment under {env_dir} (bench/setup_contenders.sh makes it)")
    if not compare.HH.exists():
        pytest.skip(f"no shared HH sample at {compare.HH}")
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "compare.py"), "--quick", "--work", str(tmp_path),
                           "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"],
                          capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| sft | forgepipe |" in proc.stdout and "| sft | trl |" in proc.stdout

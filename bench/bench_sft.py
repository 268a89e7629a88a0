"""SFT throughput and peak memory across ZeRO stages, ranks and dtypes.

Runs the real CLI (`forgepipe sft`) on a small GPT-NeoX built from the bundled config and reads
throughput from the run's MLflow metrics (tokens/s counts real tokens only, averaged over the
logged windows after the first, which includes warm-up). Memory: the training peak is the run's
`mem/host_peak_rss_gib_max` metric (resident set, the largest rank, up to the last step, before the
export); the whole-run peak is the heaviest process over the run, export included (ru_maxrss of a
wrapper's children). Results go to stdout as a Markdown table;
record them with the command in bench/RESULTS.md.

    .venv/bin/python bench/bench_sft.py --steps 20 --hidden 256 --layers 4
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "examples" / "data"


MEASURE = (
    "import resource, subprocess, sys; r = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL); "
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(r.returncode)"
)


def run(model: Path, work: Path, name: str, zero: int, nproc: int, dtype: str, steps: int, batch: int) -> dict:
    out, db = work / name, work / "mlflow.db"
    args = ["sft", "--model", str(model), "--data", str(DATA / "sample_pairs.jsonl"), "--data",
            str(DATA / "sample_docs.jsonl"), "--data-split", "1,0,0", "--output-dir", str(out),
            "--tracking-uri", f"sqlite:///{db}", "--run-name", name, "--dtype", dtype, "--torch-adam",
            "--zero-stage", str(zero), "--per-device-batch-size", str(batch), "--max-steps", str(steps),
            "--max-seq-len", "256", "--epochs", "50", "--resume", "never"]
    cmd = ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "-m", "forgepipe.cli"]
           if nproc > 1 else [sys.executable, "-m", "forgepipe.cli"]) + args
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // nproc)), "PYTHONWARNINGS": "ignore"}
    # A wrapper process per run, so that its children's peak RSS (the largest single rank's) is this run's own.
    wrapper = [sys.executable, "-c", MEASURE, *cmd]
    start = time.monotonic()
    proc = subprocess.run(wrapper, env=env, capture_output=True, text=True)
    wall = time.monotonic() - start
    if proc.returncode:
        raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
    peak_mib = int(proc.stdout.strip().splitlines()[-1]) / 1024

    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{db}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                              filter_string=f"tags.mlflow.runName = '{name}'")
    history = sorted(client.get_metric_history(runs[0].info.run_id, "perf/tokens_per_s"), key=lambda m: m.step)
    samples = sorted(client.get_metric_history(runs[0].info.run_id, "perf/samples_per_s"), key=lambda m: m.step)
    train_rss = max(m.value for m in client.get_metric_history(runs[0].info.run_id, "mem/host_peak_rss_gib_max")) * 1024
    return {"name": name, "zero": zero, "ranks": nproc, "dtype": dtype, "train_rss_mib": train_rss,
            "tokens_per_s": statistics.median(m.value for m in history[1:]),
            "samples_per_s": statistics.median(m.value for m in samples[1:]),
            "wall_s": wall, "peak_rss_mib": peak_mib}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--configs", default="0:1:fp32,2:1:fp32,3:1:fp32,3:1:bf16,2:2:fp32,3:2:fp32",
                        help="zero:ranks:dtype, comma-separated")
    args = parser.parse_args()
    from forgepipe.models.tiny import make_tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = make_tiny_model(work / "model", num_layers=args.layers, hidden_size=args.hidden)
        rows = []
        for spec in args.configs.split(","):
            zero, ranks, dtype = spec.split(":")
            rows.append(run(model, work, f"z{zero}-r{ranks}-{dtype}", int(zero), int(ranks), dtype,
                            args.steps, args.batch))
            print(rows[-1], file=sys.stderr, flush=True)
    print("| ZeRO | ranks | dtype | tokens/s | samples/s | wall s | training peak RSS/rank MiB | whole-run peak RSS MiB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['zero']} | {r['ranks']} | {r['dtype']} | {r['tokens_per_s']:.0f} | {r['samples_per_s']:.1f} "
              f"| {r['wall_s']:.1f} | {r['train_rss_mib']:.0f} | {r['peak_rss_mib']:.0f} |")


if __name__ == "__main__":
    main()

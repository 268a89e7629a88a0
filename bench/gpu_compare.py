"""bench/compare.py on a GPU machine that has neither the benchmark venv nor an index nor the model.

Two halves, one file:

    python bench/gpu_compare.py bundle                 # here: .gpu-bench/ (DeepSpeed-Chat tree, SmolLM2's
                                                       # config and tokenizer, the HH sample), ~4 MiB
    python3 bench/gpu_compare.py run --out $OUT --deadline 420 [compare.py args...]   # on the GPU machine

`run` installs the wheels of `make gpu-wheels` (.whl/) as gpu_check does, makes SmolLM2-135M's
architecture with random weights (the weights are 540 MB, too large to carry; step times do not
depend on their values), unpacks DeepSpeed-Chat with bench/dschat.patch already applied, pre-builds
DeepSpeed's fused Adam once (every contender then uses it, as each does on a GPU by default),
measures the bf16 matmul peak, and runs compare.py with the machine's python3 standing in for the
contenders' venv. TRL is not carried. The section goes to $OUT/compare.md after every run and the
runs' logs to $OUT/logs/ as they run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "bench")]  # forgepipe from this tree (not installed on the GPU machine)
import compare  # noqa: E402  (the benchmark's own module: same data, commands and table)
import gpu_check  # noqa: E402

BUNDLE = REPO / ".gpu-bench"
MODEL_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
               "chat_template.jinja")


def bundle(out: Path = BUNDLE) -> None:
    """What the GPU machine lacks besides wheels, small enough to carry beside .whl/ (64 MiB a call)."""
    out.mkdir(parents=True, exist_ok=True)
    with tarfile.open(out / "dschat.tar.gz", "w:gz") as tar:
        tar.add(compare.DSCHAT, arcname="dschat", filter=lambda t: None if "__pycache__" in t.name else t)
    model = compare.BENCH_ENV / "models" / "smollm2-135m"
    (out / "smollm2-135m").mkdir(exist_ok=True)
    for name in MODEL_FILES:
        if (model / name).exists():
            shutil.copy(model / name, out / "smollm2-135m" / name)
    shutil.copy(compare.HH, out / compare.HH.name)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"{out}: {size / 2**20:.1f} MiB")


def random_model(source: Path, out: Path, seed: int = 0) -> int:
    """SmolLM2-135M's config and tokenizer with random bf16 weights; returns the parameter count."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    config = AutoConfig.from_pretrained(source)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    for name in MODEL_FILES:
        if (source / name).exists() and name != "config.json":
            shutil.copy(source / name, out / name)
    data = json.loads((out / "config.json").read_text())
    data["_name_or_path"] = str(out)  # DeepSpeed-Chat reloads the tokenizer from this field
    (out / "config.json").write_text(json.dumps(data, indent=2))
    return sum(p.numel() for p in model.parameters())


def run(a, rest: list[str]) -> int:
    started = time.monotonic()
    work, out = a.work, a.out
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    gpu_check.ensure_packages([REPO / ".whl", REPO / "bench" / "wheels"], work / "site")
    import torch

    gpu = torch.cuda.is_available()
    # One JIT-op cache for the pre-build and every contender (all run this machine's python3).
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(work / "torch-extensions"))
    build = gpu_check.start_op_build(gpu)
    with tarfile.open(a.bundle / "dschat.tar.gz") as tar:
        tar.extractall(work, filter="data")
    hh = a.bundle / compare.HH.name  # read in place: compare.py only reads it
    model = work / "smollm2-135m-random-init"
    params = random_model(a.bundle / "smollm2-135m", model)
    peak = gpu_check.measure_peak_tflops("cuda" if gpu else "cpu")
    build_error = gpu_check.finish_op_build(build)
    print(f"gpu-compare: {params / 1e6:.1f}M parameters, bf16 matmul peak {peak:.1f} TFLOP/s, "
          f"fused Adam {'built' if not build_error else 'FAILED: ' + build_error}; "
          f"setup {time.monotonic() - started:.0f} s", flush=True)
    env = {**os.environ, "BENCH_CONTENDER_PYTHON": sys.executable, "BENCH_DSCHAT": str(work / "dschat"),
           "BENCH_DATA": str(hh), "BENCH_ENV": str(work)}
    if env.get("TORCH_CUDA_ARCH_LIST"):  # the spelling the op was built under, for every contender
        from forgepipe.distributed import op_build_arch_list

        env["TORCH_CUDA_ARCH_LIST"] = op_build_arch_list(env["TORCH_CUDA_ARCH_LIST"])
    deadline = max(60.0, a.deadline - (time.monotonic() - started)) if a.deadline else None
    cmd = [sys.executable, str(REPO / "bench" / "compare.py"), "--model", str(model), "--work", str(work / "runs"),
           "--report", str(out / "compare.md"), "--logs", str(out / "logs"), "--tracking-uri", f"sqlite:///{work / 'mlflow.db'}",
           "--peak-tflops", f"{peak:.1f}", "--params", str(params),
           *(["--torch-adam"] if build_error else []), *(["--deadline", f"{deadline:.0f}"] if deadline else []), *rest]
    print("gpu-compare:", " ".join(cmd), flush=True)
    return subprocess.run(cmd, env=env).returncode


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("bundle")
    r = sub.add_parser("run")
    r.add_argument("--out", type=Path, required=True, help="compare.md and the runs' logs")
    r.add_argument("--work", type=Path, default=Path("/tmp/gpu-compare"), help="scratch: wheels, model, runs")
    r.add_argument("--bundle", type=Path, default=BUNDLE)
    r.add_argument("--deadline", type=float, default=None, help="seconds from now, setup included")
    a, rest = parser.parse_known_args()
    if a.cmd == "bundle":
        bundle()
        return 0
    return run(a, rest)


if __name__ == "__main__":
    sys.exit(main())

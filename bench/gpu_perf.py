"""forgepipe's training step against the hardware, in one device call: `make gpu-perf`.

What a lent GPU's minutes go to, written to --out as they come (gpu_perf.md, gpu_perf.json):

1. **The matmul peak at the model's own GEMM shapes** (QKV, attention output, MLP up/down, LM head
   at micro-batch x length tokens) beside a square 8192 product: the MFU denominator is measured.
2. **Which SDPA kernel runs** for FORGE-s attention (24 heads x 86) and SmolLM2's (9 x 64), with and
   without a padding mask, and with 86 padded to 88: each backend tried alone, then the default
   dispatch timed forward + backward.
3. **The plain-PyTorch ceiling**: the same model from its config, bf16 weights, fused AdamW, one
   [B, L] batch of real tokens, labels = inputs, no DeepSpeed and no forgepipe; with transformers'
   SDPA and with the padded head dimension.
3b. **Rollouts**: generated tokens/s of PPO's sampler before (transformers' `generate`) and of the rollout
   engine (forgepipe/rollout.py) on gpu_check's 350M actor shape, at 4 and 64 prompts per call.
4. **forgepipe through its real CLI**, lever by lever, on rows that fill [B, L] exactly (every row
   is truncated to --max-seq-len, so real and computed tokens agree and the ceiling's shape is
   forgepipe's): the defaults, then each lever turned back, then reward and DPO.

Every row: tokens/s, model TFLOP/s (6N per token, attention not counted, as forgepipe logs it),
MFU against the measured square peak, the ratio to the ceiling, and peak device memory.
`--size tiny` runs the same plan on a toy model on the CPU (tests/test_gpu_perf.py), so the script
never rots between GPU loans; only the GPU's figures mean anything.

    python3 bench/gpu_perf.py --out $OUT --wheels .whl --deadline 540   # a lent GPU
    python3 bench/gpu_perf.py --size tiny                                # CPU smoke
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
import gpu_check  # noqa: E402  (packages, models from config, data, the fused-Adam pre-build)

STARTED = time.monotonic()

# Model shapes beyond gpu_check's: SmolLM2-135M (the DeepSpeed-Chat comparison's model).
SHAPES = {**gpu_check.SHAPES,
          "smollm2-135m": dict(num_hidden_layers=30, hidden_size=576, num_attention_heads=9, intermediate_size=4 * 576,
                               max_position_embeddings=2048, vocab_size=49152)}
PLANS = {
    "full": dict(model="forge-s", batch=4, seq=1024, words=400, steps=40, log_every=10, small="smollm2-135m",
                 small_seq=256, small_words=100),
    "tiny": dict(model="tiny", batch=2, seq=64, words=40, steps=4, log_every=2, small="tiny", small_seq=32,
                 small_words=20),
}
# forgepipe rows, most telling first (a deadline cuts from the end): (name, stage, shape key, extra options).
# "defaults" is the default path (--zero-stage auto: 1 for bf16 on one GPU); the other rows turn levers back.
FORGEPIPE_ROWS = [
    ("sft defaults", "sft", "model", []),
    ("sft ZeRO-0 (DeepSpeed's FP16_Optimizer path)", "sft", "model", ["--zero-stage", "0"]),
    ("sft ZeRO-2", "sft", "model", ["--zero-stage", "2"]),
    ("sft before: ZeRO-3, padding mask, sdpa", "sft", "model",
     ["--zero-stage", "3", "--padding-mask", "--attn-implementation", "sdpa"]),
    ("sft defaults at ZeRO-3", "sft", "model", ["--zero-stage", "3"]),
    ("reward defaults", "reward", "model", []),
    ("dpo defaults", "dpo", "model", []),
    ("sft small defaults", "sft", "small", []),
    ("sft small before: ZeRO-2, padding mask", "sft", "small", ["--zero-stage", "2", "--padding-mask"]),
    ("sft small, 4096 tokens a micro-batch", "sft", "small", ["--tokens-per-micro-batch", "4096"]),
    ("sft padding mask, sdpa", "sft", "model", ["--padding-mask", "--attn-implementation", "sdpa"]),
    ("sft no mask, sdpa (head 86 unpadded)", "sft", "model", ["--attn-implementation", "sdpa"]),
    ("reward before: ZeRO-3, padding mask, sdpa", "reward", "model",
     ["--zero-stage", "3", "--padding-mask", "--attn-implementation", "sdpa"]),
]


@dataclass
class Row:
    name: str
    kind: str  # ceiling | forgepipe
    shape: str
    tokens_per_s: float = math.nan
    tflops: float = math.nan
    mfu: float = math.nan
    vs_ceiling: float = math.nan  # tokens/s over the fastest ceiling's (pure bf16)
    vs_amp: float = math.nan  # over the AMP ceiling's: fp32 master weights, as DeepSpeed's bf16 mode keeps them
    peak_mem_gib: float = math.nan
    seconds: float = 0.0
    note: str = ""
    error: str = ""


def remaining(deadline: float) -> float:
    return math.inf if not deadline else deadline - (time.monotonic() - STARTED)


def sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: str, warmup: int, iters: int) -> float:
    """Median seconds of fn() over iters calls, after warmup; device events on a GPU."""
    import torch

    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(iters):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return statistics.median(times)


# ---------------------------------------------------------------------------
# 1. matmul peak at the model's shapes


def gemm_table(shape: dict, tokens: int, device: str) -> list[dict]:
    import torch

    h, f, v = shape["hidden_size"], shape["intermediate_size"], shape["vocab_size"]
    cases = [("square 8192" if device == "cuda" else "square 256", *((8192,) * 3 if device == "cuda" else (256,) * 3)),
             ("qkv", tokens, h, 3 * h), ("attn out", tokens, h, h), ("mlp up", tokens, h, f),
             ("mlp down", tokens, f, h), ("lm head", tokens, h, v)]
    out = []
    for name, m, k, n in cases:
        a = torch.randn(m, k, dtype=torch.bfloat16, device=device)
        b = torch.randn(k, n, dtype=torch.bfloat16, device=device)
        seconds = timed(lambda a=a, b=b: a @ b, device, 3, 20 if device == "cuda" else 3)
        out.append({"gemm": name, "m": m, "k": k, "n": n, "tflops": 2 * m * k * n / seconds / 1e12})
        del a, b
    return out


# ---------------------------------------------------------------------------
# 2. which attention kernel runs


def attention_table(cases: list[tuple[str, int, int, int, int]], device: str) -> list[dict]:
    """cases: (label, batch, heads, length, head dim)."""
    import torch
    import torch.nn.functional as F

    from forgepipe.models.attention import sdpa_backends

    out = []
    for label, b, h, length, d in cases:
        for masked in (False, True):
            q, k, v = (torch.randn(b, h, length, d, dtype=torch.bfloat16, device=device, requires_grad=True)
                       for _ in range(3))
            mask = None
            if masked:  # right padding on the last row, as a collated batch has it
                keep = torch.ones(b, length, dtype=torch.bool, device=device)
                keep[-1, length // 2:] = False
                causal = torch.ones(length, length, dtype=torch.bool, device=device).tril()
                mask = (causal[None] & keep[:, None, :])[:, None]
            ok = sdpa_backends(q.detach(), k.detach(), v.detach(), mask)

            def step(q=q, k=k, v=v, mask=mask):
                o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
                o.sum().backward()

            seconds = timed(step, device, 2, 10 if device == "cuda" else 2)
            flops = 4 * b * h * length * length * d * 3.5 / 2  # causal fwd (2 matmuls) + bwd (5), half the square
            out.append({"attention": label, "mask": masked, "backends": [n for n, yes in ok.items() if yes],
                        "fwd_bwd_ms": seconds * 1e3, "tflops": flops / seconds / 1e12})
    return out


# ---------------------------------------------------------------------------
# 3. the plain-PyTorch ceiling


def ceiling_row(name: str, shape: dict, batch: int, seq: int, attn: str, device: str, peak: float,
                amp: bool = False, profile: Path | None = None) -> Row:
    """One plain training step timed: bf16 weights and fused AdamW, or (amp) fp32 master weights under
    bf16 autocast, the optimizer traffic of DeepSpeed's bf16 mode. `profile`: a torch.profiler table
    of three steps written there."""
    import contextlib

    import torch
    from transformers import AutoConfig, GPTNeoXForCausalLM

    from forgepipe.models import attention
    from forgepipe.models.tiny import tiny_asset_dir

    row = Row(name, "ceiling", f"{batch}x{seq}")
    start = time.monotonic()
    config = AutoConfig.from_pretrained(tiny_asset_dir(), local_files_only=True)
    for key, value in shape.items():
        setattr(config, key, value)
    torch.manual_seed(0)
    with torch.device(device):  # initialised where it runs: a CPU init of 1.3B weights takes a minute
        model = GPTNeoXForCausalLM._from_config(config, dtype=torch.float32 if amp else torch.bfloat16)
    row.note = f"attention {attention.use(model, attn)}" + (", fp32 master + bf16 autocast" if amp else ", bf16 weights")
    autocast = (lambda: torch.autocast(device, dtype=torch.bfloat16)) if amp else contextlib.nullcontext
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device == "cuda")
    ids = torch.randint(0, config.vocab_size, (batch, seq), device=device)
    n_params = sum(p.numel() for p in model.parameters())

    def step():
        with autocast():
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    seconds = timed(step, device, 3, 10 if device == "cuda" else 2)
    row.tokens_per_s = batch * seq / seconds
    row.tflops = 6 * n_params * row.tokens_per_s / 1e12
    row.mfu = row.tflops / peak
    row.peak_mem_gib = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else math.nan
    row.seconds = time.monotonic() - start
    if profile is not None:
        write_profile(step, device, profile)
    return row  # the model and optimizer go with this frame: main() empties the allocator's cache


def write_profile(step, device: str, path: Path, steps: int = 3) -> None:
    """torch.profiler over `steps` calls of step(): operator tables by host and by device time."""
    import torch

    activities = [torch.profiler.ProfilerActivity.CPU]
    if device == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        sync(device)
    averages = prof.key_averages()
    with path.open("w") as f:
        f.write(f"{steps} steps\n\nby self CPU time:\n{averages.table(sort_by='self_cpu_time_total', row_limit=35)}")
        if device == "cuda":
            f.write(f"\n\nby self device time:\n{averages.table(sort_by='self_device_time_total', row_limit=25)}")


# ---------------------------------------------------------------------------
# 3b. rollouts: the decode loop against transformers' generate (issue 24)


def rollout_table(shape: dict, batches: tuple[int, ...], prompt_len: int, new_tokens: int, device: str) -> list[dict]:
    """Generated tokens/s of PPO's old sampler (transformers' generate) and of forgepipe/rollout.py at
    each batch size (prompts per call), bf16, an EOS never sampled (every row runs to new_tokens)."""
    import torch
    from transformers import AutoConfig, GPTNeoXForCausalLM

    from forgepipe.models.tiny import tiny_asset_dir
    from forgepipe.rollout import RolloutEngine, SamplingSettings

    config = AutoConfig.from_pretrained(tiny_asset_dir(), local_files_only=True)
    for key, value in shape.items():
        setattr(config, key, value)
    torch.manual_seed(0)
    with torch.device(device):
        model = GPTNeoXForCausalLM._from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa").eval()
    eos, out = config.vocab_size - 1, []
    for batch in batches:
        ids = torch.randint(0, eos, (batch, prompt_len), device=device)
        mask = torch.ones_like(ids)
        variants = {"transformers generate (PPO before)": lambda ids=ids, mask=mask: model.generate(
            input_ids=ids, attention_mask=mask, do_sample=True, top_k=0, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
            eos_token_id=eos, pad_token_id=0)}
        for every, cache, compiled in ((1, "dynamic", False), (8, "dynamic", False), (8, "static", False),
                                       (8, "static", True)):
            engine = RolloutEngine(model, eos_token_id=eos, pad_token_id=0, cache=cache, compile_decode=compiled)
            name = f"rollout engine, check every {every}, {cache} cache{', compiled step' if compiled else ''}"
            variants[name] = lambda engine=engine, ids=ids, mask=mask, every=every: \
                engine.generate(ids, mask, SamplingSettings(max_new_tokens=new_tokens, check_every=every))
        for name, fn in variants.items():  # the compiled step's warm-up call pays its compilation
            seconds = timed(fn, device, 1, 3 if device == "cuda" else 1)
            out.append({"rollout": name, "batch": batch, "prompt_len": prompt_len, "new_tokens": new_tokens,
                        "tokens_per_s": batch * new_tokens / seconds, "ms_per_token": seconds / new_tokens * 1e3})
    return out


# ---------------------------------------------------------------------------
# 4. forgepipe through its CLI


class Runner:
    def __init__(self, args, work: Path, peak: float, gpu: bool):
        self.args, self.work, self.peak, self.gpu = args, work, peak, gpu
        self.db = work / "mlruns" / "mlflow.db"
        self.logs = work / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.fused_adam = gpu

    def run(self, name: str, stage: str, model: Path, data: Path, seq: int, plan: dict, extra: list[str],
            profile: bool = False) -> Row:
        import mlflow

        row = Row(name, "forgepipe", f"{plan['batch']}x{seq}")
        slug = "".join(c if c.isalnum() else "-" for c in name).strip("-")[:60]
        out = self.work / slug
        split = "1,0,0" if stage == "sft" else "0,1,0"
        # Profiled: through bench/fp_run.py (the same CLI, with torch.profiler over four steps late in the run).
        entry = [str(REPO / "bench" / "fp_run.py")] if profile else ["-m", "forgepipe.cli"]
        cmd = [sys.executable, *entry, stage, "--model", str(model), "--data", str(data),
               "--data-split", split, "--output-dir", str(out), "--resume", "never", "--dtype", "bf16",
               "--per-device-batch-size", str(plan["batch"]), "--max-seq-len", str(seq), "--max-prompt-len",
               str(seq // 8), "--pad-to-multiple-of", "64" if self.gpu else "8", "--max-steps", str(plan["steps"]),
               "--log-every", str(plan["log_every"]), "--eval-fraction", "0.02", "--eval-generations", "0",
               "--no-final-checkpoint", "--lr", "1e-5", "--epochs", "100", "--peak-tflops", f"{self.peak:.4f}",
               "--tracking-uri", f"sqlite:///{self.db}", "--experiment", "gpu-perf", "--run-name", slug, *extra]
        if not self.fused_adam:
            cmd.append("--torch-adam")
        row.note = " ".join(extra)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
               "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        if profile:
            last = max(2, plan["steps"] - plan["log_every"])
            env["BENCH_PROFILE"] = f"{max(2, last - 3)}:{last}:{self.logs / ('profile-' + slug)}"
            row.note += " (profiled: steps " + env["BENCH_PROFILE"].rsplit(":", 1)[0] + ")"
        start = time.monotonic()
        timeout = min(self.args.timeout, remaining(self.args.deadline) - 10)
        try:
            if timeout < 30:
                raise TimeoutError("skipped: --deadline reached")
            with (self.logs / f"{slug}.log").open("w") as log:
                log.write("$ " + " ".join(cmd) + "\n")
                log.flush()
                proc = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=timeout)
            if proc.returncode:
                raise RuntimeError(f"exit {proc.returncode} (logs/{slug}.log)")
            client = mlflow.MlflowClient(f"sqlite:///{self.db}")
            runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                                      filter_string=f"tags.mlflow.runName = '{slug}'")
            metrics = {k: [m.value for m in sorted(client.get_metric_history(runs[0].info.run_id, k),
                                                   key=lambda m: m.step)] for k in runs[0].data.metrics}

            def steady(key):  # the first window holds the warm-up (allocator, kernels' first calls)
                values = metrics.get(key, [])[1:] or metrics.get(key, [])
                return statistics.median(values) if values else math.nan

            params, tags = runs[0].data.params, runs[0].data.tags
            row.note += (f" [ZeRO {params.get('deepspeed.zero_stage_resolved', params.get('deepspeed.zero_stage'))}, "
                         f"attention {tags.get('attention', '?')}]")
            row.tokens_per_s = steady("perf/tokens_per_s")
            row.tflops = steady("perf/model_tflops_per_s")
            row.mfu = row.tflops / self.peak if self.peak else math.nan
            key = "mem/device_peak_allocated_gib_max" if self.gpu else "mem/host_peak_rss_gib_max"
            row.peak_mem_gib = max(metrics.get(key, [math.nan]))
        except Exception as exc:  # the row says why; the others still run
            row.error = f"{type(exc).__name__}: {exc}"[:300]
        finally:
            shutil.rmtree(out, ignore_errors=True)
        row.seconds = time.monotonic() - start
        return row


# ---------------------------------------------------------------------------
# Output


def fmt(x: float, digits: int = 1) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:,.{digits}f}"


def table(result: dict) -> str:
    info, lines = result["info"], []
    lines.append(f"Device: {info['device']} | torch {info['torch']} | DeepSpeed {info['deepspeed']} | "
                 f"transformers {info['transformers']} | {result['date']}")
    lines.append(f"Command: `{result['command']}`")
    lines.append(f"Square bf16 matmul peak (the MFU denominator): {fmt(result['peak_tflops'])} TFLOP/s\n")
    if result["gemms"]:
        lines.append("| GEMM | m x k x n | TFLOP/s |\n|---|---|---|")
        lines += [f"| {g['gemm']} | {g['m']} x {g['k']} x {g['n']} | {fmt(g['tflops'])} |" for g in result["gemms"]]
        lines.append("")
    if result["attention"]:
        lines.append("| attention (B x H x L x D) | padding mask | kernels that accept it | fwd+bwd ms | TFLOP/s |")
        lines.append("|---|---|---|---|---|")
        lines += [f"| {a['attention']} | {'yes' if a['mask'] else 'no (causal)'} | {', '.join(a['backends'])} | "
                  f"{fmt(a['fwd_bwd_ms'], 2)} | {fmt(a['tflops'])} |" for a in result["attention"]]
        lines.append("")
    if result.get("rollouts"):
        lines.append("| rollout | prompts | prompt + new tokens | generated tokens/s | ms per token |\n|---|---|---|---|---|")
        lines += [f"| {r['rollout']} | {r['batch']} | {r['prompt_len']} + {r['new_tokens']} | {fmt(r['tokens_per_s'], 0)} | "
                  f"{fmt(r['ms_per_token'], 2)} |" for r in result["rollouts"]]
        lines.append("")
    lines.append("| row | shape | tokens/s | model TFLOP/s | MFU | / ceiling | / AMP ceiling | peak mem GiB | s | "
                 "options / note |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|")
    for r in result["rows"]:
        note = r["error"] or r["note"]
        lines.append(f"| {r['name']} | {r['shape']} | {fmt(r['tokens_per_s'], 0)} | {fmt(r['tflops'])} | "
                     f"{fmt(100 * r['mfu'])}% | {fmt(r['vs_ceiling'], 2)} | {fmt(r['vs_amp'], 2)} | {fmt(r['peak_mem_gib'], 2)} | "
                     f"{fmt(r['seconds'], 0)} | {note} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(PLANS), default=None, help="full on a GPU, tiny on the CPU (default)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "gpu-perf")
    parser.add_argument("--work", type=Path, default=None, help="scratch dir (default: a temporary one)")
    parser.add_argument("--wheels", type=Path, action="append", default=None, help="dir of wheels to install from")
    parser.add_argument("--deadline", type=float, default=0, help="seconds for everything; late rows are skipped")
    parser.add_argument("--timeout", type=float, default=240, help="seconds per forgepipe run")
    parser.add_argument("--rows", default="", help="comma-separated indices of FORGEPIPE_ROWS to run (default all)")
    parser.add_argument("--parts", default="gemm,attention,rollout,ceiling,forgepipe", help="which parts to run")
    parser.add_argument("--profile", action="store_true",
                        help="torch.profiler tables of the first forgepipe row and of the bf16 ceiling (in logs.tgz)")
    args = parser.parse_args(argv)

    gpu_check.ensure_packages(args.wheels or [REPO / ".whl", REPO / "bench" / "wheels"],
                              Path(tempfile.gettempdir()) / "forgepipe-gpu-check-site")
    sys.path.insert(0, str(REPO))
    import torch
    import transformers

    transformers.utils.logging.disable_progress_bar()
    gpu = torch.cuda.is_available()
    device = "cuda" if gpu else "cpu"
    size = args.size or ("full" if gpu else "tiny")
    plan = PLANS[size]
    shape, small = SHAPES[plan["model"]], SHAPES[plan["small"]]
    args.out.mkdir(parents=True, exist_ok=True)
    work = args.work or Path(tempfile.mkdtemp(prefix="forgepipe-gpu-perf-"))
    work.mkdir(parents=True, exist_ok=True)
    build = gpu_check.start_op_build(gpu)  # DeepSpeed's fused Adam JIT-builds while the GPU measures

    result = {"info": gpu_check.device_summary(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "command": "python3 bench/gpu_perf.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "size": size, "peak_tflops": math.nan, "gemms": [], "attention": [], "rows": []}

    parts = set(args.parts.split(","))
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)

    def write() -> str:
        text = table(result)
        (args.out / "gpu_perf.md").write_text(text)
        (args.out / "gpu_perf.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
        # every log and profile in one file: a device call brings back a few files only
        subprocess.run(["tar", "-czf", str(args.out / "logs.tgz"), "-C", str(work), "logs"], check=False)
        return text

    tokens = plan["batch"] * plan["seq"]
    result["gemms"] = gemm_table(shape, tokens, device) if "gemm" in parts else []
    peak = result["peak_tflops"] = (result["gemms"][0]["tflops"] if result["gemms"]
                                    else gpu_check.measure_peak_tflops(device))
    print(f"gpu-perf: {result['info']['device']}, square bf16 peak {fmt(peak)} TFLOP/s", flush=True)
    write()
    heads = shape["num_attention_heads"]
    d = shape["hidden_size"] // heads
    pad = d + (-d % 8)
    result["attention"] = [] if "attention" not in parts else attention_table(
        [(f"{plan['model']} {plan['batch']} x {heads} x {plan['seq']} x {d}", plan["batch"], heads, plan["seq"], d),
         (f"padded {plan['batch']} x {heads} x {plan['seq']} x {pad}", plan["batch"], heads, plan["seq"], pad),
         (f"{plan['small']} {plan['batch']} x {small['num_attention_heads']} x {plan['small_seq']} x "
          f"{small['hidden_size'] // small['num_attention_heads']}", plan["batch"], small["num_attention_heads"],
          plan["small_seq"], small["hidden_size"] // small["num_attention_heads"])], device)
    write()

    if "rollout" in parts:  # PPO's sampler on the 350M actor shape of gpu_check
        plan_r = dict(batches=(4, 64), prompt=128, new=128) if gpu else dict(batches=(2,), prompt=8, new=8)
        try:
            result["rollouts"] = rollout_table(SHAPES["neox-350m" if gpu else plan["model"]], plan_r["batches"],
                                               plan_r["prompt"], plan_r["new"], device)
        except Exception as exc:
            result["rollouts"] = [{"rollout": f"error: {type(exc).__name__}: {exc}"[:300], "batch": 0, "prompt_len": 0,
                                   "new_tokens": 0, "tokens_per_s": math.nan, "ms_per_token": math.nan}]
        gc.collect()
        write()

    ceilings, ceiling_rows = {}, []
    variants = {"model": [("auto", False), ("auto", True), ("sdpa", False)], "small": [("sdpa", False)]}
    for key, shp, seq in (("model", shape, plan["seq"]), ("small", small, plan["small_seq"])):
        for attn, amp in variants[key] if "ceiling" in parts else []:
            label = f"ceiling {plan[key]} plain PyTorch, {attn}{' AMP' if amp else ''}"
            profile = logs / f"profile-ceiling-{key}.txt" if args.profile and attn == "auto" and not amp else None
            try:
                row = ceiling_row(label, shp, plan["batch"], seq, attn, device, peak, amp=amp, profile=profile)
                gc.collect()
                if gpu:
                    torch.cuda.empty_cache()
            except Exception as exc:
                row = Row(label, "ceiling", f"{plan['batch']}x{seq}", error=f"{type(exc).__name__}: {exc}"[:300])
            ceiling_rows.append((key, row))
            if not row.error:
                ceilings[key] = max(ceilings.get(key, 0.0), row.tokens_per_s)
                if amp:
                    ceilings[key + "-amp"] = row.tokens_per_s
            result["rows"].append(asdict(row))
            for k, r in ceiling_rows:  # each ceiling against the fastest of its shape so far
                r.vs_ceiling = r.tokens_per_s / ceilings[k] if not r.error else math.nan
            result["rows"][-len(ceiling_rows):] = [asdict(r) for _, r in ceiling_rows]
            print(f"gpu-perf: {label}: {fmt(row.tokens_per_s, 0)} tokens/s {row.error}", flush=True)
            write()

    build_error = gpu_check.finish_op_build(build)
    gpu_check.make_model(work / "models" / plan["model"], plan["model"])
    models = {"model": work / "models" / plan["model"]}
    if plan["small"] != plan["model"]:
        gpu_check.SHAPES.setdefault(plan["small"], small)
        gpu_check.make_model(work / "models" / plan["small"], plan["small"])
    models["small"] = work / "models" / plan["small"]
    data = {"model": gpu_check.make_data(work / "long.jsonl", rows=200, words=plan["words"]),
            "small": gpu_check.make_data(work / "short.jsonl", rows=400, words=plan["small_words"])}
    runner = Runner(args, work, peak, gpu)
    if build_error:
        runner.fused_adam = False
        result["note"] = f"DeepSpeed's fused Adam did not build (rows use --torch-adam): {build_error}"
    wanted = [int(i) for i in args.rows.split(",") if i.strip()] or list(range(len(FORGEPIPE_ROWS)))
    for n, i in enumerate(wanted if "forgepipe" in parts else []):  # in the order given
        name, stage, key, extra = FORGEPIPE_ROWS[i]
        seq = plan["seq"] if key == "model" else plan["small_seq"]
        row = runner.run(name, stage, models[key], data[key], seq, plan, extra, profile=args.profile and n == 0)
        if ceilings.get(key) and not row.error and stage == "sft":
            row.vs_ceiling = row.tokens_per_s / ceilings[key]
            row.vs_amp = row.tokens_per_s / ceilings.get(key + "-amp", math.nan)
        result["rows"].append(asdict(row))
        print(f"gpu-perf: {name}: {fmt(row.tokens_per_s, 0)} tokens/s, MFU {fmt(100 * row.mfu)}% "
              f"({row.seconds:.0f} s) {row.error}", flush=True)
        write()
    print("\n" + write())
    return 0 if all(not r["error"] or r["error"].startswith("TimeoutError: skipped") for r in result["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())

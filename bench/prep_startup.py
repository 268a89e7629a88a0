"""Data preparation (raw JSONL to training tensors) and start-up, forgepipe against DeepSpeed-Chat.

    .venv/bin/python bench/prep_startup.py --write        # ~3 min on 2 cores; table into bench/RESULTS.md

Data preparation, per stage (SFT rows, reward pairs), on the shared HH sample:
  forgepipe       load + normalise + split (load_stage_data), batched tokenization (tokenize_sft /
                  tokenize_pairs) into a fresh cache ("cold"), then again with that cache ("warm"),
                  then collation of every micro-batch (the tensors the loop copies to the device)
  DeepSpeed-Chat  create_dataset: per-sample tokenizer calls padded to max length (its only
                  path; its warm path, a torch.load of the result, is timed too)
Start-up: seconds from the command to the end of the imports a training run needs (torch,
transformers, DeepSpeed), to a loaded model, and forgepipe's answer to bad input (a missing
file; a file of no known format) with its exit status.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
from compare import BENCH_ENV, HH, machine, read_pairs, write_data, write_results  # noqa: E402

FORGEPIPE_PREP = r"""
import json, sys, tempfile, time
t0 = time.perf_counter()
from forgepipe.data import load_stage_data
from forgepipe.data.collate import PairCollator, SFTCollator
from forgepipe.data.tokenize import tokenize_pairs, tokenize_sft
from forgepipe.models.load import load_tokenizer
imports = time.perf_counter() - t0
data, model, max_len = sys.argv[1:4]
tokenizer = load_tokenizer(model)
out = {"imports_s": imports}
for stage in ("sft", "reward"):
    with tempfile.TemporaryDirectory() as cache:
        for state in ("cold", "warm"):
            t = time.perf_counter()
            train, _ = load_stage_data([data], stage, "1,1,0", 1234, 0.0)
            if stage == "sft":
                rows, collate = tokenize_sft(train, tokenizer, int(max_len), int(max_len), cache), SFTCollator(0)
            else:
                rows, _ = tokenize_pairs(train, tokenizer, int(max_len), int(max_len), cache)
                collate = PairCollator(0)
            batches = [collate([rows[j] for j in range(i, min(i + 4, len(rows)))]) for i in range(0, len(rows), 4)]
            out[f"{stage}_{state}_s"] = time.perf_counter() - t
            out[f"{stage}_rows"] = len(train)
        if stage == "sft":  # the share of computed tokens that are real, over one epoch, micro-batch 4
            from forgepipe.data.collate import length_grouped_order, pack_sequences, padding_stats, sample_lengths
            from forgepipe.loop import epoch_order, rank_batches
            lengths = sample_lengths(rows)
            for name, order in (("shuffled", epoch_order(len(rows), 1234, 0)),
                                ("grouped", length_grouped_order(lengths, 4, 1234, 0))):
                real, computed = padding_stats(rank_batches(order, 0, 1, 4, 1), lengths)
                out[f"real_share_{name}"] = real / computed
            real, computed = padding_stats(rank_batches(epoch_order(len(rows), 1234, 0), 0, 1, 4, 1), lengths,
                                           pad_to=int(max_len))
            out["real_share_pad_to_max"] = real / computed
            packed = pack_sequences(rows, int(max_len))
            plen = sample_lengths(packed)
            real, computed = padding_stats(rank_batches(epoch_order(len(packed), 1234, 0), 0, 1, 4, 1), plen)
            out["real_share_packed"] = real / computed
print("RESULT " + json.dumps(out))
"""

DSCHAT_PREP = r"""
import json, os, sys, tempfile, time
t0 = time.perf_counter()
import torch
from dschat.utils.data.data_utils import create_dataset
from dschat.utils.utils import load_hf_tokenizer
imports = time.perf_counter() - t0
data, model, max_len = sys.argv[1:4]
tokenizer = load_hf_tokenizer(model, fast_tokenizer=True)
out = {"imports_s": imports}
for stage, phase, split in (("sft", 1, "1,1,0"), ("reward", 2, "1,1,0")):
    with tempfile.TemporaryDirectory() as cache:
        t = time.perf_counter()
        train, _ = create_dataset(0, data, split, cache, phase, 1234, tokenizer, tokenizer.eos_token, int(max_len), True)
        out[f"{stage}_cold_s"] = time.perf_counter() - t
        out[f"{stage}_rows"] = len(train)
        torch.save(train, f"{cache}/train.pt")
        t = time.perf_counter()
        torch.load(f"{cache}/train.pt", weights_only=False)
        out[f"{stage}_warm_s"] = time.perf_counter() - t
print("RESULT " + json.dumps(out))
"""

BASELINE = r"""
import sys, time
t0 = time.perf_counter()
import torch, transformers, deepspeed
t1 = time.perf_counter()
transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1])
print(f"RESULT {{\"imports_s\": {t1 - t0}, \"load_s\": {time.perf_counter() - t1}}}")
"""


def python_result(python: str, code: str, args: list[str], env: dict[str, str]) -> dict:
    start = time.monotonic()
    proc = subprocess.run([python, "-c", code, *args], capture_output=True, text=True, env=env)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if line is None:
        raise SystemExit(f"{python} failed:\n{proc.stderr[-3000:]}")
    return {**json.loads(line[7:]), "process_s": time.monotonic() - start}


def bad_input(model: Path, work: Path, env: dict[str, str]) -> dict[str, tuple[float, int]]:
    """Seconds and exit status of forgepipe's answer to a missing file and to a file of no known format."""
    bogus = work / "bogus.jsonl"
    bogus.write_text('{"question": "q", "answer": "a"}\n' * 10)
    out = {}
    for name, data in (("missing file", work / "missing.jsonl"), ("unknown format", bogus)):
        start = time.monotonic()
        proc = subprocess.run([sys.executable, "-m", "forgepipe.cli", "sft", "--model", str(model), "--data", str(data),
                               "--output-dir", str(work / f"out-{len(out)}")], capture_output=True, text=True, env=env)
        out[name] = (time.monotonic() - start, proc.returncode, (proc.stderr.strip().splitlines() or [""])[-1][:120])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=BENCH_ENV / "models" / "smollm2-135m")
    parser.add_argument("--max-len", type=int, default=256)
    parser.add_argument("--write", action="store_true")
    a = parser.parse_args()
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join([os.environ.get("BENCH_FORGEPIPE_SRC", str(REPO)), str(BENCH_ENV / "dschat")])}
    load = [os.getloadavg()[0]]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        pairs = read_pairs(HH)
        data = write_data(pairs, work / "data")  # DeepSpeed-Chat needs a test split: 8 rows
        fp = python_result(sys.executable, FORGEPIPE_PREP, [str(data["pairs"]), str(a.model), str(a.max_len)], env)
        load.append(os.getloadavg()[0])
        bench_py = str(BENCH_ENV / "venv" / "bin" / "python")
        ds = (python_result(bench_py, DSCHAT_PREP, [str(data["dschat"]), str(a.model), str(a.max_len)], env)
              if (BENCH_ENV / "dschat").exists() else None)
        load.append(os.getloadavg()[0])
        base = python_result(sys.executable, BASELINE, [str(a.model)], env)
        bad = bad_input(a.model, work, env)
        load.append(os.getloadavg()[0])
    lines = [f"## Data preparation and start-up ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})", "",
             f"    python bench/prep_startup.py {' '.join(sys.argv[1:])}", "",
             f"Machine: {machine()}. HH sample, {len(pairs)} pairs, max length {a.max_len}, SmolLM2-135M tokenizer. "
             f"Load average (1 min): {min(load):.2f}-{max(load):.2f}.", "",
             "| stage | contender | rows | cold s | cold rows/s | warm s | warm rows/s | forgepipe / this (cold) |",
             "|---|---|---|---|---|---|---|---|"]
    for stage in ("sft", "reward"):
        for name, r in (("forgepipe", fp), ("DeepSpeed-Chat", ds)):
            if r is None:
                continue
            n = r[f"{stage}_rows"]
            ratio = (n / fp[f"{stage}_cold_s"]) / (r[f"{stage}_rows"] / r[f"{stage}_cold_s"])
            lines.append(f"| {stage} | {name} | {n} | {r[f'{stage}_cold_s']:.2f} | {n / r[f'{stage}_cold_s']:.0f} "
                         f"| {r[f'{stage}_warm_s']:.2f} | {n / r[f'{stage}_warm_s']:.0f} | {ratio:.1f}x |")
    lines += ["", "Share of computed tokens that are real (SFT, one epoch, micro-batch 4, forgepipe's tokenization): "
              + ", ".join(f"{k.removeprefix('real_share_').replace('_', '-')} {v:.0%}"
                          for k, v in fp.items() if k.startswith("real_share_")) + ".",
              "", "forgepipe's times include reading and normalising the JSONL and collating every micro-batch; "
              "DeepSpeed-Chat's start from a loaded DatasetDict and end at its padded tensors.", "",
              "| start-up | seconds |", "|---|---|",
              f"| import torch + transformers + DeepSpeed | {base['imports_s']:.1f} |",
              f"| load the model (from_pretrained) | {base['load_s']:.1f} |",
              f"| forgepipe data modules import (prep process) | {fp['imports_s']:.1f} |"]
    for name, (seconds, code, message) in bad.items():
        lines.append(f"| forgepipe bad input: {name} (exit {code}: `{message.replace('|', '/')}`) | {seconds:.1f} |")
    lines.append("")
    section = "\n".join(lines)
    print(section)
    if a.write:
        write_results(section, marker="prep")


if __name__ == "__main__":
    main()

"""SFT's loss with the LM head on every position (transformers' `labels=` loss) against forgepipe's,
which runs it only where a labelled token is predicted (`predicted_positions` + `logits_to_keep`).

    python bench/sft_loss.py [--model DIR] [--max-len 256] [--batch 4] [--batches 12] [--rounds 3]

The same batches of the HH sample (forgepipe's SFT tokenization, shuffled order), forward + backward
of the plain model (no DeepSpeed, no optimizer: the part of a step the lever changes), the two paths
alternating batch by batch, `--rounds` passes; prints the medians per batch and the loss of each
path (they must agree). The model default is the benchmark environment's SmolLM2-135M.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
BENCH_ENV = Path(os.environ.get("BENCH_ENV", "/work/bench-env"))
HH = REPO.parent / "shared" / "data" / "hh-rlhf-harmless-sample.jsonl.gz"


def main() -> None:
    from transformers import AutoModelForCausalLM

    from forgepipe.data import load_stage_data
    from forgepipe.data.collate import SFTCollator
    from forgepipe.data.tokenize import tokenize_sft
    from forgepipe.loop import epoch_order
    from forgepipe.models.load import load_tokenizer
    from forgepipe.stages.sft import lm_loss, model_inputs

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, default=BENCH_ENV / "models" / "smollm2-135m")
    p.add_argument("--data", type=Path, default=HH)
    p.add_argument("--max-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--batches", type=int, default=12)
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args()

    tok = load_tokenizer(str(a.model), chat_template="none")
    rows, _ = load_stage_data([str(a.data)], "sft", "1,0,0", 1234, 0.0)
    with tempfile.TemporaryDirectory() as cache:
        data = tokenize_sft(rows, tok, a.max_len, a.max_len // 2, cache)
        order = epoch_order(len(data), 1234, 0)
        collate = SFTCollator(tok.pad_token_id)
        batches = [collate([data[i] for i in order[k * a.batch:(k + 1) * a.batch]]) for k in range(a.batches)]
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
    model.resize_token_embeddings(len(tok), pad_to_multiple_of=64, mean_resizing=False)
    model.train()

    def every_position(batch):
        return model(**model_inputs(batch), labels=batch["labels"]).loss

    def labelled_positions(batch):
        return lm_loss(model, batch)[0]

    paths = {"every position (labels=)": every_position, "labelled positions only": labelled_positions}
    times: dict[str, list[float]] = {name: [] for name in paths}
    losses: dict[str, list[float]] = {name: [] for name in paths}
    for r in range(a.rounds):
        for batch in batches:
            for name, fn in paths.items():
                model.zero_grad(set_to_none=True)
                start = time.perf_counter()
                loss = fn(batch)
                loss.backward()
                times[name].append(time.perf_counter() - start)
                if r == 0:
                    losses[name].append(float(loss.detach()))
    labelled = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
    computed = sum(b["input_ids"].numel() for b in batches)
    kept = sum(b["predict_positions"].numel() for b in batches)
    print(f"{a.model.name}, {a.batches} batches of {a.batch} x <= {a.max_len} tokens, {a.rounds} rounds, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads; positions: {computed} computed, "
          f"{kept} through the LM head with the lever, {labelled} labelled")
    print("| loss path | median s per batch (forward + backward) | mean loss |")
    print("|---|---|---|")
    for name in paths:
        print(f"| {name} | {statistics.median(times[name]):.3f} | {statistics.mean(losses[name]):.5f} |")
    base, lever = (statistics.median(times[n]) for n in paths)
    print(f"\nlabelled-only / every-position time: {lever / base:.2f}")
    gap = max(abs(x - y) for x, y in zip(*losses.values(), strict=True))
    if gap > 1e-4:
        sys.exit(f"the two paths' losses differ by {gap}")


if __name__ == "__main__":
    main()

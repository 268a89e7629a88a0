"""--tokens-per-micro-batch: micro-batches cut by padded tokens, every sample once, seeded, the same plan
at any world size, and the loop's step count known before it runs."""

from __future__ import annotations

import random

import pytest
import torch

from forgepipe import distributed
from forgepipe.config import build_config
from forgepipe.data.collate import SFTCollator, token_budget_batches
from forgepipe.deepspeed_config import build_ds_config
from forgepipe.distributed import World
from forgepipe.engine import initialize
from forgepipe.errors import ForgeError
from forgepipe.loop import LoopSettings, LoopState, deal, epoch_micro_batches, total_steps, train_loop
from forgepipe.stages.sft import lm_loss
from forgepipe.tracking import Tracker


def lengths(n=300, seed=0):
    rng = random.Random(seed)
    return [rng.choice([rng.randint(8, 40), rng.randint(100, 200)]) for _ in range(n)]


def padded(batch, lens, multiple=1, rows=1):
    return rows * len(batch) * max(-(-lens[i] // multiple) * multiple for i in batch)


@pytest.mark.parametrize(("budget", "multiple", "rows"), [(400, 1, 1), (512, 64, 1), (800, 8, 2)])
def test_every_sample_once_and_no_batch_over_budget(budget, multiple, rows):
    lens = lengths()
    plan = token_budget_batches(lens, budget, seed=3, epoch=0, rows=rows, multiple=multiple)
    assert sorted(i for b in plan for i in b) == list(range(len(lens)))
    assert all(padded(b, lens, multiple, rows) <= budget for b in plan)
    # Greedy: no batch could have taken the next sample of its window (most batches are nearly full).
    fill = sum(padded(b, lens, multiple, rows) for b in plan) / (len(plan) * budget)
    assert fill > 0.75


def test_short_rows_share_a_batch_long_rows_do_not():
    lens = [10] * 40 + [190] * 40
    plan = token_budget_batches(lens, 400, seed=0, epoch=0)
    sizes = {max(lens[i] for i in b): len(b) for b in plan}
    assert sizes[10] == 40 and sizes[190] == 2  # 40 x 10 = 400; 2 x 190 = 380


def test_the_plan_is_seeded_and_changes_by_epoch():
    lens = lengths()
    assert token_budget_batches(lens, 400, 3, 0) == token_budget_batches(lens, 400, 3, 0)
    assert token_budget_batches(lens, 400, 3, 0) != token_budget_batches(lens, 400, 3, 1)
    assert token_budget_batches(lens, 400, 3, 0) != token_budget_batches(lens, 400, 4, 0)


def test_dealing_gives_every_rank_whole_steps_of_the_same_global_plan():
    plan = [[i] for i in range(23)]
    shares = [deal(plan, r, 3, 2) for r in range(3)]
    assert [len(s) for s in shares] == [6, 6, 6]  # 23 // (3 x 2) = 3 steps of 2 micro-batches
    assert [b for step in zip(*shares, strict=True) for b in step] == plan[:18]  # batch i*W + r


def test_total_steps_counts_every_epochs_own_plan():
    class Data(list):
        column_names = ["input_ids"]

        def __getitem__(self, key):
            return [[0] * n for n in self.lens] if key == "input_ids" else list.__getitem__(self, key)

    data = Data(range(300))
    data.lens = lengths()
    s = LoopSettings(epochs=3, max_steps=0, micro_batch=4, grad_accum=2, seed=3, log_every=1, eval_every=0,
                     save_every=0, save_every_minutes=0, keep_last=1, tokens_per_micro_batch=400)
    expected = sum(len(token_budget_batches(data.lens, 400, 3, e)) // (2 * 2) for e in range(3))
    assert total_steps(data, 2, s) == expected
    world = World(rank=1, world_size=2, local_world_size=2)
    assert len(epoch_micro_batches(300, data.lens, s, world, 1)) == \
        2 * (len(token_budget_batches(data.lens, 400, 3, 1)) // 4)
    s.max_steps = 5
    assert total_steps(data, 2, s) == 5


def test_a_budget_that_holds_no_sample_is_refused_before_anything_starts():
    with pytest.raises(ForgeError, match=r"^--tokens-per-micro-batch: 600 tokens hold no reward sample of --max-seq-len "
                                         r"512 \(a pair: two rows\): at least 1024$"):
        build_config("reward", overrides={"train.tokens_per_micro_batch": 600, "data.max_seq_len": 512})
    build_config("sft", overrides={"train.tokens_per_micro_batch": 512, "data.max_seq_len": 512})


def test_the_loop_runs_token_batches_through_a_real_engine(tmp_path):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    world = distributed.init_distributed(World())
    try:
        cfg = build_config("sft", overrides={"deepspeed.zero_stage": 1, "deepspeed.torch_adam": True,
                                             "train.tokens_per_micro_batch": 64, "data.max_seq_len": 32})
        torch.manual_seed(0)
        model = GPTNeoXForCausalLM._from_config(GPTNeoXConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2,
                                                              intermediate_size=64, vocab_size=97))
        rows = [{"input_ids": list(range(1, n + 1)), "labels": [-100] + list(range(2, n + 1))}
                for n in [4] * 24 + [30] * 8]
        s = LoopSettings.from_config(cfg)
        s.max_steps, s.log_every = 0, 1000
        steps = total_steps(rows_dataset(rows), 1, s)
        engine = initialize(model, build_ds_config(cfg, world), total_steps=steps)
        seen = []
        collate = SFTCollator(0)

        def recording(features):
            seen.append(len(features))
            return collate(features)

        state = train_loop(engine=engine, train_data=rows_dataset(rows), collate=recording, loss_fn=lm_loss,
                           evaluate=None, settings=s, world=world, tracker=Tracker(False), output_dir=str(tmp_path),
                           state=LoopState())
    finally:
        distributed.teardown()
    assert state.step == steps == len(seen)
    assert sorted(seen) == sorted(len(b) for b in token_budget_batches([4] * 24 + [30] * 8, 64, cfg.train.seed, 0))
    assert max(seen) == 16 and min(seen) == 2  # 16 rows of 4 tokens, 2 of 30
    assert state.samples_seen == 32


def rows_dataset(rows):
    import datasets

    return datasets.Dataset.from_list(rows)

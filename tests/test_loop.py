"""The loop's pure parts: LR schedule, data order, rank sharding, evaluation sharding."""

from __future__ import annotations

import pytest

from forgepipe.config import build_config
from forgepipe.distributed import World
from forgepipe.engine import lr_factor
from forgepipe.errors import ForgeError
from forgepipe.loop import (
    LoopSettings,
    MetricWindow,
    check_grad_norm,
    checkpoint_due,
    epoch_micro_batches,
    epoch_order,
    eval_batches,
    micro_batches_per_rank,
    rank_batches,
    total_steps,
)


def test_lr_warmup_then_cosine():
    # warm-up of 4 steps: (s+1)/4; then cosine from 1 to 0.1 over the remaining 6.
    assert [lr_factor(s, 10, 4, 0.1) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_factor(4, 10, 4, 0.1) == pytest.approx(1.0)
    # step 7: progress (7-4)/6 = 0.5, cos(pi/2) = 0 -> 0.1 + 0.9 * 0.5 = 0.55
    assert lr_factor(7, 10, 4, 0.1) == pytest.approx(0.55)
    assert lr_factor(10, 10, 4, 0.1) == pytest.approx(0.1)
    # no warm-up, min 0: step 3 of 10 -> 0.5 * (1 + cos(0.3 pi)) = 0.793893
    assert lr_factor(3, 10, 0, 0.0) == pytest.approx(0.793893, abs=1e-6)


def test_epoch_order_is_a_pure_function_of_seed_and_epoch():
    assert epoch_order(50, 1, 0) == epoch_order(50, 1, 0)
    assert epoch_order(50, 1, 0) != epoch_order(50, 1, 1)
    assert epoch_order(50, 1, 0) != epoch_order(50, 2, 0)
    assert sorted(epoch_order(50, 1, 3)) == list(range(50))


def test_rank_batches_partition_whole_steps():
    order = list(range(23))
    # 2 ranks x micro 2 x accum 2 = 8 samples a step -> 2 steps (16 samples), 4 micro-batches a rank.
    assert micro_batches_per_rank(23, 2, 2, 2) == 4
    r0 = rank_batches(order, 0, 2, 2, 2)
    r1 = rank_batches(order, 1, 2, 2, 2)
    assert r0 == [[0, 1], [4, 5], [8, 9], [12, 13]]
    assert r1 == [[2, 3], [6, 7], [10, 11], [14, 15]]
    assert not set(sum(r0, [])) & set(sum(r1, []))


def test_eval_batches_cover_once_with_equal_counts():
    n, world, b = 5, 2, 2
    shards = [eval_batches(n, r, world, b) for r in range(world)]
    assert len(shards[0]) == len(shards[1]) == 2
    seen = [i for shard in shards for idx, w in shard if w for i in idx]
    assert sorted(seen) == list(range(n))
    assert shards[1][-1] == ([0], 0.0)  # rank 1 has nothing left: a weightless filler batch


def test_total_steps_caps_at_max_steps():
    s = LoopSettings(epochs=3, max_steps=0, micro_batch=2, grad_accum=1, seed=0, log_every=1, eval_every=0,
                     save_every=0, save_every_minutes=0, keep_last=1)
    assert total_steps(range(20), 2, s) == 15  # the training data (its length; its lengths with a token budget)
    s.max_steps = 4
    assert total_steps(range(20), 2, s) == 4


def test_checkpoint_due_by_steps_and_by_time():
    assert checkpoint_due(10, 5, 0, 0.0) and not checkpoint_due(11, 5, 0, 1e9)
    assert checkpoint_due(11, 0, 2.0, 120.0) and not checkpoint_due(11, 0, 2.0, 119.0)
    assert not checkpoint_due(10, 0, 0, 1e9)  # both off


def test_group_by_length_gives_like_lengths_per_global_micro_batch_deterministically():
    cfg = build_config("sft", overrides={"data.group_by_length": True, "train.per_device_batch_size": 2,
                                         "train.seed": 7})
    s = LoopSettings.from_config(cfg)
    assert s.group_by_length
    lengths = [5, 400, 7, 390, 6, 410, 8, 380] * 8  # short and long samples interleaved
    worlds = [World(rank=r, world_size=2, local_world_size=2) for r in range(2)]

    def global_batches(lens, epoch):
        per_rank = [epoch_micro_batches(len(lengths), lens, s, w, epoch) for w in worlds]
        return [a + b for a, b in zip(*per_rank, strict=True)]  # ranks' slices of each global micro-batch

    grouped = global_batches(lengths, 0)
    assert sorted(i for b in grouped for i in b) == list(range(len(lengths)))  # every sample once
    assert all(max(lengths[i] for i in b) - min(lengths[i] for i in b) < 50 for b in grouped)
    assert grouped == global_batches(lengths, 0)  # a pure function of seed and epoch: resumable
    assert grouped != global_batches(lengths, 1)
    shuffled = global_batches(None, 0)  # without grouping: the plain seeded shuffle mixes lengths
    assert any(max(lengths[i] for i in b) - min(lengths[i] for i in b) > 300 for b in shuffled)


@pytest.mark.parametrize("final, expected", [(True, [2, 4]), (False, [2])])
def test_the_final_checkpoint_is_written_only_when_asked(final, expected):
    """--no-final-checkpoint: the checkpoints along the way are written, the end-of-run one is not."""
    from forgepipe.loop import LoopState, drive

    state, saved = LoopState(), []
    s = LoopSettings(epochs=1, max_steps=4, micro_batch=1, grad_accum=1, seed=0, log_every=1, eval_every=0,
                     save_every=2, save_every_minutes=0.0, keep_last=2, final_checkpoint=final)
    drive(state=state, total=4, units=lambda epoch: list(range(8)), run_unit=lambda unit: True, log=lambda step: {},
          evaluate=None, checkpoint=lambda: saved.append(state.step), settings=s, stop=None, world=World(), desc="t")
    assert state.step == 4 and saved == expected


def test_the_window_averages_the_gradient_norm_per_optimizer_step():
    import torch

    window = MetricWindow(torch.device("cpu"))
    for loss, norm in ((2.0, 1.0), (4.0, None), (6.0, torch.tensor(3.0))):  # None: no norm computed
        window.add({"loss": torch.tensor(loss)}, samples=4, tokens=10)
        window.add_step(norm)
    means, samples, tokens, _ = window.reduce()
    assert means == {"loss": 4.0, "grad_norm": 2.0} and (samples, tokens) == (12, 30)
    assert "grad_norm" not in MetricWindow(torch.device("cpu")).reduce()[0]  # no step, no norm


@pytest.mark.parametrize("norm", [float("inf"), float("nan")])
def test_a_non_finite_gradient_norm_stops_the_run_in_one_line(norm):
    check_grad_norm(2.5, step=7)
    check_grad_norm(None, step=7)
    with pytest.raises(ForgeError, match=r"gradient norm is (inf|nan) in the steps up to 7: training diverged"):
        check_grad_norm(norm, step=7)


@pytest.mark.parametrize("dtype, check, guarded", [("fp32", False, False), ("bf16", False, True),
                                                   ("bf16", True, False), ("fp16", False, False)])
def test_the_guard_is_on_where_deepspeed_does_not_skip_bad_steps(dtype, check, guarded):
    cfg = build_config("sft", None, {"train.dtype": dtype, "deepspeed.check_grad_overflow": check})
    assert LoopSettings.from_config(cfg).guard_grad_norm is guarded

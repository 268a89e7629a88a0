"""Deterministic per-stage shares of a source, DeepSpeed-Chat style (`--data-split 2,4,4`).

Each source is shuffled once with the run seed and cut into three contiguous blocks, one per
stage (sft, reward, ppo), so the three stages never see the same rows and every rank and every
rerun computes the same cut.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def share_bounds(n: int, split: Sequence[float]) -> list[int]:
    """Block ends [e0, e1, n] for n rows cut by (un)normalised shares; cumulative rounding."""
    shares = np.asarray(split, dtype=np.float64)
    cumulative = np.cumsum(shares / shares.sum())
    ends = [int(round(c * n)) for c in cumulative]
    ends[-1] = n  # float error must never lose the last row
    return ends


def stage_share(n: int, split: Sequence[float], stage_index: int, seed: int) -> list[int]:
    """Row indices of stage `stage_index` (0 sft, 1 reward, 2 ppo) in a source of n rows."""
    order = np.random.default_rng(seed).permutation(n)
    ends = share_bounds(n, split)
    start = 0 if stage_index == 0 else ends[stage_index - 1]
    return order[start : ends[stage_index]].tolist()


def train_eval(indices: Sequence[int], eval_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Hold out eval_fraction of `indices` (at least 1 row when > 0 and there are >= 2 rows)."""
    indices = list(indices)
    n_eval = int(round(len(indices) * eval_fraction))
    if eval_fraction > 0 and len(indices) >= 2:
        n_eval = min(max(n_eval, 1), len(indices) - 1)
    else:
        n_eval = 0
    order = np.random.default_rng([seed, 1]).permutation(len(indices))
    eval_pos = set(order[:n_eval].tolist())
    train = [x for i, x in enumerate(indices) if i not in eval_pos]
    evaluation = [x for i, x in enumerate(indices) if i in eval_pos]
    return train, evaluation

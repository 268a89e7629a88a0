"""DPO's precomputed reference log-probs cache (--precompute-ref): a cache file cut short (a full disk,
a killed job) or overwritten is recomputed and replaced with one warning line, never a traceback.
Tested on cached_logps itself: showing it through the CLI would take a whole DPO run."""

from __future__ import annotations

import logging

import torch

from forgepipe.distributed import World
from forgepipe.stages.dpo.reference import cached_logps

KEY = "k" * 64
VALUES = torch.tensor([[-1.5, -2.5], [-3.0, -4.0], [-0.5, -9.0]], dtype=torch.float64)


def computed(calls: list[int]):
    def compute() -> torch.Tensor:
        calls.append(1)
        return VALUES.clone()
    return compute


def test_a_good_cache_is_read_not_recomputed(tmp_path):
    calls: list[int] = []
    first = cached_logps(str(tmp_path), KEY, computed(calls), World())
    again = cached_logps(str(tmp_path), KEY, computed(calls), World())
    assert calls == [1] and torch.equal(first, VALUES) and torch.equal(again, VALUES)


def test_a_truncated_cache_is_recomputed_and_replaced_with_one_warning(tmp_path, caplog):
    calls: list[int] = []
    cached_logps(str(tmp_path), KEY, computed(calls), World())
    path = tmp_path / f"ref-logps-{KEY}.pt"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with caplog.at_level(logging.WARNING, logger="forgepipe.stages.dpo.reference"):
        values = cached_logps(str(tmp_path), KEY, computed(calls), World())
    assert calls == [1, 1] and torch.equal(values, VALUES)
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warning.startswith(f"reference log-probs cache {path} is unreadable (") and "recomputing it" in warning
    assert torch.equal(torch.load(path, weights_only=True), VALUES)  # written again, whole
    assert not list(tmp_path.glob("*.partial"))


def test_a_cache_holding_something_else_is_recomputed(tmp_path, caplog):
    calls: list[int] = []
    path = tmp_path / f"ref-logps-{KEY}.pt"
    torch.save(torch.zeros(7), path)
    with caplog.at_level(logging.WARNING, logger="forgepipe.stages.dpo.reference"):
        values = cached_logps(str(tmp_path), KEY, computed(calls), World())
    assert calls == [1] and torch.equal(values, VALUES)
    assert f"{path} holds (7,), not [N, 2] log-probs; recomputing it" in caplog.text

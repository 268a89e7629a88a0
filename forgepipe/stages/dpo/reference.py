"""The frozen reference's log-probabilities, from wherever they come.

Three sources, one interface (`Reference.logps(batch)`: [2B] summed response log-probs):
- a frozen DeepSpeed engine (ZeRO-3 partitioned like the policy; stages 1-2 give stage 0, as for
  PPO's reference): `--ref MODEL`, or the starting model without LoRA;
- the policy itself with its LoRA adapters switched off (PEFT's `disable_adapter()`): with LoRA the
  base weights never change, so the reference costs no second copy;
- a column precomputed once over the data before training (`--precompute-ref`), cached under a
  key of the tokenized data and the reference's identity; the engine is freed before the policy
  is built, so the reference's memory is never held during training.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import torch

from forgepipe import distributed as dist
from forgepipe.loop import eval_batches, to_device
from forgepipe.models.attention import forward_mask
from forgepipe.models.load import logits_at
from forgepipe.stages.dpo.losses import sequence_logps

log = logging.getLogger(__name__)

REF_CHOSEN, REF_REJECTED = "ref_chosen_logp", "ref_rejected_logp"  # precomputed columns
CACHE_VERSION = "ref-logps-v1"  # bump when what is stored changes


def forward_logps(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed response log-probs [2B], response tokens [2B]) of a DPOCollator batch under a causal LM
    (engine or module): the chosen and rejected rows in one forward."""
    inputs = {"input_ids": batch["input_ids"], "use_cache": False}
    mask = forward_mask(batch)  # None for a causal-only batch (models/attention.py)
    if mask is not None:
        inputs["attention_mask"] = mask
    return sequence_logps(logits_at(model, inputs, batch["predict_positions"]), batch["predict_labels"])


@contextlib.contextmanager
def adapters_off(engine) -> Iterator[None]:
    """The policy as its base model: LoRA adapters disabled and, for the pass, eval mode (the
    reference has no dropout); the training mode comes back afterwards."""
    module, training = engine.module, engine.module.training
    module.eval()
    try:
        with module.disable_adapter():
            yield
    finally:
        module.train(training)


class Reference:
    """Where the reference log-probs come from (see the module docstring)."""

    def __init__(self, engine=None, policy=None):
        self.engine, self.policy = engine, policy  # one of them; neither once precomputed

    @property
    def device(self) -> torch.device:
        return (self.engine if self.engine is not None else self.policy).device

    @torch.no_grad()
    def logps(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if REF_CHOSEN in batch:
            return torch.cat([batch[REF_CHOSEN], batch[REF_REJECTED]])
        if self.engine is not None:
            return forward_logps(self.engine, batch)[0]
        with adapters_off(self.policy):
            return forward_logps(self.policy, batch)[0]

    def free(self) -> None:
        """Drop the reference engine (after precomputing): its partitions and buffers go with it."""
        if self.engine is None:
            return
        self.engine.destroy()
        self.engine = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


@torch.no_grad()
def compute_logps(reference: Reference, data, collate, batch_size: int, world: dist.World,
                  device: torch.device) -> torch.Tensor:
    """[N, 2] (chosen, rejected) summed reference log-probs of every pair, on every rank: each rank
    scores its share (eval_batches: the same number of forwards everywhere, as ZeRO-3 needs), one
    all-reduce puts the pieces together."""
    values = torch.zeros(len(data), 2, dtype=torch.float64, device=device)
    for idx, weight in eval_batches(len(data), world.rank, world.world_size, batch_size):
        sums = reference.logps(to_device(collate([data[i] for i in idx]), device)).double()
        if weight:  # a rank with nothing left repeats sample 0 with weight 0
            values[idx] = torch.stack(sums.chunk(2), dim=1)
    return dist.all_reduce(values)


def model_identity(path: str) -> dict[str, list]:
    """A model directory as the cache sees it: its files' names, sizes and modification times
    (hashing many GB of weights would take minutes); a Hub name as itself."""
    root = Path(path)
    if not root.is_dir():
        return {"name": [path]}
    return {"files": sorted([p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in root.iterdir() if p.is_file())}


def cache_key(data, reference_path: str, dtype: str) -> str:
    """sha256 of the tokenized data's fingerprint (data, tokenizer, lengths: tokenize.cache_key),
    the reference model's identity and the dtype it runs in."""
    payload = {"version": CACHE_VERSION, "data": data._fingerprint, "reference": model_identity(reference_path),
               "dtype": dtype}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def load_cached(path: Path) -> torch.Tensor | None:
    """The [N, 2] log-probs cached at `path`; None when there is no file, and None with one warning
    line naming the file when it is unreadable (cut short by a full disk or a killed job, garbage)
    or holds something else: the caller then recomputes it and writes it again."""
    if not path.is_file():
        return None
    try:
        values = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises RuntimeError, EOFError, UnpicklingError, ...
        reason = (str(exc).strip().splitlines() or [""])[0][:200]
        log.warning("reference log-probs cache %s is unreadable (%s: %s); recomputing it", path,
                    type(exc).__name__, reason)
        return None
    if not isinstance(values, torch.Tensor) or values.dim() != 2 or values.shape[1] != 2 \
            or not values.is_floating_point():
        shape = tuple(values.shape) if isinstance(values, torch.Tensor) else type(values).__name__
        log.warning("reference log-probs cache %s holds %s, not [N, 2] log-probs; recomputing it", path, shape)
        return None
    return values


def cached_logps(cache_dir: str, key: str, compute, world: dist.World) -> torch.Tensor | None:
    """The cached [N, 2] log-probs under `key`, or `compute()`'s, written by rank 0 (aside, then
    renamed). Rank 0 reads and checks the cache (load_cached) and hands its values to every rank,
    so all ranks agree on whether to recompute (compute_logps is collective); a cache file that is
    unreadable is recomputed and replaced, with a warning, never a traceback."""
    path = Path(cache_dir) / f"ref-logps-{key}.pt"
    cached = dist.broadcast_object(load_cached(path) if world.is_main else None)
    if cached is not None:
        log.info("reference log-probs from the cache: %s", path)
        return cached
    values = compute()
    if world.is_main:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".partial")
        torch.save(values.cpu(), partial)
        os.replace(partial, path)
    return values


def with_reference_columns(data, values: torch.Tensor):
    """The tokenized pairs with their reference log-probs as two more columns (the collator reads them)."""
    host = values.cpu()
    for column, name in enumerate((REF_CHOSEN, REF_REJECTED)):
        fingerprint = hashlib.sha256(f"{data._fingerprint}/{name}".encode()).hexdigest()
        data = data.add_column(name, host[:, column].tolist(), new_fingerprint=fingerprint)
    return data

"""Batches: dynamic padding to the longest row of the batch (never to max length), and packing.

- SFTCollator: right padding; labels padded with -100 so padding never carries loss.
- PairCollator: the B chosen rows then the B rejected rows in one [2B, L] batch (one forward pass),
  right-padded; the reward model reads each score at the row's last attended token.
- PromptCollator: left padding, so every prompt ends where generation starts.

Dynamic padding wastes what the batch's shortest rows lack; `length_grouped_order` puts samples of
similar length into the same micro-batch so that little padding is left to compute.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import datasets
import torch
from torch.nn.utils.rnn import pad_sequence

from forgepipe.data.tokenize import IGNORE_INDEX
from forgepipe.models.attention import CAUSAL_ONLY


def _round_up(n: int, multiple: int | None) -> int:
    return n if not multiple else -(-n // multiple) * multiple


def pad(
    rows: Sequence[Sequence[int]], value: int, side: str = "right", multiple: int | None = None
) -> torch.Tensor:
    """[len(rows), L] long tensor, L = longest row rounded up to `multiple`."""
    tensors = [torch.as_tensor(r, dtype=torch.long) for r in rows]
    out = pad_sequence(tensors, batch_first=True, padding_value=value, padding_side=side)
    extra = _round_up(out.shape[1], multiple) - out.shape[1]
    if extra:
        fill = out.new_full((out.shape[0], extra), value)
        out = torch.cat([out, fill] if side == "right" else [fill, out], dim=1)
    return out


def _mask(rows: Sequence[Sequence[int]], side: str, multiple: int | None) -> torch.Tensor:
    return pad([[1] * len(r) for r in rows], 0, side, multiple)


def predicted_positions(labels: torch.Tensor, multiple: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, T] labels -> ([B, K] positions whose logits carry loss, [B, K] the token each predicts).

    Position i predicts token i+1, so it carries loss when labels[i+1] is set. Prompts and padding
    carry none, so the loss runs the LM head (vocabulary-wide) on these K positions only, not on
    all T. K is the batch's most labelled row (rounded up to `multiple`, as the length is); shorter
    rows fill up with position 0 and target IGNORE_INDEX. Computed on the host, so the device
    never waits to learn K.
    """
    targets = labels[:, 1:]
    carries = targets != IGNORE_INDEX
    k = min(_round_up(max(int(carries.sum(1).max()), 1), multiple), targets.shape[1])
    positions = torch.argsort((~carries).to(torch.int8), dim=1, stable=True)[:, :k]  # labelled first, in order
    kept = carries.gather(1, positions)
    return positions.masked_fill(~kept, 0), targets.gather(1, positions).masked_fill(~kept, IGNORE_INDEX)


class SFTCollator:
    """{input_ids, labels[, position_ids]} rows -> padded tensors (position_ids for packed rows), and
    the positions whose logits carry loss (`predicted_positions`). `padding_mask` False marks the
    batch `causal_only`: its forward goes without the 2D mask (models/attention.py)."""

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None, padding_mask: bool = True):
        self.pad_token_id = pad_token_id
        self.multiple = pad_to_multiple_of
        self.padding_mask = padding_mask

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        ids = [f["input_ids"] for f in features]
        batch = {
            "input_ids": pad(ids, self.pad_token_id, "right", self.multiple),
            "attention_mask": _mask(ids, "right", self.multiple),
            "labels": pad([f["labels"] for f in features], IGNORE_INDEX, "right", self.multiple),
        }
        if "position_ids" in features[0]:
            batch["position_ids"] = pad([f["position_ids"] for f in features], 0, "right", self.multiple)
        batch["predict_positions"], batch["predict_labels"] = predicted_positions(batch["labels"], self.multiple)
        if not self.padding_mask:
            batch[CAUSAL_ONLY] = True
        return batch


class PairCollator:
    """{chosen_input_ids, rejected_input_ids[, margin]} rows -> input_ids [2B, L] (chosen first);
    `padding_mask` as for SFTCollator."""

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None, padding_mask: bool = True):
        self.pad_token_id = pad_token_id
        self.multiple = pad_to_multiple_of
        self.padding_mask = padding_mask

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        rows = [f["chosen_input_ids"] for f in features] + [f["rejected_input_ids"] for f in features]
        batch = {
            "input_ids": pad(rows, self.pad_token_id, "right", self.multiple),
            "attention_mask": _mask(rows, "right", self.multiple),
        }
        if "margin" in features[0]:
            batch["margin"] = torch.tensor([float(f["margin"]) for f in features], dtype=torch.float32)
        if not self.padding_mask:
            batch[CAUSAL_ONLY] = True
        return batch


class PromptCollator:
    """{prompt_input_ids} rows -> left-padded input_ids and attention_mask for generate()."""

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None):
        self.pad_token_id = pad_token_id
        self.multiple = pad_to_multiple_of

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        rows = [f["prompt_input_ids"] for f in features]
        return {
            "input_ids": pad(rows, self.pad_token_id, "left", self.multiple),
            "attention_mask": _mask(rows, "left", self.multiple),
        }


def _pack_batch(batch: dict[str, list], max_seq_len: int) -> dict[str, list]:
    out: dict[str, list] = {"input_ids": [], "labels": [], "position_ids": []}
    ids: list[int] = []
    labels: list[int] = []
    positions: list[int] = []

    def flush():
        if ids:
            out["input_ids"].append(list(ids))
            out["labels"].append(list(labels))
            out["position_ids"].append(list(positions))
            ids.clear()
            labels.clear()
            positions.clear()

    for row_ids, row_labels in zip(batch["input_ids"], batch["labels"], strict=True):
        row_ids, row_labels = list(row_ids[:max_seq_len]), list(row_labels[:max_seq_len])
        if len(ids) + len(row_ids) > max_seq_len:
            flush()
        if ids:
            # The shifted loss would predict this sample's first token from the previous sample.
            row_labels[0] = IGNORE_INDEX
        ids.extend(row_ids)
        labels.extend(row_labels)
        positions.extend(range(len(row_ids)))
    flush()
    return out


def sample_lengths(ds: datasets.Dataset) -> list[int]:
    """The length that decides a sample's padded width: the longer side of a pair (PairCollator pads
    chosen and rejected rows together), the ids of anything else."""
    if "chosen_input_ids" in ds.column_names:
        return [max(len(c), len(r)) for c, r in zip(ds["chosen_input_ids"], ds["rejected_input_ids"], strict=True)]
    column = "input_ids" if "input_ids" in ds.column_names else "prompt_input_ids"
    return [len(ids) for ids in ds[column]]


def length_grouped_order(
    lengths: Sequence[int], batch_size: int, seed: int, epoch: int, mega_batches: int = 64
) -> list[int]:
    """An epoch's sample order in which each run of `batch_size` samples has similar lengths.

    Why: padding to the batch's longest row computes the gap to every shorter row; a batch of
    like lengths leaves almost none. How: shuffle (seeded by seed and epoch, so every rank and
    every resumed run gets the same order and a resume continues by position), cut into windows of
    `mega_batches` batches, sort each window longest first, cut it into batches, then shuffle the
    batches so the epoch does not run from long to short. Only the window's order is sorted, so
    samples still meet different neighbours every epoch. `batch_size` is the global micro-batch
    (ranks x micro-batch): the ranks of one step then wait for rows of like length, too.
    """
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(len(lengths), generator=generator).tolist()
    window = max(1, batch_size * mega_batches)
    batches: list[list[int]] = []
    for start in range(0, len(order), window):
        chunk_ = sorted(order[start:start + window], key=lambda i: -lengths[i])
        batches.extend(chunk_[i:i + batch_size] for i in range(0, len(chunk_), batch_size))
    # A short last batch stays last: the loop drops an incomplete final step, never a full one.
    tail = [batches.pop()] if batches and len(batches[-1]) < batch_size else []
    shuffled = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
    return [i for batch in shuffled + tail for i in batch]


TOKEN_WINDOW = 4096  # samples sorted together by token_budget_batches: fixed, so the plan ignores the world size


def rows_per_sample(ds) -> int:
    """Rows a sample puts into the forward: 2 for a preference pair (chosen and rejected), else 1."""
    return 2 if "chosen_input_ids" in getattr(ds, "column_names", ()) else 1


def token_budget_batches(lengths: Sequence[int], budget: int, seed: int, epoch: int, *, rows: int = 1,
                         multiple: int = 1) -> list[list[int]]:
    """An epoch's micro-batches cut by tokens: each holds as many samples as fit `budget` padded
    tokens (rows x samples x the batch's longest length, rounded up to `multiple`), so a batch of
    short rows carries more of them and the device is filled whatever the lengths.

    Seeded by (seed, epoch) like every order here, so every rank and every resumed run sees the same
    plan. How: shuffle; sort windows of TOKEN_WINDOW samples longest first; cut each greedily; shuffle
    the batches. The plan is a global list that does not depend on the world size (ranks are dealt
    batch i*W + r), so a resume at another world size continues at the same batch.
    """
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(len(lengths), generator=generator).tolist()
    batches: list[list[int]] = []
    for start in range(0, len(order), TOKEN_WINDOW):
        current: list[int] = []
        width = 0
        for i in sorted(order[start:start + TOKEN_WINDOW], key=lambda i: -lengths[i]):
            grown = max(width, _round_up(lengths[i], multiple))
            if current and rows * (len(current) + 1) * grown > budget:
                batches.append(current)
                current, grown = [], _round_up(lengths[i], multiple)
            current.append(i)
            width = grown
        if current:
            batches.append(current)
    return [batches[j] for j in torch.randperm(len(batches), generator=generator).tolist()]


def padding_stats(batches: Sequence[Sequence[int]], lengths: Sequence[int],
                  pad_to: int | None = None) -> tuple[int, int]:
    """(real tokens, computed tokens) of batches padded to their longest row (or to `pad_to`)."""
    real = sum(lengths[i] for b in batches for i in b)
    computed = sum(len(b) * (pad_to or max(lengths[i] for i in b)) for b in batches if b)
    return real, computed


def pack_sequences(ds: datasets.Dataset, max_seq_len: int, batch_size: int = 1000) -> datasets.Dataset:
    """Greedy packing of tokenized SFT rows (in order) into rows of at most max_seq_len ids.

    position_ids restart at 0 for each sample; the SFT loss (stages/sft.py: model_inputs) hands
    them to the model without the 2D mask, so no sample attends to another with any attention
    implementation. Packing happens within each map batch of `batch_size` rows.
    """
    return ds.map(
        _pack_batch,
        batched=True,
        batch_size=batch_size,
        remove_columns=ds.column_names,
        fn_kwargs={"max_seq_len": max_seq_len},
        desc="packing",
    )

"""Dynamic padding (to the batch's longest row, never max length) and greedy packing."""

import datasets
import torch

from forgepipe.data.collate import (
    PairCollator,
    PromptCollator,
    SFTCollator,
    length_grouped_order,
    pack_sequences,
    padding_stats,
    predicted_positions,
    sample_lengths,
)
from forgepipe.loop import epoch_order, rank_batches

PAD = 0


def test_sft_collator_pads_right_and_masks_labels():
    batch = SFTCollator(PAD)([
        {"input_ids": [5, 6, 7], "labels": [-100, 6, 7]},
        {"input_ids": [8, 9], "labels": [8, 9]},
    ])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 9, PAD]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, 9, -100]]
    assert batch["input_ids"].dtype == torch.long


def test_pad_to_multiple_of():
    batch = SFTCollator(PAD, pad_to_multiple_of=4)([{"input_ids": [1] * 5, "labels": [1] * 5}])
    assert batch["input_ids"].shape == (1, 8)
    assert batch["labels"][0, 5:].tolist() == [-100] * 3
    assert batch["attention_mask"].sum().item() == 5


def test_pair_collator_chosen_rows_first_padded_together():
    batch = PairCollator(PAD)([
        {"chosen_input_ids": [1, 2], "rejected_input_ids": [1, 3, 4, 5], "margin": 0.5},
        {"chosen_input_ids": [6, 7, 8], "rejected_input_ids": [9], "margin": 2.0},
    ])
    assert batch["input_ids"].tolist() == [[1, 2, 0, 0], [6, 7, 8, 0], [1, 3, 4, 5], [9, 0, 0, 0]]
    assert batch["attention_mask"].sum(1).tolist() == [2, 3, 4, 1]
    assert batch["margin"].tolist() == [0.5, 2.0]
    assert "margin" not in PairCollator(PAD)([{"chosen_input_ids": [1], "rejected_input_ids": [2]}])


def test_prompt_collator_pads_left():
    batch = PromptCollator(PAD)([{"prompt_input_ids": [4, 5, 6]}, {"prompt_input_ids": [7]}])
    assert batch["input_ids"].tolist() == [[4, 5, 6], [PAD, PAD, 7]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]


def test_pack_sequences_greedy():
    ds = datasets.Dataset.from_dict({
        "input_ids": [[1, 2, 3], [4, 5, 6, 7], [8, 9], [10, 11, 12, 13, 14]],
        "labels": [[-100, 2, 3], [4, 5, 6, 7], [-100, 9], [10, 11, 12, 13, 14]],
    })
    packed = pack_sequences(ds, max_seq_len=8)
    assert packed["input_ids"][:] == [[1, 2, 3, 4, 5, 6, 7], [8, 9, 10, 11, 12, 13, 14]]
    assert packed["labels"][:] == [[-100, 2, 3, -100, 5, 6, 7], [-100, 9, -100, 11, 12, 13, 14]]
    assert packed["position_ids"][:] == [[0, 1, 2, 0, 1, 2, 3], [0, 1, 0, 1, 2, 3, 4]]
    batch = SFTCollator(PAD)(list(packed))
    assert batch["position_ids"].tolist() == packed["position_ids"][:]  # both rows are 7 long


def test_pack_never_exceeds_max_and_keeps_every_token():
    lengths = [3, 7, 1, 5, 6, 2, 8, 4]
    rows = [list(range(100 * i, 100 * i + n)) for i, n in enumerate(lengths)]
    packed = pack_sequences(datasets.Dataset.from_dict({"input_ids": rows, "labels": rows}), max_seq_len=8)
    assert all(len(r) <= 8 for r in packed["input_ids"][:])
    assert sum(packed["input_ids"][:], []) == sum(rows, [])


def test_position_ids_are_padded_with_the_batch():
    batch = SFTCollator(PAD)([
        {"input_ids": [1, 2, 3], "labels": [1, 2, 3], "position_ids": [0, 1, 0]},
        {"input_ids": [4], "labels": [4], "position_ids": [0]},
    ])
    assert batch["position_ids"].tolist() == [[0, 1, 0], [0, 0, 0]]
    assert batch["labels"].tolist() == [[1, 2, 3], [4, -100, -100]]


def _lengths(n=203, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(5, 250, (n,), generator=g).tolist()


def test_length_grouped_order_is_a_permutation_and_deterministic():
    lengths = _lengths()
    order = length_grouped_order(lengths, batch_size=4, seed=7, epoch=0, mega_batches=8)
    assert sorted(order) == list(range(len(lengths)))
    assert order == length_grouped_order(lengths, batch_size=4, seed=7, epoch=0, mega_batches=8)
    assert order != length_grouped_order(lengths, batch_size=4, seed=7, epoch=1, mega_batches=8)


def test_length_grouped_order_resumes_by_position():
    """A resumed run recomputes the epoch's order from (seed, epoch) and skips what it consumed:
    the batches after the resume point are those the uninterrupted run would have seen."""
    lengths = _lengths()
    whole = rank_batches(length_grouped_order(lengths, 4, seed=3, epoch=2), 0, 1, 4, 1)
    again = rank_batches(length_grouped_order(list(lengths), 4, seed=3, epoch=2), 0, 1, 4, 1)
    assert again[17:] == whole[17:]


def test_length_grouped_order_cuts_padding():
    lengths = _lengths(n=400)
    grouped = rank_batches(length_grouped_order(lengths, 4, seed=1, epoch=0), 0, 1, 4, 1)
    shuffled = rank_batches(epoch_order(len(lengths), 1, 0), 0, 1, 4, 1)
    real_g, computed_g = padding_stats(grouped, lengths)
    real_s, computed_s = padding_stats(shuffled, lengths)
    assert real_g == real_s  # the same samples (a whole number of batches of 400)
    assert computed_g < 0.8 * computed_s
    assert padding_stats(grouped, lengths, pad_to=256)[1] == len(grouped) * 4 * 256


def test_length_grouped_batches_span_the_ranks():
    """With 2 ranks the global micro-batch (8 rows) is the group: both ranks' rows are alike."""
    lengths = [10] * 8 + [200] * 8 + [11] * 8 + [190] * 8
    order = length_grouped_order(lengths, batch_size=8, seed=0, epoch=0)
    for rank in (0, 1):
        for batch in rank_batches(order, rank, 2, 4, 1):
            assert max(lengths[i] for i in batch) - min(lengths[i] for i in batch) <= 10


def test_sample_lengths_of_pairs_and_sft_rows():
    sft = datasets.Dataset.from_dict({"input_ids": [[1, 2, 3], [4]], "labels": [[1, 2, 3], [4]]})
    pairs = datasets.Dataset.from_dict({"chosen_input_ids": [[1, 2]], "rejected_input_ids": [[3, 4, 5]]})
    assert sample_lengths(sft) == [3, 1]
    assert sample_lengths(pairs) == [3]  # the longer side: both are padded to it


def test_predicted_positions_are_those_before_a_labelled_token():
    labels = torch.tensor([
        [-100, -100, 7, 8, -100],  # prompt, prompt, 7, 8, padding: positions 1 and 2 predict 7 and 8
        [-100, 5, -100, 6, 9],  # a packed row: 5, then a new sample whose first token carries no loss
    ])
    positions, targets = predicted_positions(labels)
    assert positions.tolist() == [[1, 2, 0], [0, 2, 3]]
    assert targets.tolist() == [[7, 8, -100], [5, 6, 9]]
    positions, targets = predicted_positions(labels, multiple=4)  # K rounded up, never past T - 1
    assert positions.shape == (2, 4) and targets[0].tolist() == [7, 8, -100, -100]

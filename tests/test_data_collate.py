"""Dynamic padding (to the batch's longest row, never max length) and greedy packing."""

import datasets
import torch

from forgepipe.data.collate import PairCollator, PromptCollator, SFTCollator, pack_sequences

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

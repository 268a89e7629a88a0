"""Tokenization: prompt masking against hand-worked ids, truncation rules, and the on-disk cache."""

import datasets
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from forgepipe.data import tokenize as tk
from forgepipe.data.tokenize import (
    chunk,
    pair_side,
    sft_example,
    tokenize_pairs,
    tokenize_prompts,
    tokenize_sft,
    tokenize_text,
)
from forgepipe.errors import ForgeError

WORDS = "[UNK] [PAD] </s> Human : Assistant hello world the sky is blue green".split()
# ids:     0     1    2     3    4     5       6     7    8   9  10   11   12
H, A = "\n\nHuman:", "\n\nAssistant:"


def make_tokenizer(words=WORDS):
    backend = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", pad_token="[PAD]", unk_token="[UNK]")


@pytest.fixture
def tok():
    return make_tokenizer()


def rows(*items):
    keys = ("prompt", "chosen", "rejected", "kind")
    return datasets.Dataset.from_list([dict(zip(keys, item, strict=True)) for item in items])


# --- pure functions -------------------------------------------------------------------------


def test_sft_example_masks_the_prompt():
    assert sft_example([3, 4, 6], [7, 8], 2, 10, 10) == ([3, 4, 6, 7, 8, 2], [-100, -100, -100, 7, 8, 2])


def test_sft_example_left_truncates_prompt_then_right_truncates():
    assert sft_example([3, 4, 6], [7, 8], 2, 10, 2) == ([4, 6, 7, 8, 2], [-100, -100, 7, 8, 2])
    assert sft_example([3, 4, 6], [7, 8], 2, 4, 10) == ([3, 4, 6, 7], [-100, -100, -100, 7])
    assert sft_example([3, 4, 6], [7, 8], 2, 3, 10) is None  # no response token left
    assert sft_example([], [7, 8], 2, 10, 10) == ([7, 8, 2], [7, 8, 2])  # "text": loss everywhere


def test_pair_side_keeps_eos_last():
    assert pair_side([3, 4], [7, 8, 9], 2, 10, 10) == [3, 4, 7, 8, 9, 2]
    assert pair_side([3, 4], [7, 8, 9], 2, 4, 10) == [3, 4, 7, 2]
    assert pair_side([3, 4, 5], [7], 2, 10, 1) == [5, 7, 2]


def test_chunk():
    assert chunk([1, 2, 3, 4, 5, 6, 7], 3) == [[1, 2, 3], [4, 5, 6]]  # [7] alone has no LM target
    assert chunk([1, 2, 3, 4], 2) == [[1, 2], [3, 4]]


# --- datasets + a real tokenizer --------------------------------------------------------------


def test_tokenize_sft_hand_worked(tok, tmp_path):
    ds = rows((f"{H} hello{A}", " the sky is blue", None, "pair"), ("", "green world", None, "text"))
    out = tokenize_sft(ds, tok, max_seq_len=32, max_prompt_len=16, cache_dir=tmp_path)
    assert out["input_ids"][:] == [[3, 4, 6, 5, 4, 8, 9, 10, 11, 2], [12, 7, 2]]
    assert out["labels"][:] == [[-100] * 5 + [8, 9, 10, 11, 2], [12, 7, 2]]


def test_tokenize_sft_drops_rows_without_response_and_errors_when_all_go(tok, tmp_path):
    ds = rows((f"{H} hello world{A}", " blue", None, "pair"), (f"{H} hi{A}", " blue", None, "pair"))
    out = tokenize_sft(ds, tok, max_seq_len=6, max_prompt_len=16, cache_dir=tmp_path)
    assert out["input_ids"][:] == [[3, 4, 0, 5, 4, 11]]  # "hi" is unknown: id 0
    with pytest.raises(ForgeError, match=r"^--max-seq-len 4 is shorter than every prompt in data/x.jsonl$"):
        tokenize_sft(ds, tok, max_seq_len=4, max_prompt_len=16, cache_dir=tmp_path, source="data/x.jsonl")


def test_tokenize_pairs_drops_identical_and_passes_margin(tok, tmp_path):
    ds = datasets.Dataset.from_list([
        {"prompt": "hello", "chosen": " the sky is blue", "rejected": " the sky is green", "kind": "pair", "m": 1.5},
        {"prompt": "hello", "chosen": " same", "rejected": " same", "kind": "pair", "m": 0.0},
    ])
    out, dropped = tokenize_pairs(ds, tok, 32, 16, tmp_path, margin_field="m")
    assert dropped == 1
    assert out.to_list() == [{"chosen_input_ids": [6, 8, 9, 10, 11, 2],
                              "rejected_input_ids": [6, 8, 9, 10, 12, 2], "margin": 1.5}]
    with pytest.raises(ForgeError, match="--max-seq-len 4 is shorter than every prompt"):
        tokenize_pairs(ds, tok, 4, 16, tmp_path)  # truncation leaves [6, 8, 9, 2] on both sides


def test_tokenize_pairs_truncation_keeps_eos(tok, tmp_path):
    ds = rows(("hello", " blue sky is the", " green sky is the", "pair"))
    out, dropped = tokenize_pairs(ds, tok, 4, 16, tmp_path)
    assert dropped == 0
    assert out.to_list() == [{"chosen_input_ids": [6, 11, 9, 2], "rejected_input_ids": [6, 12, 9, 2]}]
    with pytest.raises(ForgeError, match="--margin-field: src has no field 'margin'"):
        tokenize_pairs(ds, tok, 32, 16, tmp_path, margin_field="margin", source="src")


def test_tokenize_prompts_drops_long_ones(tok, tmp_path):
    ds = rows(("hello", "x", None, "response"), ("the sky is blue", "x", None, "response"))
    out = tokenize_prompts(ds, tok, max_prompt_len=2, cache_dir=tmp_path)
    assert out["prompt_input_ids"][:] == [[6]]
    with pytest.raises(ForgeError, match=r"^--max-prompt-len 2 is shorter than every prompt in src$"):
        tokenize_prompts(ds.select([1]), tok, max_prompt_len=2, cache_dir=tmp_path, source="src")


def test_tokenize_text_chunks(tok, tmp_path):
    ds = rows(("", "the sky is blue the sky is green", None, "text"))
    out = tokenize_text(ds, tok, max_seq_len=4, cache_dir=tmp_path)
    assert out["input_ids"][:] == [[8, 9, 10, 11], [8, 9, 10, 12]]  # the trailing [EOS] piece is too short
    assert out["labels"][:] == out["input_ids"][:]


# --- the cache ------------------------------------------------------------------------------


def test_cache_is_reused_and_keyed_by_lengths_and_tokenizer(tok, tmp_path, monkeypatch):
    ds = rows((f"{H} hello{A}", " the sky is blue", None, "pair"))
    first = tokenize_sft(ds, tok, 32, 16, tmp_path)
    files = sorted(p.name for p in tmp_path.glob("*.arrow"))
    assert len(files) == 1 and first.cache_files[0]["filename"].endswith(files[0])
    assert files[0] == tk.cache_key(ds, tok, fn="sft", max_seq_len=32, max_prompt_len=16) + ".arrow"

    def must_not_run(*args, **kwargs):
        raise AssertionError("tokenized again instead of reading the cache")

    monkeypatch.setattr(tk, "_sft_batch", must_not_run)
    again = tokenize_sft(ds, tok, 32, 16, tmp_path)
    assert again["input_ids"][:] == first["input_ids"][:]
    with pytest.raises(AssertionError, match="tokenized again"):
        tokenize_sft(ds, tok, 31, 16, tmp_path)  # a new max length is a new key
    with pytest.raises(AssertionError, match="tokenized again"):
        tokenize_sft(ds, make_tokenizer(WORDS + ["extra"]), 32, 16, tmp_path)  # so is a new tokenizer


def test_cache_key_changes():
    ds = rows(("a", "b", None, "pair"))
    base = tk.cache_key(ds, make_tokenizer(), fn="sft", max_seq_len=8)
    assert base == tk.cache_key(ds, make_tokenizer(), fn="sft", max_seq_len=8)
    assert base != tk.cache_key(ds, make_tokenizer(), fn="sft", max_seq_len=9)
    assert base != tk.cache_key(ds, make_tokenizer(WORDS[:-1] + ["red"]), fn="sft", max_seq_len=8)
    assert base != tk.cache_key(ds.select([0, 0]), make_tokenizer(), fn="sft", max_seq_len=8)
    assert len(base) == 64


def test_a_huge_record_is_cut_before_tokenizing_with_the_same_tokens_kept(tok, tmp_path):
    """A 20 MB response is cut to CHARS_PER_TOKEN x --max-seq-len characters before the tokenizer sees it
    (it was tokenized whole, then truncated: a minute and gigabytes for one record); the ids kept equal
    those of the whole text, prompt (kept from its end) and response (from its start) alike."""
    import time

    prompt = "hello " * 400_000 + f"{H} sky{A}"
    response = " the sky is blue" + " green" * 4_000_000
    ds = rows((prompt, response, None, "pair"))
    start = time.monotonic()
    out = tokenize_sft(ds, tok, max_seq_len=24, max_prompt_len=8, cache_dir=tmp_path)
    assert time.monotonic() - start < 10
    whole = sft_example(tk._ids(tok, [prompt])[0][-64:], tk._ids(tok, [response[:4000]])[0], 2, 24, 8)
    assert out["input_ids"][0] == whole[0] and out["labels"][0] == whole[1]
    pairs_out, _ = tokenize_pairs(datasets.Dataset.from_list([{"prompt": prompt, "chosen": response,
                                                              "rejected": " the sky is green", "kind": "pair"}]),
                                  tok, 24, 8, tmp_path)
    assert pairs_out["chosen_input_ids"][0][:8] == whole[0][:8]


def test_pairs_that_are_all_identical_are_refused_by_name(tok, tmp_path):
    ds = rows(("hello", " same", " same", "pair"), ("hello", " blue", " blue", "pair"))
    with pytest.raises(ForgeError, match=r"^data/p.jsonl: all 2 pairs have the same chosen and rejected text"):
        tokenize_pairs(ds, tok, 32, 16, tmp_path, source="data/p.jsonl")

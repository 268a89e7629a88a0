"""Per-stage shares and train/eval splits: deterministic, disjoint, covering; stage data end to end."""

import json
from pathlib import Path

import pytest

from forgepipe.data import load_stage_data, load_text_data
from forgepipe.data.split import share_bounds, stage_share, train_eval
from forgepipe.errors import ForgeError

REPO = Path(__file__).resolve().parents[1]
SAMPLE_PAIRS = str(REPO / "examples" / "data" / "sample_pairs.jsonl")
SAMPLE_DOCS = str(REPO / "examples" / "data" / "sample_docs.jsonl")
SHARED = REPO.parent / "shared" / "data"


def test_share_bounds_hand_worked():
    assert share_bounds(10, (2, 4, 4)) == [2, 6, 10]
    assert share_bounds(10, (0.2, 0.4, 0.4)) == [2, 6, 10]
    assert share_bounds(7, (1, 1, 1)) == [2, 5, 7]  # round(7/3)=2, round(14/3)=5
    assert share_bounds(5, (0, 0, 1)) == [0, 0, 5]


def test_stage_shares_are_disjoint_cover_and_deterministic():
    n, split = 103, (2, 4, 4)
    parts = [stage_share(n, split, i, seed=7) for i in range(3)]
    assert [len(p) for p in parts] == [21, 41, 41]
    assert sorted(parts[0] + parts[1] + parts[2]) == list(range(n))
    assert parts == [stage_share(n, split, i, seed=7) for i in range(3)]
    assert parts[0] != stage_share(n, split, 0, seed=8)


def test_zero_share_is_empty():
    assert stage_share(10, (1, 0, 1), 1, seed=0) == []


def test_train_eval():
    idx = list(range(100, 120))
    train, ev = train_eval(idx, 0.25, seed=3)
    assert len(ev) == 5 and len(train) == 15
    assert sorted(train + ev) == idx
    assert (train, ev) == train_eval(idx, 0.25, seed=3)
    assert train_eval([1, 2, 3], 0.01, seed=0)[1] != []  # at least one eval row
    assert train_eval([1, 2, 3], 0.0, seed=0) == ([1, 2, 3], [])
    assert train_eval([5], 0.5, seed=0) == ([5], [])  # one row: it trains
    assert len(train_eval([1, 2], 0.9, seed=0)[0]) == 1  # train keeps a row


def key(row):
    return row["prompt"], row["chosen"]


def test_stage_data_on_bundled_sample_is_disjoint():
    seen = {}
    for stage in ("sft", "reward", "ppo"):
        train, ev = load_stage_data([SAMPLE_PAIRS], stage, "2,4,4", seed=1234, eval_fraction=0.1)
        seen[stage] = {key(r) for r in train} | {key(r) for r in ev}
        assert set(train.column_names) == {"prompt", "chosen", "rejected", "kind", "messages"}
        assert {key(r) for r in train}.isdisjoint({key(r) for r in ev})
    assert [len(s) for s in seen.values()] == [60, 120, 120]
    assert not (seen["sft"] & seen["reward"]) and not (seen["reward"] & seen["ppo"])
    again, _ = load_stage_data([SAMPLE_PAIRS], "reward", "2,4,4", seed=1234, eval_fraction=0.1)
    assert [key(r) for r in again] == [key(r) for r in load_stage_data([SAMPLE_PAIRS], "reward", "2,4,4", 1234, 0.1)[0]]


def test_two_sources_concatenate(tmp_path):
    path = tmp_path / "sft.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"p{i}", "response": f"r{i}"}) + "\n" for i in range(10)))
    train, ev = load_stage_data([SAMPLE_PAIRS, str(path)], "sft", "1,0,0", seed=0, eval_fraction=0.1)
    assert len(train) + len(ev) == 310
    assert set(train["kind"][:]) == {"pair", "response"}


def test_reward_stage_needs_pairs(tmp_path):
    path = tmp_path / "sft.jsonl"
    path.write_text(json.dumps({"prompt": "p", "response": "r"}) + "\n")
    with pytest.raises(ForgeError, match=r"sft.jsonl: no chosen/rejected pairs \(fields: prompt, response\)"):
        load_stage_data([str(path)], "reward", "2,4,4", seed=0, eval_fraction=0.1)


def test_stage_with_no_rows_names_source_and_split(tmp_path):
    path = tmp_path / "two.jsonl"
    path.write_text("".join(json.dumps({"prompt": "p", "chosen": "c", "rejected": f"r{i}"}) + "\n" for i in range(2)))
    with pytest.raises(ForgeError, match=r"two.jsonl: --data-split 1,1,1 leaves stage reward no rows"):
        load_stage_data([str(path)], "reward", "1,1,1", seed=0, eval_fraction=0.1)


def test_ppo_needs_prompts():
    with pytest.raises(ForgeError, match="no rows with a prompt for stage ppo"):
        load_stage_data([SAMPLE_DOCS], "ppo", "0,0,1", seed=0, eval_fraction=0.1)


def test_text_data():
    docs = load_text_data([SAMPLE_DOCS], seed=0)
    assert len(docs) == 60 and set(docs["kind"][:]) == {"text"}
    assert docs["chosen"][:] == load_text_data([SAMPLE_DOCS], seed=0)["chosen"][:]


def test_real_hh_sample_loads_normalises_and_splits():
    sample = SHARED / "hh-rlhf-harmless-sample.jsonl.gz"
    if not sample.is_file():
        pytest.skip(f"shared HH-RLHF sample not present at {sample}")
    train, ev = load_stage_data([str(sample)], "reward", "2,4,4", seed=1234, eval_fraction=0.1)
    assert len(train) + len(ev) == 320  # 4/10 of 800 pairs; every row splits
    assert len(ev) == 32
    assert set(train["kind"][:]) == {"pair"}
    for row in train.select(range(20)):
        assert row["prompt"].endswith("\n\nAssistant:") and row["prompt"].startswith("\n\nHuman:")
        assert "\n\nAssistant:" not in row["chosen"] and "\n\nAssistant:" not in row["rejected"]

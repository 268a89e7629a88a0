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


# ---------------------------------------------------------------------------
# A stage run alone reads all of its data; the pipeline splits one source (issue 22)


def test_standalone_stage_trains_on_every_row_but_the_held_out():
    from forgepipe.config import build_config, data_share

    for stage, split in (("sft", "1,0,0"), ("reward", "0,1,0"), ("ppo", "0,0,1"), ("dpo", "0,1,0")):
        cfg = build_config(stage, None, {"data.sources": [SAMPLE_PAIRS]})
        assert cfg.data.split == split  # resolved: the config (and its MLflow params) name the rows read
        train, ev = load_stage_data(cfg.data.sources, data_share(stage), cfg.data.split, cfg.train.seed,
                                    cfg.data.eval_fraction)
        assert (len(train), len(ev)) == (270, 30)  # 300 pairs, 10% held out
    # Unset (a Config built without validate): the same rows.
    train, ev = load_stage_data([SAMPLE_PAIRS], "sft", None, seed=1234, eval_fraction=0.1)
    assert (len(train), len(ev)) == (270, 30)


def test_explicit_split_on_a_standalone_stage_is_obeyed():
    from forgepipe.config import build_config
    from forgepipe.data.ledger import stage_line

    cfg = build_config("sft", None, {"data.split": "2,4,4"})
    assert cfg.data.split == "2,4,4"
    train, ev = load_stage_data([SAMPLE_PAIRS], "sft", cfg.data.split, seed=1234, eval_fraction=0.1)
    assert (len(train), len(ev)) == (54, 6)
    assert stage_line("sft") == "sft: share 2 of 2,4,4 = 60 of 300 rows; trains on 54; 6 held out"


def test_pipeline_still_splits_one_source(tmp_path):
    from forgepipe.config import data_share
    from forgepipe.stages.pipeline import pipeline_configs

    configs = pipeline_configs("m", None, str(tmp_path / "p"), None, {"data.sources": [SAMPLE_PAIRS]})
    assert {stage: cfg.data.split for stage, cfg in configs.items()} == {"sft": "2,4,4", "reward": "2,4,4",
                                                                       "ppo": "2,4,4"}
    rows = {stage: load_stage_data(cfg.data.sources, stage, cfg.data.split, cfg.train.seed, cfg.data.eval_fraction)
            for stage, cfg in configs.items()}
    assert {stage: len(t) + len(e) for stage, (t, e) in rows.items()} == {"sft": 60, "reward": 120, "ppo": 120}
    dpo = pipeline_configs("m", None, str(tmp_path / "d"), None, {}, method="dpo")
    assert [cfg.data.split for cfg in dpo.values()] == ["2,4,4", "2,4,4"] and data_share("dpo") == "reward"
    # The YAML and the command line still choose the pipeline's split.
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("data: {split: '1,1,2'}\nstages: {reward: {data: {split: '0,1,0'}}}\n")
    configs = pipeline_configs("m", None, str(tmp_path / "y"), str(yaml_file), {})
    assert [cfg.data.split for cfg in configs.values()] == ["1,1,2", "0,1,0", "1,1,2"]
    splits = {stage: cfg.data.split for stage, cfg in pipeline_configs(
        "m", None, str(tmp_path / "c"), None, {"data.split": "2,8,0"}, method="dpo").items()}
    assert splits == {"sft": "2,8,0", "dpo": "2,8,0"}


def test_the_resolved_split_resumes_and_an_old_default_is_named():
    """The same command twice has the same fingerprint; a checkpoint of the old default (2,4,4 for a
    stage alone) is refused naming --data-split, which brings its rows back when given."""
    from forgepipe.config import build_config
    from forgepipe.preflight import config_changes, resume_changes

    first, again = (build_config("reward", None, {"data.sources": [SAMPLE_PAIRS]}).flat() for _ in range(2))
    assert config_changes(first, again) == ({}, {})
    old = {**first, "data.split": "2,4,4"}
    with pytest.raises(ForgeError, match=r"--data-split cannot change on resume .*'2,4,4', this run has '0,1,0'"):
        resume_changes({"config": old, "world_size": 1}, first, 1, "ckpt")
    given = build_config("reward", None, {"data.sources": [SAMPLE_PAIRS], "data.split": "2,4,4"}).flat()
    assert resume_changes({"config": old, "world_size": 1}, given, 1, "ckpt") == {}


def test_stage_line_accounts_for_every_row(tmp_path):
    """trained on + held out + dropped = the rows (or the share); tokenization drops join by fingerprint."""
    from forgepipe.data.ledger import record_dropped, stage_line

    path = tmp_path / "mixed.jsonl"
    path.write_text(Path(SAMPLE_PAIRS).read_text() + json.dumps({"prompt": "p", "response": "r"}) + "\n")
    train, ev = load_stage_data([str(path)], "sft", None, seed=0, eval_fraction=0.1, eval_max_samples=20)
    assert (len(train), len(ev)) == (270, 20)
    record_dropped(train, {"too long for --max-seq-len 64": 7, "never": 0})
    record_dropped(ev, {"too long for --max-seq-len 64": 1})
    assert stage_line("sft") == (
        "sft: trains on 263 of 301 rows (19 dropped: 10 held-out rows past --eval-max-samples 20, "
        "8 too long for --max-seq-len 64, 1 a {prompt, response} record where the file's format is "
        "{prompt, chosen, rejected}); 19 held out")
    load_stage_data([str(path)], "reward", "2,4,4", seed=0, eval_fraction=0.1)
    assert stage_line("dpo") == (  # dpo reads the reward share
        "dpo: share 4 of 2,4,4 = 120 of 301 rows (1 dropped before the split: 1 a {prompt, response} record "
        "where the file's format is {prompt, chosen, rejected}); trains on 108; 12 held out")
    load_stage_data([SAMPLE_DOCS, SAMPLE_PAIRS], "ppo", None, seed=0, eval_fraction=0.1)
    assert stage_line("ppo") == "ppo: trains on 270 of 360 rows (60 dropped: 60 no prompt ({text} rows)); 30 held out"


def test_a_stage_logs_its_data_line_before_it_trains(tiny_model, tmp_path):
    """CLI: `forgepipe sft` alone reads all of the file, says so in one line, and an explicit
    --data-split is obeyed and named. (--packing with a batch larger than the data stops the stage
    after tokenization, before any model is built: the cheapest path past the data line.)"""
    from conftest import run_forgepipe

    def sft(*extra):
        out = tmp_path / f"out{len(extra)}"
        return run_forgepipe(["sft", "--model", str(tiny_model), "--data", str(SAMPLE_PAIRS), "--output-dir", str(out),
                              "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--torch-adam", "--dtype", "fp32",
                              "--zero-stage", "0", "--packing", "--per-device-batch-size", "1000", *extra], timeout=300)

    proc = sft()
    assert proc.returncode == 2 and "shorter than one optimizer step" in proc.stderr, proc.stderr[-2000:]
    assert "sft: trains on 270 of 300 rows; 30 held out" in proc.stderr
    proc = sft("--data-split", "2,4,4")
    assert "sft: share 2 of 2,4,4 = 60 of 300 rows; trains on 54; 6 held out" in proc.stderr, proc.stderr[-2000:]


def test_ppo_alone_with_unsupervised_documents_passes_the_checks():
    from forgepipe.config import build_config
    from forgepipe.preflight import check_data

    check_data(build_config("ppo", None, {"data.sources": [SAMPLE_PAIRS], "data.unsupervised_sources": [SAMPLE_DOCS],
                                          "ppo.ptx_coef": 0.1}))

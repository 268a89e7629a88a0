"""Loading sources: every file kind, saved datasets, and one-line errors that name the culprit."""

import gzip
import json

import datasets
import pytest

from forgepipe.data.sources import load_source
from forgepipe.errors import ForgeError

ROWS = [{"prompt": "p1", "response": "r1"}, {"prompt": "p2", "response": "r2"}]


def write_jsonl(path, rows, opener=open):
    with opener(path, "wt") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path


@pytest.mark.parametrize("name", ["d.jsonl", "d.jsonl.gz"])
def test_jsonl_plain_and_gzipped(tmp_path, name):
    opener = gzip.open if name.endswith(".gz") else open
    ds = load_source(str(write_jsonl(tmp_path / name, ROWS, opener)))
    assert ds.to_list() == ROWS


def test_json_list_and_parquet(tmp_path):
    (tmp_path / "d.json").write_text(json.dumps(ROWS))
    assert load_source(str(tmp_path / "d.json")).to_list() == ROWS
    datasets.Dataset.from_list(ROWS).to_parquet(str(tmp_path / "d.parquet"))
    assert load_source(str(tmp_path / "d.parquet")).to_list() == ROWS


def test_saved_dataset_and_datasetdict(tmp_path):
    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "one"))
    assert load_source(str(tmp_path / "one")).to_list() == ROWS
    dd = datasets.DatasetDict(train=datasets.Dataset.from_list(ROWS[:1]), test=datasets.Dataset.from_list(ROWS[1:]))
    dd.save_to_disk(str(tmp_path / "dict"))
    assert load_source(str(tmp_path / "dict")).to_list() == ROWS[:1]  # the train split
    dd = datasets.DatasetDict(b=datasets.Dataset.from_list(ROWS[1:]), a=datasets.Dataset.from_list(ROWS[:1]))
    dd.save_to_disk(str(tmp_path / "nosplit"))
    assert load_source(str(tmp_path / "nosplit")).to_list() == ROWS  # all splits, by name


def test_missing_file_is_named(tmp_path):
    missing = str(tmp_path / "nope.jsonl")
    with pytest.raises(ForgeError, match=f"data source '{missing}': file not found"):
        load_source(missing)
    with pytest.raises(ForgeError, match="'data/sub/x.parquet': file not found"):
        load_source("data/sub/x.parquet")


def test_malformed_line_names_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "a"}\n\n{"text": "b"}\n{"text": "c"\n{"text": "d"}\n')
    with pytest.raises(ForgeError) as info:
        load_source(str(path))
    assert str(info.value).startswith(f"{path}:4: invalid JSON (")


def test_line_that_is_not_an_object(tmp_path):
    path = write_jsonl(tmp_path / "list.jsonl.gz", [{"text": "a"}, [1, 2]], gzip.open)
    with pytest.raises(ForgeError, match=r"list.jsonl.gz:2: invalid JSON \(expected an object, got list\)"):
        load_source(str(path))


def test_hub_name_offline(monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(ForgeError, match=r"^data source 'someone/no-such-set': not a local file or directory, "
                                         r"and the Hub could not be reached .*\(.+\)$"):
        load_source("someone/no-such-set")


def test_unknown_suffix_and_plain_directory(tmp_path):
    (tmp_path / "d.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ForgeError, match="unknown file type .csv"):
        load_source(str(tmp_path / "d.csv"))
    with pytest.raises(ForgeError, match="not one written by datasets' save_to_disk"):
        load_source(str(tmp_path))

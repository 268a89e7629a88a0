"""Data sources that are no file to read (issue 22 item 14): a FIFO, socket or device is refused from
stat() alone, before anything opens it (an open() would block, retried through Slurm's stop signal);
a directory is checked from its file names and small JSON files, in the pre-launch checks and again
by the loader, instead of after datasets tried for 23-91 s. Fast: no process, no training."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import datasets
import pytest

from forgepipe.data.sources import load_source
from forgepipe.errors import ForgeError
from forgepipe.preflight import data_dir_problem, source_kind_problem


def test_special_files_are_refused_without_opening_them(tmp_path):
    pipe = tmp_path / "pipe.jsonl"
    os.mkfifo(pipe)
    assert "a FIFO (named pipe), not a regular file or directory" in source_kind_problem(pipe, str(pipe))
    with pytest.raises(ForgeError, match="a FIFO"):
        load_source(str(pipe))  # would block forever if it opened the pipe
    assert "a character device" in source_kind_problem(Path("/dev/null"), "/dev/null")
    sock_path = tmp_path / "s.jsonl"
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(sock_path))
        assert "a socket" in source_kind_problem(sock_path, str(sock_path))
    data = tmp_path / "ok.jsonl"
    data.write_text('{"text": "a"}\n')
    assert source_kind_problem(data, str(data)) is None
    assert source_kind_problem(tmp_path, str(tmp_path)) is None
    assert source_kind_problem(tmp_path / "absent", "absent") is None  # said by the checks that follow


def test_saved_data_sets_pass_and_other_directories_are_said_as_such(tmp_path):
    ds = datasets.Dataset.from_dict({"text": ["a", "b"]})
    ds.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "dict"))
    assert data_dir_problem(tmp_path / "saved", "saved") is None
    assert data_dir_problem(tmp_path / "dict", "dict") is None
    assert len(load_source(str(tmp_path / "dict"))) == 2

    (tmp_path / "empty").mkdir()
    assert data_dir_problem(tmp_path / "empty", "empty") == (
        "data source 'empty': an empty directory, not a data set saved by datasets' save_to_disk")
    with pytest.raises(ForgeError, match="an empty directory"):
        load_source(str(tmp_path / "empty"))
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("x")
    assert "a directory, but not one written by datasets' save_to_disk (no dataset_dict.json" in data_dir_problem(
        tmp_path / "junk", "junk")
    files = tmp_path / "files"
    files.mkdir()
    for name in ("a.jsonl", "b.parquet", "c.json.gz", "d.json"):
        (files / name).write_text("")
    assert f"a directory of data files (a.jsonl, b.parquet, c.json.gz and 1 more), not a data set saved by " \
           f"datasets' save_to_disk; give the files themselves: --data {files}/a.jsonl --data ..." in \
           data_dir_problem(files, "files")

    arrow = next((tmp_path / "saved").glob("*.arrow"))
    arrow.unlink()
    assert f"a saved data set that is incomplete: {arrow} is missing" in data_dir_problem(tmp_path / "saved", "saved")
    (tmp_path / "dict" / "train" / "state.json").unlink()
    assert "a saved DatasetDict whose split 'train' is incomplete" in data_dir_problem(tmp_path / "dict", "dict")
    (tmp_path / "dict" / "dataset_dict.json").write_text("{oops")
    assert "dataset_dict.json is unreadable" in data_dir_problem(tmp_path / "dict", "dict")

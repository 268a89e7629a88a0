"""Turn a data source string into a `datasets.Dataset`, or a one-line ForgeError.

A source is one of:
- a local file: `.jsonl`, `.json`, `.parquet`, or `.jsonl.gz` / `.json.gz`;
- a directory written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk`. For a DatasetDict
  the "train" split is used; without one, all splits are concatenated (in name order). Any other
  directory (empty, or holding data files) is refused at once, naming the files it holds;
Anything else that exists (a FIFO, a socket, a device) is refused before it is opened.
- a Hub data set name (its "train" split). Compute nodes usually have no internet: set
  HF_DATASETS_OFFLINE=1 there so a Hub name fails at once instead of after retries.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import datasets

from forgepipe.data.formats import read_errors, read_failure
from forgepipe.data.paths import JSON_SUFFIXES, PARQUET_SUFFIXES, file_suffix, looks_like_path
from forgepipe.errors import ForgeError


def find_bad_json_line(path: Path) -> str | None:
    """`path:LINE: invalid JSON (...)` for the first line that is not a JSON object, or why the file
    cannot be read through (a truncated or corrupt gzip stream), else None.

    datasets' own error does not name the line, so we rescan the file after it fails.
    """
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    number = 0
    try:
        with opener(path, "rt", encoding="utf-8", errors="replace") as f:
            if path.name.lower().endswith((".json", ".json.gz")):
                # A .json file may be one JSON document (a list of records) rather than lines.
                text = f.read()
                try:
                    json.loads(text)
                    return None
                except json.JSONDecodeError:
                    lines = text.splitlines()
            else:
                lines = f
            for number, line in enumerate(lines, start=1):
                if not line.strip():
                    continue
                try:
                    value = json.loads(line)
                except json.JSONDecodeError as exc:
                    return f"{path}:{number}: invalid JSON ({exc.msg} at column {exc.colno})"
                if not isinstance(value, dict):
                    return f"{path}:{number}: invalid JSON (expected an object, got {type(value).__name__})"
    except read_errors() as exc:  # a gzip stream cut short or corrupt: that is what is wrong
        return read_failure(path, exc, number)
    return None


def _load_json(path: Path) -> datasets.Dataset:
    try:
        return datasets.load_dataset("json", data_files=str(path), split="train")
    except Exception as exc:  # datasets wraps parser errors in DatasetGenerationError
        bad = find_bad_json_line(path)
        if bad:
            raise ForgeError(bad) from None
        cause = exc.__cause__ or exc
        raise ForgeError(f"{path}: cannot be read as JSON records ({type(cause).__name__}: "
                         f"{str(cause).splitlines()[0] if str(cause) else ''})") from None


def _load_parquet(path: Path) -> datasets.Dataset:
    try:
        return datasets.load_dataset("parquet", data_files=str(path), split="train")
    except Exception as exc:
        cause = exc.__cause__ or exc
        raise ForgeError(f"{path}: not a readable Parquet file ({type(cause).__name__})") from None


def _load_saved(path: Path) -> datasets.Dataset:
    try:
        saved = datasets.load_from_disk(str(path))
    except FileNotFoundError:
        raise ForgeError(
            f"data source '{path}': a directory, but not one written by datasets' save_to_disk"
        ) from None
    if isinstance(saved, datasets.DatasetDict):
        if "train" in saved:
            return saved["train"]
        if not saved:
            raise ForgeError(f"data source '{path}': the saved DatasetDict has no splits")
        return datasets.concatenate_datasets([saved[name] for name in sorted(saved)])
    return saved


def _load_hub(source: str) -> datasets.Dataset:
    try:
        ds = datasets.load_dataset(source, split="train")
    except Exception as exc:
        offline = " (offline mode is on: HF_DATASETS_OFFLINE/HF_HUB_OFFLINE)" if datasets.config.HF_HUB_OFFLINE else ""
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ForgeError(
            f"data source '{source}': not a local file or directory, and the Hub could not be reached"
            f"{offline} ({reason})"
        ) from None
    return ds


def load_source(source: str) -> datasets.Dataset:
    """Load one source as a Dataset; every failure is a ForgeError naming the source."""
    from forgepipe.preflight import data_dir_problem, source_kind_problem

    path = Path(source).expanduser()
    problem = source_kind_problem(path, source)  # a FIFO, socket or device: never opened (it would block)
    if problem:
        raise ForgeError(problem)
    if path.is_dir():
        problem = data_dir_problem(path, source)  # said from its file names, not after datasets tried
        if problem:
            raise ForgeError(problem)
        return _load_saved(path)
    if path.is_file():
        suffix = file_suffix(path)
        if suffix in JSON_SUFFIXES:
            return _load_json(path)
        if suffix in PARQUET_SUFFIXES:
            return _load_parquet(path)
        raise ForgeError(
            f"data source '{source}': unknown file type {suffix or '(none)'} "
            f"(expected .jsonl, .json, .parquet, .jsonl.gz, .json.gz)"
        )
    if looks_like_path(source):
        raise ForgeError(f"data source '{source}': file not found")
    return _load_hub(source)

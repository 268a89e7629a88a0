"""What a data source's name says about it, without reading it: the one rule that the pre-launch
checks (preflight.py, no `datasets` import) and the loaders (sources.py) share."""

from __future__ import annotations

from pathlib import Path

JSON_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz")
PARQUET_SUFFIXES = (".parquet",)


def file_suffix(path: Path) -> str:
    """The data suffix of a file name, compound ones (.jsonl.gz) included."""
    name = path.name.lower()
    for suffix in (*JSON_SUFFIXES, *PARQUET_SUFFIXES):
        if name.endswith(suffix):
            return suffix
    return path.suffix.lower()


def looks_like_path(source: str) -> bool:
    """A string the user meant as a local path (so a miss is 'not found', not a Hub lookup)."""
    return (
        source.startswith(("/", "./", "../", "~"))
        or file_suffix(Path(source)) in (*JSON_SUFFIXES, *PARQUET_SUFFIXES)
        or source.count("/") > 1
    )

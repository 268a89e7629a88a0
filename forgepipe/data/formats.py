"""Recognise a data set's format by its columns and normalise it to one shape.

Every normalised row has `prompt: str`, `chosen: str`, `rejected: str | None` and `kind`:

    {prompt, chosen, rejected}   -> kind "pair"
    HH-RLHF {chosen, rejected}   -> kind "pair"; prompt = the shared dialogue up to and including
                                    the last "\\n\\nAssistant:", responses = what follows it
    {prompt, response}           -> kind "response" (chosen = response, rejected = None)
    {text}                       -> kind "text" (prompt = "", chosen = text): loss on all of it

Rows that cannot be normalised (an HH dialogue with no "\\n\\nAssistant:", sides that do not
share the prompt, a missing value) are dropped and counted, never fatal.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import datasets

from forgepipe.errors import ForgeError

log = logging.getLogger(__name__)

ASSISTANT = "\n\nAssistant:"

# Checked in this order: the first format whose fields are all present wins.
FORMATS: dict[str, tuple[str, ...]] = {
    "pair": ("prompt", "chosen", "rejected"),
    "hh": ("chosen", "rejected"),
    "response": ("prompt", "response"),
    "text": ("text",),
}
ACCEPTED = "{prompt, chosen, rejected}, HH {chosen, rejected}, {prompt, response}, {text}"

FEATURES = datasets.Features(
    {
        "prompt": datasets.Value("string"),
        "chosen": datasets.Value("string"),
        "rejected": datasets.Value("string"),
        "kind": datasets.Value("string"),
    }
)


def detect_format(columns: Sequence[str], source: str) -> str:
    """The format name ("pair", "hh", "response", "text") for these columns, or a ForgeError."""
    for name, fields in FORMATS.items():
        if all(f in columns for f in fields):
            return name
    raise ForgeError(
        f"{source}: records have fields ({', '.join(columns) or 'none'}); expected one of {ACCEPTED}"
    )


def split_hh(chosen: str, rejected: str) -> tuple[str, str, str] | None:
    """(prompt, chosen response, rejected response) of an HH pair, or None if it does not split.

    The prompt ends with the last "\\n\\nAssistant:" and must be the same on both sides.
    """
    if not isinstance(chosen, str) or not isinstance(rejected, str):
        return None
    cut_c, cut_r = chosen.rfind(ASSISTANT), rejected.rfind(ASSISTANT)
    if cut_c < 0 or cut_r < 0:
        return None
    prompt = chosen[: cut_c + len(ASSISTANT)]
    if rejected[: cut_r + len(ASSISTANT)] != prompt:
        return None
    return prompt, chosen[cut_c + len(ASSISTANT) :], rejected[cut_r + len(ASSISTANT) :]


def _normalise_batch(batch: dict[str, list], fmt: str, keep: Sequence[str]) -> dict[str, list]:
    out: dict[str, list] = {"prompt": [], "chosen": [], "rejected": [], "kind": []}
    out.update({k: [] for k in keep})
    n = len(next(iter(batch.values())))
    for i in range(n):
        if fmt == "hh":
            row = split_hh(batch["chosen"][i], batch["rejected"][i])
            kind = "pair"
        elif fmt == "pair":
            row = (batch["prompt"][i], batch["chosen"][i], batch["rejected"][i])
            kind = "pair"
        elif fmt == "response":
            row = (batch["prompt"][i], batch["response"][i], None)
            kind = "response"
        else:
            row = ("", batch["text"][i], None)
            kind = "text"
        if row is None or not all(isinstance(v, str) for v in row[:2]) or (
            kind == "pair" and not isinstance(row[2], str)
        ):
            continue
        for key, value in zip(("prompt", "chosen", "rejected", "kind"), (*row, kind), strict=True):
            out[key].append(value)
        for k in keep:
            out[k].append(batch[k][i])
    return out


def normalise(
    ds: datasets.Dataset, source: str, keep: Sequence[str] = ()
) -> tuple[datasets.Dataset, int]:
    """(normalised dataset, number of rows dropped). `keep` names extra columns to carry through
    (e.g. a reward margin field); a missing one is a ForgeError."""
    fmt = detect_format(ds.column_names, source)
    for k in keep:
        if k not in ds.column_names:
            raise ForgeError(f"{source}: no field {k!r} (fields: {', '.join(ds.column_names)})")
    features = datasets.Features({**FEATURES, **{k: ds.features[k] for k in keep}})
    out = ds.map(
        _normalise_batch,
        batched=True,
        fn_kwargs={"fmt": fmt, "keep": tuple(keep)},
        remove_columns=ds.column_names,
        features=features,
        desc=f"normalising {source}",
    )
    dropped = len(ds) - len(out)
    if dropped:
        log.info("%s: dropped %d of %d rows that do not fit the %s format", source, dropped, len(ds), fmt)
    return out, dropped


def require_pairs(ds: datasets.Dataset, source: str) -> None:
    """Stage reward needs chosen/rejected pairs: check a source's raw (un-normalised) columns."""
    if detect_format(ds.column_names, source) not in ("pair", "hh"):
        raise ForgeError(
            f"{source}: no chosen/rejected pairs (fields: {', '.join(ds.column_names)}); "
            "stage reward needs {prompt, chosen, rejected} or HH {chosen, rejected}"
        )

"""Recognise a data set's format by its columns and normalise it to one shape.

Every normalised row has `prompt: str`, `chosen: str`, `rejected: str | None` and `kind`:

    {prompt, chosen, rejected}   -> kind "pair"
    HH-RLHF {chosen, rejected}   -> kind "pair"; prompt = the shared dialogue up to and including
                                    the last "\\n\\nAssistant:", responses = what follows it
    {prompt, response}           -> kind "response" (chosen = response, rejected = None)
    {text}                       -> kind "text" (prompt = "", chosen = text): loss on all of it
    {messages}                   -> kind "response": the last message is the assistant's response

Chat-format records (TRL's conversational formats) have message lists where the text formats have
strings: {prompt: [messages], chosen, rejected} with chosen/rejected a one-message list or the
assistant's text, and {chosen: [messages], rejected: [messages]} sharing all but the last message
(the implicit prompt, like HH). Their rows carry the prompt conversation as JSON in `messages`
(empty for text rows) and its HH text form in `prompt`, so they also serve a model without a chat
template; responses follow HH's convention of a leading space (chat_template.py).

Rows that cannot be normalised (an HH dialogue with no "\\n\\nAssistant:", sides that do not
share the prompt, a missing value, a record of another format in a mixed file) are dropped,
counted per reason with an example line (`DropReport`), warned about, logged to MLflow, and fatal
above `--max-dropped-fraction` (data/__init__.py).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from forgepipe.data.chat_template import check_messages, hh_response, hh_text, plain_messages
from forgepipe.errors import ForgeError

if TYPE_CHECKING:  # datasets is imported where it is used: the pre-launch checks read rows without it
    import datasets

log = logging.getLogger(__name__)

ASSISTANT = "\n\nAssistant:"

# Checked in this order: the first format whose fields are all present wins.
FORMATS: dict[str, tuple[str, ...]] = {
    "pair": ("prompt", "chosen", "rejected"),
    "hh": ("chosen", "rejected"),
    "response": ("prompt", "response"),
    "messages": ("messages",),
    "text": ("text",),
}
ACCEPTED = "{prompt, chosen, rejected}, HH {chosen, rejected}, {prompt, response}, {messages}, {text}"

NORMALISED_COLUMNS = ("prompt", "chosen", "rejected", "kind", "messages")
Row = tuple[str, str, "str | None", str, str]  # prompt, chosen, rejected, kind, messages (JSON or "")


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


def row_format(row: dict) -> str | None:
    """The format a single record's non-empty fields fit (a row of a mixed-format file), if any."""
    present = [k for k, v in row.items() if v is not None]
    for name, fields in FORMATS.items():
        if all(f in present for f in fields):
            return name
    return None


def _chat_response(value, what: str) -> tuple[str | None, str]:
    """(content, "") of a chosen/rejected side given as text or as one assistant message."""
    if isinstance(value, str):
        return value, ""
    why = check_messages(value, what)
    if why:
        return None, why
    if len(value) != 1 or value[0]["role"] != "assistant":
        return None, f"{what} is not one assistant message"
    return value[0]["content"], ""


def _chat_row(prompt: list[dict], chosen: str, rejected: str | None, kind: str) -> Row:
    """A chat record's normalised row: HH text prompt, HH-style responses, the conversation as JSON."""
    messages = plain_messages(prompt)
    return (hh_text(messages), hh_response(chosen), None if rejected is None else hh_response(rejected), kind,
            json.dumps(messages, ensure_ascii=False))


def normalise_chat_row(row: dict, fmt: str) -> tuple[Row | None, str] | None:
    """The normalised row of a chat-format record (message lists where text formats have strings),
    (None, why) if it is a broken one, None if it is not a chat record at all."""
    if fmt == "messages":
        messages = row.get("messages")
        why = check_messages(messages, "'messages'")
        if why:
            return None, why
        if messages[-1]["role"] != "assistant" or len(messages) < 2:
            return None, "'messages' does not end with an assistant message after a prompt"
        return _chat_row(messages[:-1], messages[-1]["content"], None, "response"), ""
    if fmt == "pair" and isinstance(row.get("prompt"), list):
        why = check_messages(row["prompt"], "'prompt'")
        if why:
            return None, why
        (chosen, why_c), (rejected, why_r) = (_chat_response(row.get("chosen"), "'chosen'"),
                                              _chat_response(row.get("rejected"), "'rejected'"))
        if why_c or why_r:
            return None, why_c or why_r
        return _chat_row(row["prompt"], chosen, rejected, "pair"), ""
    if fmt == "hh" and isinstance(row.get("chosen"), list) and isinstance(row.get("rejected"), list):
        chosen, rejected = row["chosen"], row["rejected"]
        why = check_messages(chosen, "'chosen'") or check_messages(rejected, "'rejected'")
        if why:
            return None, why
        if chosen[-1]["role"] != "assistant" or rejected[-1]["role"] != "assistant":
            return None, "a conversation does not end with an assistant message"
        if plain_messages(chosen[:-1]) != plain_messages(rejected[:-1]) or len(chosen) < 2:
            return None, "chosen and rejected conversations do not share the prompt"
        return _chat_row(chosen[:-1], chosen[-1]["content"], rejected[-1]["content"], "pair"), ""
    return None


def normalise_row(row: dict, fmt: str) -> tuple[Row | None, str]:
    """((prompt, chosen, rejected, kind, messages), "") for a row that fits `fmt`, else (None, why it
    was dropped)."""
    chat = normalise_chat_row(row, fmt)
    if chat is not None:
        return chat
    if fmt == "hh":
        chosen, rejected = row.get("chosen"), row.get("rejected")
        if isinstance(chosen, str) and isinstance(rejected, str):
            if chosen.rfind(ASSISTANT) < 0 or rejected.rfind(ASSISTANT) < 0:
                return None, "HH dialogue without an '\\n\\nAssistant:' turn"
            split = split_hh(chosen, rejected)
            if split is None:
                return None, "HH chosen and rejected do not share the prompt"
            return (*split, "pair", ""), ""
        fields = ("chosen", "rejected")
    elif fmt == "pair":
        fields = ("prompt", "chosen", "rejected")
    elif fmt == "response":
        fields = ("prompt", "response")
    elif fmt == "messages":
        fields = ("messages",)
    else:
        fields = ("text",)
    values = [row.get(f) for f in fields]
    bad = [f for f, v in zip(fields, values, strict=True) if not isinstance(v, str)]
    if bad:
        other = row_format(row)
        if other is not None and other != fmt:
            return None, f"a {FORMAT_NAMES[other]} record where the file's format is {FORMAT_NAMES[fmt]}"
        missing = [f for f in bad if row.get(f) is None]
        if missing:
            return None, f"no value for {', '.join(repr(f) for f in missing)}"
        return None, f"{bad[0]!r} is not text"
    if fmt == "pair":
        return (values[0], values[1], values[2], "pair", ""), ""
    if fmt == "response":
        return (values[0], values[1], None, "response", ""), ""
    return ("", values[0], None, "text", ""), ""


FORMAT_NAMES = {"pair": "{prompt, chosen, rejected}", "hh": "HH {chosen, rejected}",
                "response": "{prompt, response}", "messages": "{messages}", "text": "{text}"}


def _normalise_batch(batch: dict[str, list], indices: list[int], fmt: str, keep: Sequence[str]) -> dict[str, list]:
    out: dict[str, list] = {**{c: [] for c in NORMALISED_COLUMNS}, "_drop": [], "_row": []}
    out.update({k: [] for k in keep})
    columns = list(batch)
    for i, index in enumerate(indices):
        row, why = normalise_row({c: batch[c][i] for c in columns}, fmt)
        for key, value in zip(NORMALISED_COLUMNS, row or ("", "", None, "", ""), strict=True):
            out[key].append(value)
        out["_drop"].append(why)
        out["_row"].append(index)
        for k in keep:
            out[k].append(batch[k][i])
    return out


@dataclass
class DropReport:
    """Rows of one source that no format fits: counts per reason, and the first row of each (0-based)."""

    source: str
    total: int = 0
    reasons: dict[str, list[int]] = field(default_factory=dict)  # reason -> [count, first row index]

    @property
    def dropped(self) -> int:
        return sum(count for count, _ in self.reasons.values())

    def add(self, reason: str, row: int) -> None:
        entry = self.reasons.setdefault(reason, [0, row])
        entry[0] += 1

    def where(self, row: int) -> str:
        """'file:LINE' of a row (JSONL: the row-th non-blank line), else 'record N'."""
        line = jsonl_line_of(self.source, row)
        return f"{self.source}:{line}" if line else f"{self.source} record {row + 1}"

    def summary(self) -> str:
        parts = [f"{count} {reason} (e.g. {self.where(first)})"
                 for reason, (count, first) in sorted(self.reasons.items(), key=lambda kv: -kv[1][0])]
        return "; ".join(parts)

    def to_dict(self) -> dict:
        return {"source": self.source, "rows": self.total, "dropped": self.dropped,
                "reasons": {r: {"count": c, "example": self.where(first)} for r, (c, first) in self.reasons.items()}}


def read_failure(path, exc: BaseException, lines_read: int = 0) -> str:
    """One line for a data file whose reading failed part-way: a gzip stream cut short (EOFError)
    or corrupt (gzip.BadGzipFile, zlib.error), or an I/O error. Names the file and the last line read."""
    import gzip
    import zlib

    where = f" after line {lines_read}" if lines_read else ""
    detail = str(exc).strip() or type(exc).__name__
    if isinstance(exc, EOFError):
        return f"{path}: truncated gzip file, its data ends{where} ({detail}); copy or compress it again"
    if isinstance(exc, (gzip.BadGzipFile, zlib.error)):
        return f"{path}: corrupt gzip data{where} ({detail})"
    if isinstance(exc, OSError):
        return f"{path}: cannot be read{where} ({exc.strerror or detail})"
    return f"{path}: cannot be read{where} ({type(exc).__name__}: {detail})"


def read_errors() -> tuple[type[BaseException], ...]:
    """What reading a (gzip) data file can raise besides a decoding error: caught and said in one line."""
    import zlib

    return (OSError, EOFError, zlib.error)


def jsonl_line_of(source: str, row: int) -> int | None:
    """The 1-based line of the row-th record of a JSON-lines file (blank lines skipped), or None."""
    import gzip
    from pathlib import Path

    path = Path(source)
    name = path.name.lower()
    if not path.is_file() or not name.endswith((".jsonl", ".jsonl.gz")):
        return None
    opener = gzip.open if name.endswith(".gz") else open
    seen = -1
    try:
        with opener(path, "rt", encoding="utf-8", errors="replace") as f:
            for number, line in enumerate(f, start=1):
                if line.strip():
                    seen += 1
                    if seen == row:
                        return number
    except read_errors():  # a file cut short after the rows that were read: no line to name
        return None
    return None


def normalise(
    ds: datasets.Dataset, source: str, keep: Sequence[str] = (), report: DropReport | None = None
) -> tuple[datasets.Dataset, int]:
    """(normalised dataset, number of rows dropped). `keep` names extra columns to carry through
    (e.g. a reward margin field); a missing one is a ForgeError. Dropped rows are counted per
    reason into `report` and logged as a warning with an example line."""
    import datasets

    fmt = detect_format(ds.column_names, source)
    for k in keep:
        if k not in ds.column_names:
            raise ForgeError(f"{source}: no field {k!r} (fields: {', '.join(ds.column_names)})")
    string = datasets.Value("string")
    features = datasets.Features({**{c: string for c in NORMALISED_COLUMNS}, "_drop": datasets.Value("string"), "_row": datasets.Value("int64"),
                                  **{k: ds.features[k] for k in keep}})
    marked = ds.map(
        _normalise_batch,
        batched=True,
        with_indices=True,
        fn_kwargs={"fmt": fmt, "keep": tuple(keep)},
        remove_columns=ds.column_names,
        features=features,
        desc=f"normalising {source}",
    )
    report = report if report is not None else DropReport(source)
    report.total = len(ds)
    drops = marked["_drop"][:]
    for index, why in enumerate(drops):
        if why:
            report.add(why, index)
    out = marked.select([i for i, why in enumerate(drops) if not why]) if report.dropped else marked
    out = out.remove_columns(["_drop", "_row"])
    dropped = report.dropped
    if dropped:
        log.warning("%s: dropped %d of %d rows (%s format): %s", source, dropped, len(ds), FORMAT_NAMES[fmt],
                    report.summary())
    return out, dropped


DEFAULT_MAX_DROPPED_FRACTION = 0.1


def check_dropped(report: DropReport, max_fraction: float) -> None:
    """A source losing more than `max_fraction` of its rows is an error, not a warning."""
    if report.total and report.dropped == report.total:
        raise ForgeError(f"{report.source}: no usable rows, all {report.total} dropped: {report.summary()}")
    if report.total and report.dropped / report.total > max_fraction:
        raise ForgeError(
            f"{report.source}: {report.dropped} of {report.total} rows ({report.dropped / report.total:.0%}) dropped, "
            f"more than --max-dropped-fraction {max_fraction:g}: {report.summary()}"
        )


def require_pairs(ds: datasets.Dataset, source: str, stage: str = "reward") -> None:
    """The preference stages (reward, dpo) need chosen/rejected pairs: check a source's raw columns."""
    require_pairs_columns(ds.column_names, source, stage)


def require_pairs_columns(columns: Sequence[str], source: str, stage: str = "reward") -> None:
    if detect_format(columns, source) not in ("pair", "hh"):
        raise ForgeError(
            f"{source}: no chosen/rejected pairs (fields: {', '.join(columns)}); "
            f"stage {stage} needs {{prompt, chosen, rejected}} or HH {{chosen, rejected}}"
        )

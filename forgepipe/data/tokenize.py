"""Batched tokenization of normalised rows, cached on disk under a content key.

Without a chat template the text is a raw concatenation: prompt + response + EOS (HH prompts
already end with "\\n\\nAssistant:"). With one (`chat`, a ChatRender: chat_template.py) the
tokenizer's template renders the conversation, the loss follows its assistant turns and the
template's end-of-turn token takes EOS's place. Prompt and response are tokenized separately so
the loss boundary is exact.

The cache file is `<cache_dir>/<key>.arrow`, key = sha256 of the data fingerprint, the tokenizer
(class, vocabulary, special tokens), TEMPLATE_VERSION, the function and its max lengths; change
any of them and the key changes. Rank 0 builds the file while the other ranks wait, then they all
read it (`main_process_first`). With cache_dir=None nothing is written by us.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import datasets

from forgepipe.data.ledger import record_dropped
from forgepipe.distributed import is_main_process, main_process_first
from forgepipe.errors import ForgeError

if TYPE_CHECKING:
    from forgepipe.data.chat_template import ChatRender

log = logging.getLogger(__name__)

TEMPLATE_VERSION = "raw-concat-v1"  # bump when the way rows become ids changes
IGNORE_INDEX = -100


# ---------------------------------------------------------------------------
# Cache keys


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of what decides the ids: class, vocabulary, special tokens."""
    h = hashlib.sha256()
    h.update(type(tokenizer).__name__.encode())
    h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    specials = {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())}
    h.update(json.dumps(specials).encode())
    h.update(json.dumps([tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id]).encode())
    return h.hexdigest()


def cache_key(ds: datasets.Dataset, tokenizer, **params: Any) -> str:
    """sha256 (64 hex chars, also a valid datasets fingerprint) of data + tokenizer + template + params."""
    payload = {
        "data": ds._fingerprint,
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "template": TEMPLATE_VERSION,
        **params,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _cached_map(
    ds: datasets.Dataset,
    fn: Callable,
    key: str,
    cache_dir: str | Path | None,
    desc: str,
    fn_kwargs: dict[str, Any],
) -> datasets.Dataset:
    kwargs: dict[str, Any] = {}
    if cache_dir is not None:
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        kwargs["cache_file_name"] = str(Path(cache_dir) / f"{key}.arrow")
    with main_process_first(), cache_lock(cache_dir):
        return ds.map(
            fn,
            batched=True,
            remove_columns=ds.column_names,
            fn_kwargs=fn_kwargs,
            new_fingerprint=key,  # no hashing of the tokenizer by datasets
            load_from_cache_file=True,
            desc=desc,
            **kwargs,
        )


@contextlib.contextmanager
def cache_lock(cache_dir: str | Path | None) -> Iterator[None]:
    """Rank 0 writes the cache under an exclusive lock (`<cache_dir>/.lock`, released by the kernel
    if the process dies). Whoever holds it knows nobody is writing, so the temporary files a killed
    run left (datasets writes `tmp*` beside the cache file, then renames it) are removed first."""
    if cache_dir is None or not is_main_process():
        yield
        return
    with open(Path(cache_dir) / ".lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            for orphan in Path(cache_dir).glob("tmp*"):
                if orphan.is_file():
                    orphan.unlink(missing_ok=True)
                    log.info("removed %s, left by an interrupted tokenization", orphan)
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# ---------------------------------------------------------------------------
# Pure row functions (ids in, ids out)


def left_truncate(ids: list[int], budget: int) -> list[int]:
    """The last `budget` ids: a long prompt keeps its end, next to the response."""
    return ids[len(ids) - budget :] if len(ids) > budget else ids


def sft_example(
    prompt_ids: list[int], response_ids: list[int], eos_id: int | None, max_seq_len: int, max_prompt_len: int,
    prompt_labels: list[int] | None = None,
) -> tuple[list[int], list[int]] | None:
    """(input_ids, labels) with labels -100 on the prompt (or `prompt_labels`: earlier assistant turns
    trained too); None when no response token survives. `eos_id` None: the response already ends
    with its end-of-turn token."""
    prompt = left_truncate(prompt_ids, max_prompt_len)
    before = left_truncate(prompt_labels, max_prompt_len) if prompt_labels is not None else [IGNORE_INDEX] * len(prompt)
    ids = (prompt + response_ids + ([] if eos_id is None else [eos_id]))[:max_seq_len]
    if len(ids) <= len(prompt):
        return None
    labels = before + ids[len(prompt) :]
    return ids, labels


def pair_side(
    prompt_ids: list[int], response_ids: list[int], eos_id: int, max_seq_len: int, max_prompt_len: int
) -> list[int]:
    """prompt + response + EOS, cut to max_seq_len with EOS kept last (the score is read there)."""
    ids = left_truncate(prompt_ids, max_prompt_len) + response_ids + [eos_id]
    if len(ids) > max_seq_len:
        ids = ids[: max_seq_len - 1] + [eos_id]
    return ids


def chunk(ids: list[int], size: int, min_len: int = 2) -> list[list[int]]:
    """Consecutive pieces of at most `size` ids; a piece shorter than min_len carries no LM loss."""
    pieces = [ids[i : i + size] for i in range(0, len(ids), size)]
    return [p for p in pieces if len(p) >= min_len]


def _chat_key(chat: ChatRender | None) -> dict[str, str]:
    """The cache-key entry of a chat template (none: the keys of caches made before templates)."""
    return {"chat_template": chat.fingerprint()} if chat is not None else {}


def _ids(tokenizer, texts: list[str]) -> list[list[int]]:
    return tokenizer(list(texts), add_special_tokens=False)["input_ids"]


# Characters of text kept per token of budget before tokenizing: a bound no token's text reaches, so the
# tokens kept after truncation are the same, while a 50 MB record costs milliseconds, not a minute and GBs.
CHARS_PER_TOKEN = 64


def _clipped(texts: list[str], tokens: int, keep_end: bool) -> list[str]:
    """Texts cut to CHARS_PER_TOKEN x `tokens` characters: the end of a prompt (left truncation), the
    start of a response (right truncation)."""
    n = CHARS_PER_TOKEN * tokens
    return [t if len(t) <= n else (t[-n:] if keep_end else t[:n]) for t in texts]


def _eos(tokenizer) -> int:
    if tokenizer.eos_token_id is None:
        raise ForgeError(f"tokenizer {type(tokenizer).__name__} has no eos_token; set one in its config")
    return tokenizer.eos_token_id


# ---------------------------------------------------------------------------
# Batched map functions


def _chat_rows(batch, chat, sides: tuple[str, ...]) -> Iterator[tuple[int, list[dict] | None, list]]:
    """(row index, conversation, [ChatRender.sft_ids of each side]) per row; a row the template
    refuses or cannot mask (it rewrites earlier turns) is skipped, with one warning per batch
    (the callers log how many rows tokenization dropped)."""
    skipped, first = 0, ""
    for i, prompt in enumerate(batch["prompt"]):
        if batch["kind"][i] == "text":  # documents have no turns: loss on all of it, as without a template
            yield i, None, []
            continue
        messages = chat.conversation(prompt, batch["messages"][i] if "messages" in batch else "")
        try:
            yield i, messages, [chat.sft_ids(messages, batch[side][i]) for side in sides]
        except ValueError as exc:
            skipped, first = skipped + 1, first or str(exc)
    if skipped:
        log.warning("%d of %d rows skipped: %s", skipped, len(batch["prompt"]), first)


def _sft_batch(batch, tokenizer, eos_id, max_seq_len, max_prompt_len, chat=None):
    out = {"input_ids": [], "labels": []}

    def add(example):
        if example is not None:
            out["input_ids"].append(example[0])
            out["labels"].append(example[1])

    if chat is None:
        prompts = _ids(tokenizer, _clipped(batch["prompt"], max_prompt_len, keep_end=True))
        for p, r in zip(prompts, _ids(tokenizer, _clipped(batch["chosen"], max_seq_len, keep_end=False)), strict=True):
            add(sft_example(p, r, eos_id, max_seq_len, max_prompt_len))
        return out
    for i, messages, sides in _chat_rows(batch, chat, ("chosen",)):
        if messages is None:
            p, r = _ids(tokenizer, [batch["prompt"][i], batch["chosen"][i]])
            add(sft_example(p, r, eos_id, max_seq_len, max_prompt_len))
            continue
        prefix, prefix_labels, final = sides[0]
        add(sft_example(prefix, final, None, max_seq_len, max_prompt_len, prefix_labels))
    return out


def _pair_ids(batch, tokenizer, chat, max_seq_len: int, max_prompt_len: int):
    """(row index, prompt ids, chosen response ids, rejected response ids) per row."""
    if chat is None:
        prompts = _ids(tokenizer, _clipped(batch["prompt"], max_prompt_len, keep_end=True))
        chosen, rejected = (_ids(tokenizer, _clipped(batch[k], max_seq_len, keep_end=False)) for k in ("chosen", "rejected"))
        yield from zip(range(len(prompts)), prompts, chosen, rejected, strict=True)
        return
    for i, messages, sides in _chat_rows(batch, chat, ("chosen", "rejected")):
        if messages is not None:  # both responses end with the end-of-turn token: pair_side puts it back last
            (prefix, _, c), (_, _, r) = sides
            yield i, prefix, c[:-1], r[:-1]


def _pairs_batch(batch, tokenizer, eos_id, max_seq_len, max_prompt_len, margin_field, with_prompt_len=False,
                 chat=None):
    out = {"chosen_input_ids": [], "rejected_input_ids": []}
    if margin_field:
        out["margin"] = []
    if with_prompt_len:
        out["prompt_len"] = []
    if chat is not None:
        eos_id = chat.end_id  # the reward is read at the template's end-of-turn token
    for i, p, c, r in _pair_ids(batch, tokenizer, chat, max_seq_len, max_prompt_len):
        c_ids = pair_side(p, c, eos_id, max_seq_len, max_prompt_len)
        r_ids = pair_side(p, r, eos_id, max_seq_len, max_prompt_len)
        if c_ids == r_ids:  # truncation left nothing that tells them apart
            continue
        out["chosen_input_ids"].append(c_ids)
        out["rejected_input_ids"].append(r_ids)
        if margin_field:
            out["margin"].append(float(batch[margin_field][i]))
        if with_prompt_len:  # both sides share the prompt; a kept pair has a response token on each side
            out["prompt_len"].append(len(left_truncate(p, max_prompt_len)))
    return out


def scored_sequence(tokenizer, chat: ChatRender | None, prompt: str, messages: str, response: str,
                    max_seq_len: int, max_prompt_len: int) -> list[int]:
    """One side of a pair as the reward stage tokenized it: prompt + response + EOS, or with a chat
    template the rendered conversation ending in its end-of-turn token (`forgepipe score`)."""
    if chat is None:
        p, r = _ids(tokenizer, [prompt, response])
        return pair_side(p, r, _eos(tokenizer), max_seq_len, max_prompt_len)
    try:
        p, _, r = chat.sft_ids(chat.conversation(prompt, messages), response)
    except ValueError as exc:
        raise ForgeError(f"{exc}: {prompt[-80:]!r}") from None
    return pair_side(p, r[:-1], chat.end_id, max_seq_len, max_prompt_len)


def _prompts_batch(batch, tokenizer, max_prompt_len, chat=None):
    if chat is None:
        ids = _ids(tokenizer, batch["prompt"])
    else:  # the conversation and the assistant header: generation continues as the assistant
        messages = batch["messages"] if "messages" in batch else [""] * len(batch["prompt"])
        ids = [chat.prompt_ids(chat.conversation(p, m)) for p, m in zip(batch["prompt"], messages, strict=True)]
    return {"prompt_input_ids": [p for p in ids if 0 < len(p) <= max_prompt_len]}


def _text_batch(batch, tokenizer, eos_id, max_seq_len):
    out = {"input_ids": [], "labels": []}
    texts = [p + c for p, c in zip(batch["prompt"], batch["chosen"], strict=True)]
    for ids in _ids(tokenizer, texts):
        for piece in chunk(ids + [eos_id], max_seq_len):
            out["input_ids"].append(piece)
            out["labels"].append(list(piece))
    return out


# ---------------------------------------------------------------------------
# Public entry points


def tokenize_sft(
    ds: datasets.Dataset,
    tokenizer,
    max_seq_len: int,
    max_prompt_len: int,
    cache_dir: str | Path | None,
    source: str = "the data",
    chat: ChatRender | None = None,
) -> datasets.Dataset:
    """Normalised rows -> {input_ids, labels}; loss on response + EOS (on everything for "text"),
    with a chat template on the assistant's turn(s) and the end-of-turn token."""
    key = cache_key(ds, tokenizer, fn="sft", max_seq_len=max_seq_len, max_prompt_len=max_prompt_len,
                    **_chat_key(chat))
    fn_kwargs = dict(tokenizer=tokenizer, eos_id=_eos(tokenizer), max_seq_len=max_seq_len, max_prompt_len=max_prompt_len,
                     chat=chat)
    out = _cached_map(ds, _sft_batch, key, cache_dir, "tokenizing sft", fn_kwargs)
    too_long = f"too long for --max-seq-len {max_seq_len}" + (" or refused by the chat template" if chat else "")
    record_dropped(ds, {too_long: len(ds) - len(out)})
    if len(ds) and not len(out):
        raise ForgeError(f"--max-seq-len {max_seq_len} is shorter than every prompt in {source}")
    if len(out) < len(ds):
        log.info("%s: dropped %d rows with no response token within --max-seq-len %d",
                 source, len(ds) - len(out), max_seq_len)
    return out


def tokenize_pairs(
    ds: datasets.Dataset,
    tokenizer,
    max_seq_len: int,
    max_prompt_len: int,
    cache_dir: str | Path | None,
    margin_field: str | None = None,
    source: str = "the data",
    with_prompt_len: bool = False,
    chat: ChatRender | None = None,
) -> tuple[datasets.Dataset, int]:
    """Pair rows -> ({chosen_input_ids, rejected_input_ids[, margin][, prompt_len]}, pairs dropped as
    identical). `prompt_len` (DPO) counts the ids before the response, the same on both sides.

    Pairs whose chosen and rejected text are the same teach nothing and are dropped before
    tokenization; pairs that truncation makes identical are dropped too (logged, not counted).
    """
    if margin_field and margin_field not in ds.column_names:
        raise ForgeError(f"--margin-field: {source} has no field {margin_field!r} (fields: {', '.join(ds.column_names)})")
    chosen, rejected = ds["chosen"][:], ds["rejected"][:]
    keep = [i for i, (c, r) in enumerate(zip(chosen, rejected, strict=True)) if c != r]
    n_identical = len(ds) - len(keep)
    given = ds
    if n_identical and not keep:  # else the run fails later, blaming the batch size for an empty share
        raise ForgeError(f"{source}: all {n_identical} pairs have the same chosen and rejected text: nothing to "
                         "prefer")
    if n_identical:
        log.info("%s: dropped %d pairs whose chosen and rejected text are identical", source, n_identical)
        ds = ds.select(keep)
    key = cache_key(ds, tokenizer, fn="pairs", max_seq_len=max_seq_len, max_prompt_len=max_prompt_len,
                    margin_field=margin_field, **({"prompt_len": True} if with_prompt_len else {}), **_chat_key(chat))
    fn_kwargs = dict(tokenizer=tokenizer, eos_id=_eos(tokenizer), max_seq_len=max_seq_len,
                     max_prompt_len=max_prompt_len, margin_field=margin_field, with_prompt_len=with_prompt_len,
                     chat=chat)
    out = _cached_map(ds, _pairs_batch, key, cache_dir, "tokenizing pairs", fn_kwargs)
    record_dropped(given, {"with identical chosen and rejected": n_identical,
                           f"cut to the same ids by --max-seq-len {max_seq_len}": len(ds) - len(out)})
    if len(ds) and not len(out):
        raise ForgeError(f"--max-seq-len {max_seq_len} is shorter than every prompt in {source}")
    if len(out) < len(ds):
        log.info("%s: dropped %d pairs that --max-seq-len %d truncates to the same ids",
                 source, len(ds) - len(out), max_seq_len)
    return out, n_identical


def tokenize_prompts(
    ds: datasets.Dataset,
    tokenizer,
    max_prompt_len: int,
    cache_dir: str | Path | None,
    source: str = "the data",
    chat: ChatRender | None = None,
) -> datasets.Dataset:
    """Rows -> {prompt_input_ids} for generation; prompts over the budget are dropped (and logged),
    not truncated, since a cut prompt asks a different question."""
    key = cache_key(ds, tokenizer, fn="prompts", max_prompt_len=max_prompt_len, **_chat_key(chat))
    out = _cached_map(ds, _prompts_batch, key, cache_dir, "tokenizing prompts",
                      dict(tokenizer=tokenizer, max_prompt_len=max_prompt_len, chat=chat))
    record_dropped(ds, {f"prompt longer than --max-prompt-len {max_prompt_len} (or empty)": len(ds) - len(out)})
    if len(ds) and not len(out):
        raise ForgeError(f"--max-prompt-len {max_prompt_len} is shorter than every prompt in {source}")
    if len(out) < len(ds):
        log.info("%s: dropped %d of %d prompts longer than --max-prompt-len %d (or empty)",
                 source, len(ds) - len(out), len(ds), max_prompt_len)
    return out


def tokenize_text(
    ds: datasets.Dataset,
    tokenizer,
    max_seq_len: int,
    cache_dir: str | Path | None,
) -> datasets.Dataset:
    """Documents -> {input_ids, labels} pieces of at most max_seq_len (PPO's unsupervised term)."""
    key = cache_key(ds, tokenizer, fn="text", max_seq_len=max_seq_len)
    return _cached_map(ds, _text_batch, key, cache_dir, "tokenizing text",
                       dict(tokenizer=tokenizer, eos_id=_eos(tokenizer), max_seq_len=max_seq_len))

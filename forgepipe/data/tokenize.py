"""Batched tokenization of normalised rows, cached on disk under a content key.

The template is a raw concatenation: prompt + response + EOS (HH prompts already end with
"\\n\\nAssistant:"). Prompt and response are tokenized separately so the loss boundary is exact.

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
from typing import Any

import datasets

from forgepipe.distributed import is_main_process, main_process_first
from forgepipe.errors import ForgeError

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
    prompt_ids: list[int], response_ids: list[int], eos_id: int, max_seq_len: int, max_prompt_len: int
) -> tuple[list[int], list[int]] | None:
    """(input_ids, labels) with labels -100 on the prompt; None when no response token survives."""
    prompt = left_truncate(prompt_ids, max_prompt_len)
    ids = (prompt + response_ids + [eos_id])[:max_seq_len]
    if len(ids) <= len(prompt):
        return None
    labels = [IGNORE_INDEX] * len(prompt) + ids[len(prompt) :]
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


def _ids(tokenizer, texts: list[str]) -> list[list[int]]:
    return tokenizer(list(texts), add_special_tokens=False)["input_ids"]


def _eos(tokenizer) -> int:
    if tokenizer.eos_token_id is None:
        raise ForgeError(f"tokenizer {type(tokenizer).__name__} has no eos_token; set one in its config")
    return tokenizer.eos_token_id


# ---------------------------------------------------------------------------
# Batched map functions


def _sft_batch(batch, tokenizer, eos_id, max_seq_len, max_prompt_len):
    out = {"input_ids": [], "labels": []}
    for p, r in zip(_ids(tokenizer, batch["prompt"]), _ids(tokenizer, batch["chosen"]), strict=True):
        example = sft_example(p, r, eos_id, max_seq_len, max_prompt_len)
        if example is not None:
            out["input_ids"].append(example[0])
            out["labels"].append(example[1])
    return out


def _pairs_batch(batch, tokenizer, eos_id, max_seq_len, max_prompt_len, margin_field, with_prompt_len=False):
    out = {"chosen_input_ids": [], "rejected_input_ids": []}
    if margin_field:
        out["margin"] = []
    if with_prompt_len:
        out["prompt_len"] = []
    prompts = _ids(tokenizer, batch["prompt"])
    chosen = _ids(tokenizer, batch["chosen"])
    rejected = _ids(tokenizer, batch["rejected"])
    for i, (p, c, r) in enumerate(zip(prompts, chosen, rejected, strict=True)):
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


def _prompts_batch(batch, tokenizer, max_prompt_len):
    ids = _ids(tokenizer, batch["prompt"])
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
) -> datasets.Dataset:
    """Normalised rows -> {input_ids, labels}; loss on response + EOS (on everything for "text")."""
    key = cache_key(ds, tokenizer, fn="sft", max_seq_len=max_seq_len, max_prompt_len=max_prompt_len)
    fn_kwargs = dict(tokenizer=tokenizer, eos_id=_eos(tokenizer), max_seq_len=max_seq_len, max_prompt_len=max_prompt_len)
    out = _cached_map(ds, _sft_batch, key, cache_dir, "tokenizing sft", fn_kwargs)
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
    if n_identical:
        log.info("%s: dropped %d pairs whose chosen and rejected text are identical", source, n_identical)
        ds = ds.select(keep)
    key = cache_key(ds, tokenizer, fn="pairs", max_seq_len=max_seq_len, max_prompt_len=max_prompt_len,
                    margin_field=margin_field, **({"prompt_len": True} if with_prompt_len else {}))
    fn_kwargs = dict(tokenizer=tokenizer, eos_id=_eos(tokenizer), max_seq_len=max_seq_len,
                     max_prompt_len=max_prompt_len, margin_field=margin_field, with_prompt_len=with_prompt_len)
    out = _cached_map(ds, _pairs_batch, key, cache_dir, "tokenizing pairs", fn_kwargs)
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
) -> datasets.Dataset:
    """Rows -> {prompt_input_ids} for generation; prompts over the budget are dropped (and logged),
    not truncated, since a cut prompt asks a different question."""
    key = cache_key(ds, tokenizer, fn="prompts", max_prompt_len=max_prompt_len)
    out = _cached_map(ds, _prompts_batch, key, cache_dir, "tokenizing prompts",
                      dict(tokenizer=tokenizer, max_prompt_len=max_prompt_len))
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

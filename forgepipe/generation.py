"""Generation for people to read: evaluation tables (SFT, PPO) and `forgepipe chat`.

The prompt is what the stages trained on: the data package's raw template (prompt ids, with no
special tokens added, then the response and EOS; tokenize.py), and for a bare question typed by
a person the HH dialogue turns the bundled and HH data use ("\\n\\nHuman: ...\\n\\nAssistant:").
Decoding is greedy (what a model says by default: the same text at every evaluation, so tables
compare across steps) or sampled with PPO's temperature and top-p. Models may be DeepSpeed
engines (ZeRO-3: every rank must call together, see experience.generate) or plain HF models.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from forgepipe.data.chat_template import stop_token_id
from forgepipe.data.formats import ASSISTANT
from forgepipe.errors import ForgeError

if TYPE_CHECKING:  # torch and the tokenizing code are imported where used: the CLI imports this module
    import torch

log = logging.getLogger(__name__)

HUMAN = "\n\nHuman: "
TEMPLATES = ("auto", "chat", "hh", "raw")


def resolve_template(template: str, tokenizer=None) -> str:
    """`auto` -> `chat` when the tokenizer has a chat template (the export was trained with it), else `hh`."""
    if template != "auto":
        return template
    return "chat" if tokenizer is not None and tokenizer.chat_template else "hh"


def render_prompt(text: str, template: str = "hh", tokenizer=None, history: list[dict] | None = None) -> str:
    """A person's text as a training prompt. `chat`: a user turn (after `history`, a list of
    messages) rendered by the tokenizer's chat template with the assistant header; `hh`: wrapped in
    the HH turns unless it already ends with the Assistant turn (a whole dialogue pasted in); `raw`:
    as given (a {prompt, response} data set of another style); `auto`: `chat` when the tokenizer
    has a chat template (the export was trained with it), else `hh`."""
    if template not in TEMPLATES:
        raise ForgeError(f"--template: {template!r} is not one of {', '.join(TEMPLATES)}")
    template = resolve_template(template, tokenizer)
    if template == "chat":
        if tokenizer is None or not tokenizer.chat_template:
            raise ForgeError("--template chat: the model's tokenizer has no chat template")
        messages = [*(history or []), {"role": "user", "content": text.strip()}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if template == "raw" or text.endswith(ASSISTANT):
        return text
    return f"{HUMAN}{text.strip()}{ASSISTANT}"


def prompt_rows(tokenizer, prompts: Sequence[str], max_prompt_len: int) -> list[dict[str, list[int]]]:
    """{prompt_input_ids} rows as tokenize_prompts makes them (no special tokens added); a prompt
    over the budget keeps its end, next to the answer, as SFT's left truncation does."""
    from forgepipe.data.tokenize import left_truncate

    ids = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
    return [{"prompt_input_ids": left_truncate(row, max_prompt_len)} for row in ids]


def sampling_settings(greedy: bool, temperature: float = 1.0, top_p: float = 1.0) -> dict[str, Any]:
    """`generate` keywords: greedy, or sampling from the model's own distribution at `temperature`
    with nucleus `top_p` (top-k off: transformers' default of 50 would change the distribution)."""
    if greedy:
        return {"do_sample": False}
    return {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0}


def response_ids(sequences: torch.Tensor, prompt_len: int, eos_token_id: int) -> list[list[int]]:
    """[B, P + R] generated rows -> each response's ids up to its first EOS (EOS left out).
    One host transfer for the whole batch."""
    rows = sequences[:, prompt_len:].tolist()
    return [row[: row.index(eos_token_id)] if eos_token_id in row else row for row in rows]


def decode_responses(tokenizer, sequences: torch.Tensor, prompt_len: int) -> list[str]:
    """The responses' text (special tokens dropped, padding after EOS never shown)."""
    return [tokenizer.decode(ids, skip_special_tokens=True)
            for ids in response_ids(sequences, prompt_len, stop_token_id(tokenizer))]


def generate_text(model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int, max_prompt_len: int,
                  greedy: bool = True, temperature: float = 1.0, top_p: float = 1.0, batch_size: int = 8,
                  gather: bool = False, synced_gpus: bool = False) -> list[str]:
    """Responses to rendered `prompts` (see render_prompt), in batches of `batch_size`."""
    return generate_for_ids(model, tokenizer, prompt_rows(tokenizer, prompts, max_prompt_len),
                            max_new_tokens=max_new_tokens, greedy=greedy, temperature=temperature, top_p=top_p,
                            batch_size=batch_size, gather=gather, synced_gpus=synced_gpus)


def generate_for_ids(model, tokenizer, rows: list[dict[str, list[int]]], *, max_new_tokens: int, greedy: bool = True,
                     temperature: float = 1.0, top_p: float = 1.0, batch_size: int = 8, gather: bool = False,
                     synced_gpus: bool = False) -> list[str]:
    """Responses to {prompt_input_ids} rows, decoded. Under ZeRO-3 every rank calls it with the
    same number of rows (each generate call is collective)."""
    from forgepipe.data.collate import PromptCollator
    from forgepipe.stages.ppo.experience import _device, generate  # experience imports this module

    device = _device(model)
    collate = PromptCollator(tokenizer.pad_token_id)
    out: list[str] = []
    for start in range(0, len(rows), batch_size):
        batch = collate(rows[start:start + batch_size])
        sequences = generate(model, batch["input_ids"].to(device), batch["attention_mask"].to(device),
                             eos_token_id=stop_token_id(tokenizer), pad_token_id=tokenizer.pad_token_id,
                             max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, greedy=greedy,
                             gather=gather, synced_gpus=synced_gpus)
        out.extend(decode_responses(tokenizer, sequences, batch["input_ids"].shape[1]))
    return out


def clip(text: str, width: int = 160) -> str:
    """One console line of a generation: newlines shown as such, long text cut."""
    flat = text.replace("\n", "\\n")
    return flat if len(flat) <= width else flat[: width - 3] + "..."


def log_table(tracker, table: dict[str, list], artifact_file: str, step: int) -> None:
    """Append rows to an MLflow table artifact (`mlflow.log_table`: one JSON file per table, its
    `step` column telling evaluations apart; the UI's artifact view shows it as a table). Rank 0
    only, like every Tracker call; steps a resumed run already logged are not logged twice."""
    if not getattr(tracker, "enabled", False) or step <= getattr(tracker, "skip_through_step", -1):
        return
    rows = len(next(iter(table.values()), []))
    tracker.log_table({"step": [step] * rows, **table}, artifact_file)  # a failing store: one warning (Tracker)

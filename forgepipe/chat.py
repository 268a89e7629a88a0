"""`forgepipe chat` and `forgepipe score`: talk to an export, and ask a reward model what it thinks.

Both read what the stages wrote (a stage's output directory or its `model/` export) in one plain
process on this machine's first GPU, or the CPU, and prompt the model with the template the
stages trained with (generation.py for chat; tokenize.pair_side, the reward stage's own
`prompt + response + EOS`, for score), so an answer or a score here is what training saw.
Limits default to the training run's own (`config.yaml` beside the export), else the config's.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from forgepipe.errors import ForgeError
from forgepipe.generation import TEMPLATES, render_prompt, resolve_template

DTYPES = ("fp32", "bf16", "fp16")
DEFAULT_LIMITS = {"max_prompt_len": 256, "max_seq_len": 512}  # the config's defaults (config.DataConfig)
QUIT = ("exit", "quit", ":q")


def run_command(fn: Callable[[], Any]) -> Any:
    """A user error is one line on stderr and exit status 2, as for the stages."""
    try:
        return fn()
    except ForgeError as exc:
        click.echo(f"forgepipe: error: {exc}", err=True)
        sys.exit(2)


def resolve_export(path: str, option: str, catalog: str | None = None) -> str:
    """A stage output directory, an export, or a catalog name -> the export directory."""
    from forgepipe.layout import resolve_stage_output
    from forgepipe.models.catalog import resolve_model

    resolved = resolve_stage_output(resolve_model(path, catalog))
    if not (Path(resolved) / "config.json").is_file():
        raise ForgeError(f"{option}: {path} is not a model export (no config.json in {resolved})")
    from forgepipe.preflight import check_weight_files

    check_weight_files(Path(resolved), option)  # a corrupt safetensors file: one line, before loading
    return resolved


def trained_limit(model_dir: str, key: str) -> int:
    """data.<key> of the run that wrote the export (its `config.yaml` one level up), else the default."""
    import yaml

    config = Path(model_dir).parent / "config.yaml"
    try:
        value = (yaml.safe_load(config.read_text()) or {}).get("data", {}).get(key)
    except (OSError, yaml.YAMLError, AttributeError):
        value = None
    return int(value) if isinstance(value, int) and value > 0 else DEFAULT_LIMITS[key]


def read_prompts(path: str) -> list[str]:
    """Prompts from a file: plain text (.txt), one per line; or any data file the stages read
    (JSONL/JSON/Parquet: {prompt, ...} records or HH dialogues), its prompt field as trained."""
    file = Path(path)
    if not file.is_file():
        raise ForgeError(f"--prompts: {path}: no such file")
    if file.suffix == ".txt":
        prompts = [line for line in file.read_text().splitlines() if line.strip()]
    else:
        rows = normalised_rows(path, "--prompts")
        prompts = [p for p in rows["prompt"] if p]
    if not prompts:
        raise ForgeError(f"--prompts: {path} holds no prompt")
    return prompts


def normalised_rows(path: str, option: str):
    """A data file read and normalised by the data package (formats.py), as the stages read it."""
    from forgepipe.data.formats import normalise
    from forgepipe.data.sources import load_source

    try:
        ds, _ = normalise(load_source(path), path)
    except ForgeError as exc:
        raise ForgeError(f"{option}: {exc}") from None
    return ds


def quiet_loading() -> None:
    """No weight-loading progress bar in front of the answers (this is a terminal command's output)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def load_chat_model(model_dir: str, dtype: str):
    """(model on this machine's device in eval mode, left-padding tokenizer); a reward export is refused."""
    from forgepipe.distributed import World, device_for
    from forgepipe.models.load import load_causal_lm, load_tokenizer
    from forgepipe.models.reward_model import has_scalar_head

    if has_scalar_head(model_dir):
        raise ForgeError(f"MODEL_DIR: {model_dir} is a reward model export; score with `forgepipe score` instead")
    quiet_loading()
    tokenizer = load_tokenizer(model_dir, padding_side="left")
    model = load_causal_lm(model_dir, dtype=dtype, tokenizer=tokenizer)
    return model.to(device_for(World())).eval(), tokenizer


def print_answers(prompts: list[str], answers: list[str], as_jsonl: bool) -> None:
    for prompt, text in zip(prompts, answers, strict=True):
        if as_jsonl:
            click.echo(json.dumps({"prompt": prompt, "response": text}))
        else:
            click.echo(f">>> {prompt.strip()}\n{text.strip()}\n")


def interactive(answer: Callable[[list[str]], list[str]], template: str, tokenizer=None) -> None:
    """A dialogue on the terminal. With the HH or chat template the turns accumulate (the prompt
    keeps its end within --max-prompt-len, as in training); `/reset` starts over, `exit` or end of
    input stops."""
    template = resolve_template(template, tokenizer)
    history = ""
    turns: list[dict] = []
    click.echo(f"forgepipe chat: type a message; /reset forgets the dialogue, {QUIT[0]} or Ctrl-D stops", err=True)
    while True:
        try:
            text = input("you> ")
        except EOFError:
            return
        if text.strip() in QUIT:
            return
        if text.strip() == "/reset":
            history, turns = "", []
            continue
        if not text.strip():
            continue
        if template == "chat":
            prompt = render_prompt(text, template, tokenizer, turns)
        else:
            prompt = history + render_prompt(text, template)
        reply = answer([prompt])[0]
        click.echo(f"model> {reply.strip()}")
        history = prompt + reply if template == "hh" else ""
        turns = [*turns, {"role": "user", "content": text.strip()}, {"role": "assistant", "content": reply.strip()}] \
            if template == "chat" else []


@click.command()
@click.argument("model_dir")
@click.option("--prompt", "prompt_texts", multiple=True, help="Answer this prompt and exit (repeatable).")
@click.option("--prompts", "prompts_file", default=None,
              help="Answer every prompt of a file: .txt one per line, or a data file ({prompt, ...} or HH records).")
@click.option("--template", type=click.Choice(TEMPLATES), default="auto", show_default=True,
              help="auto: chat if the export has a chat template (it was trained with one), else hh; chat: a user "
                   "turn in the export's chat template; hh: a bare question becomes '\\n\\nHuman: ...\\n\\nAssistant:' "
                   "(text already ending with the Assistant turn is kept); raw: the text is the whole prompt.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=128, show_default=True)
@click.option("--sample/--greedy", default=False, show_default=True, help="Sample instead of greedy decoding.")
@click.option("--temperature", type=click.FloatRange(min=0.0, min_open=True), default=1.0, show_default=True)
@click.option("--top-p", type=click.FloatRange(0.0, 1.0, min_open=True), default=1.0, show_default=True)
@click.option("--max-prompt-len", type=click.IntRange(min=1), default=None,
              help="Prompt budget in tokens (the prompt keeps its end). Default: the training run's.")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--dtype", type=click.Choice(DTYPES), default="fp32", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the sampling.")
@click.option("--jsonl", "as_jsonl", is_flag=True, help="Print one JSON object per answer.")
@click.option("--catalog", default=None, help="Model catalog YAML (for a catalog name as MODEL_DIR).")
def chat(model_dir, prompt_texts, prompts_file, template, max_new_tokens, sample, temperature, top_p, max_prompt_len,
         batch_size, dtype, seed, as_jsonl, catalog):
    """Talk to an export: MODEL_DIR is a stage's output directory, its model/ export, or a catalog name.

    With --prompt or --prompts it answers and exits; without them it is an interactive dialogue.
    """
    def main() -> None:
        import torch

        from forgepipe.generation import generate_text

        path = resolve_export(model_dir, "MODEL_DIR", catalog)
        texts = list(prompt_texts) + (read_prompts(prompts_file) if prompts_file else [])
        model, tokenizer = load_chat_model(path, dtype)
        torch.manual_seed(seed)
        budget = max_prompt_len or trained_limit(path, "max_prompt_len")

        def answer(prompts: list[str]) -> list[str]:
            return generate_text(model, tokenizer, prompts, max_new_tokens=max_new_tokens, max_prompt_len=budget,
                                 greedy=not sample, temperature=temperature, top_p=top_p, batch_size=batch_size)

        if not texts:
            interactive(answer, template, tokenizer)
            return
        print_answers(texts, answer([render_prompt(t, template, tokenizer) for t in texts]), as_jsonl)

    run_command(main)


# ---------------------------------------------------------------------------
# forgepipe score


def pairwise_summary(chosen: list[float], rejected: list[float]) -> dict[str, float]:
    """Accuracy (chosen scored strictly above rejected, as the reward stage's evaluation counts
    it), mean scores and their gap."""
    n = max(len(chosen), 1)
    return {"pairs": float(len(chosen)),
            "accuracy": sum(c > r for c, r in zip(chosen, rejected, strict=True)) / n,
            "chosen_mean": sum(chosen) / n, "rejected_mean": sum(rejected) / n,
            "gap_mean": (sum(chosen) - sum(rejected)) / n}


def scored_rows(path: str, limit: int) -> tuple[list[str], list[str], list[str] | None, list[str]]:
    """(prompts, chosen or only responses, rejected or None, conversations as JSON or "") of a data
    file, at most `limit` rows (0: all)."""
    ds = normalised_rows(path, "--data")
    if limit:
        ds = ds.select(range(min(limit, len(ds))))
    kinds = set(ds["kind"])
    if not len(ds) or kinds == {"text"}:
        raise ForgeError(f"{path} has no prompt/response rows to score ({{text}} documents have none)", key="data.sources")
    prompts, chosen = ds["prompt"][:], ds["chosen"][:]
    rejected = ds["rejected"][:] if kinds == {"pair"} else None
    return prompts, chosen, rejected, ds["messages"][:]


def sequence_ids(tokenizer, prompts: list[str], responses: list[str], max_seq_len: int,
                 max_prompt_len: int, messages: list[str] | None = None) -> list[list[int]]:
    """prompt + response + EOS as the reward stage tokenized them (tokenize.pair_side), in the
    export's chat template when it has one (the end-of-turn token last)."""
    from forgepipe.data.chat_template import ChatRender
    from forgepipe.data.tokenize import scored_sequence

    chat = ChatRender.of(tokenizer)
    messages = messages or [""] * len(prompts)
    return [scored_sequence(tokenizer, chat, p, m, r, max_seq_len, max_prompt_len)
            for p, m, r in zip(prompts, messages, responses, strict=True)]


def sequence_scores(model, rows: list[list[int]], pad_token_id: int, batch_size: int) -> list[float]:
    """The reward model's score of each sequence (at its last token, EOS); one host transfer."""
    import torch

    from forgepipe.data.collate import pad
    from forgepipe.models.reward_model import last_token_scores
    from forgepipe.stages.ppo.experience import _device

    device, parts = _device(model), []
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            chunk = rows[start:start + batch_size]
            ids = pad(chunk, pad_token_id, "right").to(device)
            mask = pad([[1] * len(r) for r in chunk], 0, "right").to(device)
            parts.append(last_token_scores(model(input_ids=ids, attention_mask=mask), mask).float())
    return torch.cat(parts).tolist() if parts else []


def load_reward_model(model_dir: str, dtype: str):
    """(scalar-head model on this machine's device in eval mode, tokenizer); a plain LM is refused."""
    from forgepipe.distributed import World, device_for
    from forgepipe.models.load import load_tokenizer
    from forgepipe.models.reward_model import has_scalar_head, load_scalar_model

    if not has_scalar_head(model_dir):
        raise ForgeError(f"REWARD_DIR: {model_dir} is not a reward model export (no scalar head); "
                         "give the output of `forgepipe reward`")
    quiet_loading()
    tokenizer = load_tokenizer(model_dir)
    model = load_scalar_model(model_dir, dtype=dtype, tokenizer=tokenizer)
    return model.to(device_for(World())).eval(), tokenizer


def print_scores(prompts: list[str], chosen: list[float], rejected: list[float] | None, as_jsonl: bool) -> None:
    """One line per row (or JSON object), then, for pairs, the summary line."""
    from forgepipe.generation import clip

    if not as_jsonl:
        click.echo("     #    chosen  rejected       gap  prompt" if rejected else "     #     score  prompt")
    for i, prompt in enumerate(prompts):
        if as_jsonl:
            record = {"prompt": prompt, "chosen_score": chosen[i]} if rejected else {"prompt": prompt, "score": chosen[i]}
            if rejected:
                record |= {"rejected_score": rejected[i], "correct": chosen[i] > rejected[i]}
            click.echo(json.dumps(record))
        elif rejected:
            mark = " " if chosen[i] > rejected[i] else "x"
            click.echo(f"{i + 1:6d} {chosen[i]:+9.4f} {rejected[i]:+9.4f} {chosen[i] - rejected[i]:+9.4f} {mark} "
                       f"{clip(prompt.strip(), 70)}")
        else:
            click.echo(f"{i + 1:6d} {chosen[i]:+9.4f}  {clip(prompt.strip(), 70)}")
    if rejected and not as_jsonl:
        s = pairwise_summary(chosen, rejected)
        click.echo(f"pairs: {int(s['pairs'])}  accuracy: {s['accuracy']:.4f}  mean chosen: {s['chosen_mean']:+.4f}  "
                   f"mean rejected: {s['rejected_mean']:+.4f}  mean gap: {s['gap_mean']:+.4f}")


@click.command()
@click.argument("reward_dir")
@click.option("--data", "data_file", required=True,
              help="Pairs ({prompt, chosen, rejected} or HH) to score and count, or {prompt, response} rows to score.")
@click.option("--limit", type=click.IntRange(min=0), default=0, show_default=True, help="Rows scored at most (0: all).")
@click.option("--max-seq-len", type=click.IntRange(min=2), default=None, help="Default: the training run's.")
@click.option("--max-prompt-len", type=click.IntRange(min=1), default=None, help="Default: the training run's.")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--dtype", type=click.Choice(DTYPES), default="fp32", show_default=True)
@click.option("--jsonl", "as_jsonl", is_flag=True, help="Print one JSON object per row.")
@click.option("--catalog", default=None, help="Model catalog YAML (for a catalog name as REWARD_DIR).")
def score(reward_dir, data_file, limit, max_seq_len, max_prompt_len, batch_size, dtype, as_jsonl, catalog):
    """Score a data file with a reward model: REWARD_DIR is `forgepipe reward`'s output (or its model/).

    For pairs it prints both scores per pair and the accuracy (chosen above rejected).
    """
    def main() -> None:
        path = resolve_export(reward_dir, "REWARD_DIR", catalog)
        prompts, chosen, rejected, messages = scored_rows(data_file, limit)
        model, tokenizer = load_reward_model(path, dtype)
        lengths = (max_seq_len or trained_limit(path, "max_seq_len"),
                   max_prompt_len or trained_limit(path, "max_prompt_len"))

        def scores(responses: list[str]) -> list[float]:
            rows = sequence_ids(tokenizer, prompts, responses, *lengths, messages)
            return sequence_scores(model, rows, tokenizer.pad_token_id, batch_size)

        print_scores(prompts, scores(chosen), scores(rejected) if rejected else None, as_jsonl)

    run_command(main)

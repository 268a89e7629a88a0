"""Chat-format data and chat templates: formats, HH <-> messages, and the loss masks token by token.

The tokenizer is the tiny one with ChatML's two special tokens and template added (built here, as
the tiny tokenizer is built), so every id below can be read back."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from forgepipe.data.chat_template import (
    ChatRender,
    apply_setting,
    end_of_turn,
    hh_messages,
    hh_text,
    stop_token_id,
)
from forgepipe.data.formats import normalise_row
from forgepipe.data.tokenize import IGNORE_INDEX, _pairs_batch, _prompts_batch, _sft_batch
from forgepipe.errors import ForgeError
from forgepipe.models.load import load_tokenizer
from forgepipe.models.tiny import TOKENIZER_FILES, tiny_asset_dir

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def make_chat_tokenizer(out: Path, template: str = CHATML) -> Path:
    """The tiny tokenizer plus <|im_start|>/<|im_end|> (ids 1000, 1001 < the tiny model's 1024) and a template."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_asset_dir())
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = template
    out.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(out)
    return out


def chat_model(tiny_model: Path, out: Path) -> Path:
    """The tiny model with the chat tokenizer: a model whose tokenizer has a chat template."""
    shutil.copytree(tiny_model, out)
    for name in TOKENIZER_FILES:
        (out / name).unlink(missing_ok=True)
    return make_chat_tokenizer(out)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return load_tokenizer(str(make_chat_tokenizer(tmp_path_factory.mktemp("chat-tok"))))


def ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def rows(**columns):
    """A normalised batch as datasets hands it to the map functions."""
    n = len(next(iter(columns.values())))
    return {"kind": ["pair"] * n, "messages": [""] * n, "rejected": [None] * n, **columns}


# ---------------------------------------------------------------------------
# HH text <-> messages


def test_hh_text_becomes_messages_and_back():
    prompt = "\n\nHuman: What is a tokamak?\n\nAssistant: A fusion device.\n\nHuman: Who built one?\n\nAssistant:"
    messages = hh_messages(prompt)
    assert messages == [{"role": "user", "content": "What is a tokamak?"},
                        {"role": "assistant", "content": "A fusion device."},
                        {"role": "user", "content": "Who built one?"}]
    assert hh_text(messages) == prompt
    assert hh_messages("Summarise this paper.") == [{"role": "user", "content": "Summarise this paper."}]
    assert hh_messages("You are terse.\n\nHuman: hi\n\nAssistant:")[0] == {"role": "system", "content": "You are terse."}


# ---------------------------------------------------------------------------
# Formats


def test_a_messages_record_is_a_response_row_with_its_conversation():
    record = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
                           {"role": "assistant", "content": "hello"}]}
    (prompt, chosen, rejected, kind, messages), why = normalise_row(record, "messages")
    assert why == "" and kind == "response" and rejected is None
    assert prompt == "Be brief.\n\nHuman: hi\n\nAssistant:" and chosen == " hello"
    assert json.loads(messages) == record["messages"][:2]


@pytest.mark.parametrize("record", [
    {"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "assistant", "content": "good"}],
     "rejected": [{"role": "assistant", "content": "bad"}]},
    {"prompt": [{"role": "user", "content": "q"}], "chosen": "good", "rejected": "bad"},
])
def test_a_conversational_preference_record_is_a_pair(record):
    (prompt, chosen, rejected, kind, messages), why = normalise_row(record, "pair")
    assert (why, prompt, chosen, rejected, kind) == ("", "\n\nHuman: q\n\nAssistant:", " good", " bad", "pair")
    assert json.loads(messages) == [{"role": "user", "content": "q"}]


def test_an_implicit_prompt_conversation_pair_shares_all_but_the_last_message():
    user = {"role": "user", "content": "q"}
    record = {"chosen": [user, {"role": "assistant", "content": "good"}],
              "rejected": [user, {"role": "assistant", "content": "bad"}]}
    (prompt, chosen, rejected, kind, messages), why = normalise_row(record, "hh")
    assert (why, chosen, rejected, json.loads(messages)) == ("", " good", " bad", [user])
    other = {**record, "rejected": [{"role": "user", "content": "another"}, {"role": "assistant", "content": "bad"}]}
    assert normalise_row(other, "hh") == (None, "chosen and rejected conversations do not share the prompt")


@pytest.mark.parametrize("record, why", [
    ({"messages": [{"role": "user", "content": "hi"}]}, "'messages' does not end with an assistant message after a prompt"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "'messages' has a message that is not {role: system|user|assistant, content: text}"),
    ({"messages": "hi"}, "'messages' is not a list of messages"),
    ({"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "user", "content": "x"}], "rejected": "b"},
     "'chosen' is not one assistant message"),
])
def test_broken_chat_records_are_dropped_with_the_reason(record, why):
    fmt = "messages" if "messages" in record else "pair"
    assert normalise_row(record, fmt) == (None, why)


# ---------------------------------------------------------------------------
# The setting and the end-of-turn token


def test_the_setting_picks_the_template(tmp_path, tok):
    from transformers import AutoTokenizer

    plain = AutoTokenizer.from_pretrained(tiny_asset_dir())
    assert apply_setting(plain, "auto") == "none" and ChatRender.of(plain) is None  # FORGE-like: no template
    assert stop_token_id(plain) == plain.eos_token_id
    file = tmp_path / "t.jinja"
    file.write_text(CHATML)
    assert apply_setting(plain, str(file)) == str(file) and plain.chat_template == CHATML
    with pytest.raises(ForgeError, match=r"^.*missing\.jinja: no such file") as err:
        apply_setting(plain, str(tmp_path / "missing.jinja"))
    assert err.value.key == "data.chat_template"
    assert end_of_turn(tok) == (1001, "<|im_end|>") and stop_token_id(tok) == 1001
    saved = tok.chat_template
    try:
        assert apply_setting(tok, "none") == "none" and stop_token_id(tok) == tok.eos_token_id
    finally:
        tok.chat_template = saved


# ---------------------------------------------------------------------------
# Masks, token by token


def test_sft_loss_is_on_the_final_answer_and_its_end_of_turn_only(tok):
    chat = ChatRender.of(tok)
    batch = rows(prompt=["\n\nHuman: hi there\n\nAssistant:"], chosen=[" ok"], kind=["response"])
    out = _sft_batch(batch, tok, tok.eos_token_id, 512, 256, chat=chat)
    header = ids(tok, "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n")
    answer = ids(tok, "ok") + [1001]
    assert out["input_ids"] == [header + answer]
    assert out["labels"] == [[IGNORE_INDEX] * len(header) + answer]  # no template token carries loss, <|im_end|> does


def test_sft_on_all_turns_trains_every_assistant_turn_and_no_template_token(tok):
    messages = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]
    batch = rows(prompt=[hh_text(messages)], chosen=[" d"], kind=["response"], messages=[json.dumps(messages)])
    last = _sft_batch(batch, tok, tok.eos_token_id, 512, 256, chat=ChatRender.of(tok))
    every = _sft_batch(batch, tok, tok.eos_token_id, 512, 256, chat=ChatRender.of(tok, all_turns=True))
    pieces = [("<|im_start|>user\na<|im_end|>\n<|im_start|>assistant\n", False), ("b<|im_end|>", True),
              ("\n<|im_start|>user\nc<|im_end|>\n<|im_start|>assistant\n", False), ("d<|im_end|>", True)]
    expected_ids = [i for text, _ in pieces for i in ids(tok, text)]
    assert last["input_ids"] == every["input_ids"] == [expected_ids]
    trained_all = [i if trained else IGNORE_INDEX for text, trained in pieces for i in ids(tok, text)]
    trained_last = [IGNORE_INDEX] * (len(expected_ids) - 2) + expected_ids[-2:]
    assert every["labels"] == [trained_all] and last["labels"] == [trained_last]
    assert trained_all.count(1001) == 2 and 1000 not in trained_all  # both ends of turn, no header


def test_pairs_end_with_the_end_of_turn_token_where_the_reward_is_read(tok):
    batch = rows(prompt=["\n\nHuman: q\n\nAssistant:"], chosen=[" good"], rejected=[" bad"])
    out = _pairs_batch(batch, tok, tok.eos_token_id, 512, 256, None, with_prompt_len=True, chat=ChatRender.of(tok))
    prompt = ids(tok, "<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\n")
    assert out["chosen_input_ids"] == [prompt + ids(tok, "good") + [1001]]
    assert out["rejected_input_ids"] == [prompt + ids(tok, "bad") + [1001]]
    assert out["prompt_len"] == [len(prompt)]
    long = rows(prompt=["\n\nHuman: q\n\nAssistant:"], chosen=[" a good and long answer"], rejected=[" bad"])
    cut = _pairs_batch(long, tok, tok.eos_token_id, len(prompt) + 3, 256, None, chat=ChatRender.of(tok))
    assert cut["chosen_input_ids"] == [prompt + ids(tok, "a good and long answer")[:2] + [1001]]  # end-of-turn kept last


def test_score_tokenizes_a_pair_side_as_the_reward_stage_did(tok):
    from forgepipe.data.tokenize import scored_sequence

    batch = rows(prompt=["\n\nHuman: q\n\nAssistant:"], chosen=[" good"], rejected=[" bad"])
    for chat in (ChatRender.of(tok), None):
        stage = _pairs_batch(batch, tok, tok.eos_token_id, 512, 256, None, chat=chat)
        assert scored_sequence(tok, chat, batch["prompt"][0], "", " good", 512, 256) == stage["chosen_input_ids"][0]


def test_ppo_prompts_end_with_the_assistant_header(tok):
    out = _prompts_batch(rows(prompt=["\n\nHuman: q\n\nAssistant:"]), tok, 256, chat=ChatRender.of(tok))
    assert out["prompt_input_ids"] == [ids(tok, "<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\n")]


def test_without_a_template_the_hh_text_is_unchanged(tok):
    """Chat records still serve a model with no template: their HH text form, EOS at the end."""
    from transformers import AutoTokenizer

    plain = AutoTokenizer.from_pretrained(tiny_asset_dir())
    batch = rows(prompt=["\n\nHuman: q\n\nAssistant:"], chosen=[" good"], kind=["response"],
                 messages=[json.dumps([{"role": "user", "content": "q"}])])
    out = _sft_batch(batch, plain, plain.eos_token_id, 512, 256, chat=None)
    prompt = ids(plain, "\n\nHuman: q\n\nAssistant:")
    assert out["input_ids"] == [prompt + ids(plain, " good") + [plain.eos_token_id]]


def test_a_conversation_the_template_refuses_is_skipped(tmp_path):
    """Templates raise on what they do not accept (here: a system message): that row is skipped, the rest train."""
    strict = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
              "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
              "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    tok = load_tokenizer(str(make_chat_tokenizer(tmp_path / "strict", strict)))
    batch = rows(prompt=["Be brief.\n\nHuman: q\n\nAssistant:", "\n\nHuman: q\n\nAssistant:"], chosen=[" a", " a"],
                 kind=["response", "response"])
    out = _sft_batch(batch, tok, tok.eos_token_id, 512, 256, chat=ChatRender.of(tok))
    assert out["input_ids"] == [ids(tok, "<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\na<|im_end|>")]


def test_chat_prompts_a_person_in_the_exports_template(tok):
    from transformers import AutoTokenizer

    from forgepipe.generation import render_prompt

    assert render_prompt("q", "auto", tok) == "<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\n"
    history = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    assert render_prompt("c", "chat", tok, history).startswith("<|im_start|>user\na<|im_end|>\n<|im_start|>assistant\nb")
    plain = AutoTokenizer.from_pretrained(tiny_asset_dir())
    assert render_prompt("q", "auto", plain) == "\n\nHuman: q\n\nAssistant:"  # FORGE exports: the HH turns
    with pytest.raises(ForgeError, match="--template chat: the model's tokenizer has no chat template"):
        render_prompt("q", "chat", plain)


def test_a_template_that_rewrites_earlier_turns_drops_the_row(tmp_path):
    """A template that renders the history differently once a turn follows cannot be masked: the
    row is skipped, never trained with a shifted mask."""
    shifty = ("{% for m in messages %}{% if loop.last %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
              "{% else %}{{ m['content'] }}\n{% endif %}{% endfor %}"
              "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    tok = load_tokenizer(str(make_chat_tokenizer(tmp_path / "shifty", shifty)))
    batch = rows(prompt=["\n\nHuman: q\n\nAssistant:"], chosen=[" a"], kind=["response"])
    assert _sft_batch(batch, tok, tok.eos_token_id, 512, 256, chat=ChatRender.of(tok)) == {"input_ids": [], "labels": []}


# ---------------------------------------------------------------------------
# Every stage on chat-format data, with a tokenizer that has a chat template

TOPICS = ("fusion", "plasma", "climate", "neutrons", "lasers", "graphene", "proteins", "galaxies")


def write_chat_data(tmp_path: Path, rows: int = 64) -> tuple[Path, Path]:
    """A {messages} SFT file (two-turn conversations) and a conversational preference file."""
    messages, prefs = tmp_path / "messages.jsonl", tmp_path / "prefs.jsonl"
    with messages.open("w") as m, prefs.open("w") as p:
        for i in range(rows):
            topic = TOPICS[i % len(TOPICS)]
            system = {"role": "system", "content": "Answer briefly."}
            first = [system, {"role": "user", "content": f"What is {topic}?"},
                     {"role": "assistant", "content": f"{topic} is a field of study number {i}."},
                     {"role": "user", "content": "Say more."}]
            m.write(json.dumps({"messages": [*first, {"role": "assistant", "content": f"It has many {topic} papers."}]}) + "\n")
            p.write(json.dumps({"prompt": first[:2], "chosen": [{"role": "assistant", "content": f"the answer is {topic}"}],
                                "rejected": [{"role": "assistant", "content": "no idea at all"}]}) + "\n")
    return messages, prefs


COMMON = ["--dtype", "fp32", "--torch-adam", "--zero-stage", "2", "--per-device-batch-size", "2", "--max-steps", "2",
          "--max-seq-len", "128", "--max-prompt-len", "96", "--eval-generations", "2", "--eval-max-new-tokens", "4"]


@pytest.mark.slow
def test_chat_data_runs_through_sft_reward_ppo_and_dpo(tiny_model, tmp_path):
    from conftest import run_forgepipe

    model = chat_model(tiny_model, tmp_path / "chat-model")
    messages, prefs = write_chat_data(tmp_path)
    db = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = tmp_path / "pipe"
    proc = run_forgepipe(["pipeline", "--model", str(model), "--data", str(prefs), "--output-dir", str(out),
                          "--tracking-uri", db, "--max-new-tokens", "8", *COMMON])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "chat template: the tokenizer's own" in proc.stderr
    dpo = run_forgepipe(["dpo", "--model", str(out / "sft"), "--data", str(prefs), "--output-dir", str(tmp_path / "dpo"),
                         "--tracking-uri", db, *COMMON])
    assert dpo.returncode == 0, dpo.stderr[-3000:]
    for stage_dir in (out / "sft", out / "reward", out / "ppo", tmp_path / "dpo"):  # every export carries it
        assert (stage_dir / "model" / "chat_template.jinja").read_text() == CHATML, stage_dir
    scored = run_forgepipe(["score", str(out / "reward"), "--data", str(prefs), "--limit", "4"])
    assert scored.returncode == 0 and "pairs: 4" in scored.stdout, scored.stderr[-3000:]
    talk = run_forgepipe(["chat", str(out / "ppo"), "--prompt", "What is fusion?", "--max-new-tokens", "4", "--jsonl"])
    assert talk.returncode == 0, talk.stderr[-3000:]
    assert json.loads(talk.stdout.strip().splitlines()[-1])["prompt"] == "What is fusion?"

    # {messages} records, all turns trained, a template from a file on a model that has none: the
    # file's template is the export's, and a later stage finds it (auto).
    file = tmp_path / "hh.jinja"
    file.write_text("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                    "{% if add_generation_prompt %}assistant:{% endif %}")
    sft = run_forgepipe(["sft", "--model", str(tiny_model), "--data", str(messages), "--output-dir", str(tmp_path / "sft2"),
                         "--tracking-uri", db, "--chat-template", str(file), "--train-on-all-turns", *COMMON])
    assert sft.returncode == 0, sft.stderr[-3000:]
    assert f"chat template: {file}" in sft.stderr
    assert (tmp_path / "sft2" / "model" / "chat_template.jinja").read_text() == file.read_text()
    assert "chat_template: " + str(file) in (tmp_path / "sft2" / "config.yaml").read_text()
    assert "train_on_all_turns: true" in (tmp_path / "sft2" / "config.yaml").read_text()

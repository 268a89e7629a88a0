"""Chat templates: how a conversation becomes ids, and which of those ids carry the loss.

`--chat-template` (data.chat_template) decides the text a row becomes:
- `auto`: the tokenizer's own `chat_template` when it has one (Llama 3, Qwen, SmolLM2, ...),
  forgepipe's "\\n\\nHuman: ...\\n\\nAssistant:" text otherwise (FORGE models have none);
- `none`: that text always;
- a Jinja file: that template, set on the tokenizer (and so saved with every export).

Rows reach tokenization normalised (formats.py): a `prompt` string in HH text form, responses with
HH's leading space, and, for chat-format records, the prompt conversation as JSON in `messages`.
With a chat template in use, HH text prompts are parsed back into messages (`hh_messages`), so one
data set serves both kinds of model.

Loss masks follow the template. A conversation is rendered turn by turn with the tokenizer's own
`apply_chat_template`; each trained assistant turn is the text between the render of the
conversation before it (with the generation prompt: the assistant header) and the template's
end-of-turn token, which is trained too (the model must learn to stop) and ends the sequence (the
reward model reads its score there). Template text around a turn (headers, separators, the system
prompt) never carries loss. Only the final turn is trained unless `--train-on-all-turns`.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

from forgepipe.errors import ForgeError

SETTINGS = ("auto", "none")  # or a path to a Jinja file
HUMAN, ASSISTANT = "\n\nHuman:", "\n\nAssistant:"
_TURN = re.compile(r"(\n\nHuman:|\n\nAssistant:)")
ROLES = ("system", "user", "assistant")


def check_setting(setting: str) -> None:
    """auto, none, or a readable file: checked before launch (a one-line error naming the option)."""
    if setting in SETTINGS:
        return
    path = Path(setting)
    if not path.is_file():
        raise ForgeError(f"{setting}: no such file (expected auto, none or a Jinja chat template file)",
                         key="data.chat_template")
    check_template_file(path)


# Special tokens a template may read, as placeholders: the check runs before any tokenizer is loaded.
PROBE_TOKENS = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}


def read_template(path: Path) -> str:
    """A template file's text; one that is not UTF-8 is a ForgeError naming its line and column."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise ForgeError(f"{path}:{line}: not UTF-8 text (byte 0x{data[exc.start]:02x} at column {column})",
                         key="data.chat_template") from None


def probe_render(template: str, messages: list[dict], generation_prompt: bool) -> str:
    """`template` rendered as transformers' apply_chat_template renders it (same sandbox, globals and
    filters), with placeholder special tokens."""
    from transformers.utils.chat_template_utils import render_jinja_template

    rendered, _ = render_jinja_template(conversations=[messages], chat_template=template,
                                        add_generation_prompt=generation_prompt, **PROBE_TOKENS)
    return rendered[0]


def check_template_file(path: Path) -> None:
    """A --chat-template file is UTF-8, compiles, and renders a one-turn conversation with the
    assistant's answer in it (what the stages' end-of-turn probe renders first): checked before
    launch, so a broken template is one line naming the file instead of a rank's traceback."""
    import jinja2

    template = read_template(path)
    conv = [{"role": "user", "content": PROBE_USER}]
    try:
        before = probe_render(template, conv, generation_prompt=True)
        through = probe_render(template, [*conv, {"role": "assistant", "content": PROBE_ANSWER}], False)
    except jinja2.TemplateSyntaxError as exc:
        raise ForgeError(f"{path}:{exc.lineno}: Jinja syntax error ({exc.message})", key="data.chat_template") from None
    except Exception as exc:  # noqa: BLE001 - jinja2's errors, and whatever a template raises
        detail = str(exc).splitlines()[0] if str(exc) else ""
        raise ForgeError(f"{path}: the template fails on a one-turn conversation ({type(exc).__name__}: {detail})",
                         key="data.chat_template") from None
    if PROBE_ANSWER not in through[len(before) if through.startswith(before) else 0:]:
        raise ForgeError(f"{path}: the template does not render an assistant's answer", key="data.chat_template")


def apply_setting(tokenizer, setting: str) -> str:
    """Give `tokenizer` the chat template the setting asks for; return which one it has now:
    "tokenizer" (its own), "none" (forgepipe's HH text), or the file's path."""
    check_setting(setting)
    if setting == "none":
        tokenizer.chat_template = None
        return "none"
    if setting == "auto":
        template = tokenizer.chat_template
        if isinstance(template, dict):  # several named templates: transformers uses "default"
            tokenizer.chat_template = template.get("default")
        return "tokenizer" if tokenizer.chat_template else "none"
    tokenizer.chat_template = read_template(Path(setting))
    return setting


# ---------------------------------------------------------------------------
# Messages <-> HH text (pure)


def hh_messages(prompt: str) -> list[dict[str, str]]:
    """'\\n\\nHuman: a\\n\\nAssistant: b\\n\\nHuman: c\\n\\nAssistant:' -> user a, assistant b, user c.

    Text before the first turn becomes a system message; a prompt with no HH turns is one user
    message; the empty last "Assistant:" is the generation prompt, which the template adds itself."""
    parts = _TURN.split(prompt)
    messages: list[dict[str, str]] = []
    if parts[0].strip():
        messages.append({"role": "system" if len(parts) > 1 else "user", "content": parts[0].strip()})
    for marker, content in zip(parts[1::2], parts[2::2], strict=True):
        messages.append({"role": "user" if marker == HUMAN else "assistant", "content": content.strip()})
    if messages and messages[-1]["role"] == "assistant" and not messages[-1]["content"]:
        messages.pop()
    return messages


def hh_text(messages: list[dict[str, str]]) -> str:
    """The HH text prompt of a conversation (for `--chat-template none`), ending in '\\n\\nAssistant:'."""
    out = []
    for m in messages:
        if m["role"] == "system":
            out.append(m["content"])
        else:
            out.append(f"{HUMAN if m['role'] == 'user' else ASSISTANT} {m['content']}")
    return "".join(out) + ASSISTANT


def hh_response(content: str) -> str:
    """A message's content as a normalised response (HH convention: a leading space)."""
    return content if content[:1].isspace() else " " + content


def response_content(response: str) -> str:
    """A normalised response (HH convention: a leading space) as a message's content."""
    return response[1:] if response.startswith(" ") else response


def check_messages(value, what: str) -> str | None:
    """Why `value` is not a conversation (a list of {role, content} with known roles), or None."""
    if not isinstance(value, list) or not value:
        return f"{what} is not a list of messages"
    for m in value:
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or m.get("role") not in ROLES:
            return f"{what} has a message that is not {{role: system|user|assistant, content: text}}"
    return None


def plain_messages(messages: list[dict]) -> list[dict[str, str]]:
    return [{"role": m["role"], "content": m["content"]} for m in messages]


# ---------------------------------------------------------------------------
# Rendering with the tokenizer's template


@dataclass
class ChatRender:
    """A tokenizer with a chat template, and what its template puts at the end of a turn."""

    tokenizer: object
    end_id: int  # the end-of-turn token: trained, generation stops on it, the reward is read there
    end_text: str | None  # its text in the rendering; None: the template ends turns with nothing, EOS appended
    all_turns: bool = False

    @classmethod
    def of(cls, tokenizer, all_turns: bool = False) -> ChatRender | None:
        """None when the tokenizer has no chat template (forgepipe's HH text is used)."""
        if not tokenizer.chat_template:
            return None
        end_id, end_text = end_of_turn(tokenizer)
        return cls(tokenizer, end_id, end_text, all_turns)

    def fingerprint(self) -> str:
        """What decides the ids beyond the tokenizer's vocabulary: for the tokenized-data cache key."""
        payload = json.dumps([self.tokenizer.chat_template, self.end_id, self.all_turns])
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    def render(self, messages: list[dict], generation_prompt: bool) -> str:
        """The template's text; ValueError when the template refuses the conversation (its own
        `raise_exception`, e.g. roles that do not alternate)."""
        try:
            return self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                      add_generation_prompt=generation_prompt)
        except Exception as exc:  # noqa: BLE001 - jinja2's errors, and whatever a template raises
            raise ValueError(f"the chat template refused the conversation ({exc})") from None

    def ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    def conversation(self, prompt: str, messages_json: str) -> list[dict[str, str]]:
        """A normalised row's prompt as messages: its own (chat-format records) or parsed from HH text."""
        return json.loads(messages_json) if messages_json else hh_messages(prompt)

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        """The conversation so far plus the assistant header: what generation starts from."""
        return self.ids(self.render(messages, generation_prompt=True))

    def segments(self, messages: list[dict], response: str) -> list[tuple[str, bool]]:
        """(text, trained) pieces of `messages` + the assistant's `response`, ending at the last
        trained turn's end-of-turn token. Raises ValueError if the template does not render the
        conversation as a prefix of itself (it rewrites earlier turns), which no mask can follow."""
        conv = [*messages, {"role": "assistant", "content": response_content(response)}]
        last = len(conv) - 1
        trained = [i for i, m in enumerate(conv) if m["role"] == "assistant" and (self.all_turns or i == last)]
        out: list[tuple[str, bool]] = []
        done = ""
        for i in trained:
            before = self.render(conv[:i], generation_prompt=True)
            through = self.render(conv[: i + 1], generation_prompt=False)
            if not before.startswith(done) or not through.startswith(before):
                raise ValueError("the chat template does not render the conversation as a prefix of itself")
            body = through[len(before):]
            if self.end_text is not None:
                cut = body.rfind(self.end_text)
                if cut < 0:
                    raise ValueError("an assistant turn does not end with the template's end-of-turn token")
                body = body[: cut + len(self.end_text)]
            out.append((before[len(done):], False))
            out.append((body, True))
            done = before + body
        return out

    def sft_ids(self, messages: list[dict], response: str) -> tuple[list[int], list[int], list[int]]:
        """(prefix ids, prefix labels, final response ids ending in the end-of-turn token); the
        prefix labels carry earlier assistant turns with --train-on-all-turns, else all -100."""
        from forgepipe.data.tokenize import IGNORE_INDEX

        pieces = self.segments(messages, response)
        prefix: list[int] = []
        labels: list[int] = []
        for text, trained in pieces[:-1]:
            ids = self.ids(text)
            prefix += ids
            labels += ids if trained else [IGNORE_INDEX] * len(ids)
        final = self.ids(pieces[-1][0])
        if self.end_text is None:
            final.append(self.end_id)
        return prefix, labels, final


def stop_token_id(tokenizer) -> int:
    """The token generation stops at: the template's end-of-turn token, or EOS without a template."""
    if not tokenizer.chat_template:
        return tokenizer.eos_token_id
    cached = getattr(tokenizer, "_forgepipe_end_of_turn", None)
    if cached is None or cached[0] != tokenizer.chat_template:
        cached = (tokenizer.chat_template, end_of_turn(tokenizer)[0])
        tokenizer._forgepipe_end_of_turn = cached
    return cached[1]


PROBE_USER, PROBE_ANSWER = "ping", "pong pong"


def end_of_turn(tokenizer) -> tuple[int, str | None]:
    """(id, text) of the first special token the template puts after an assistant's answer
    (ChatML's <|im_end|>, Llama 3's <|eot_id|>, ...); EOS and None when it puts none."""
    conv = [{"role": "user", "content": PROBE_USER}]
    before = tokenizer.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
    through = tokenizer.apply_chat_template([*conv, {"role": "assistant", "content": PROBE_ANSWER}], tokenize=False)
    at = through.find(PROBE_ANSWER, len(before) if through.startswith(before) else 0)
    if at < 0:
        raise ForgeError("the chat template does not render an assistant's answer", key="data.chat_template")
    after = through[at + len(PROBE_ANSWER):]
    special = set(tokenizer.all_special_ids)
    for token_id in tokenizer(after, add_special_tokens=False)["input_ids"] if after else []:
        if token_id in special:
            return token_id, tokenizer.convert_ids_to_tokens(token_id)
    if tokenizer.eos_token_id is None:
        raise ForgeError("the chat template ends a turn with no special token and the tokenizer has no EOS",
                         key="data.chat_template")
    return tokenizer.eos_token_id, None

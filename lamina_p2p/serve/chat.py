"""Chat messages -> prompt text, with the model's own chat template (tokenizer_config.json).

Templates come with downloaded checkpoints, so they are untrusted code: they are
rendered in jinja2's immutable sandbox. The environment matches what
transformers gives templates (trim_blocks, lstrip_blocks, `raise_exception`,
`strftime_now`, a `tojson` that keeps non-ASCII), since real templates rely on it.

`encode_chat` turns messages into token ids. Message content is text: a user who types
"<|im_end|>" gets the tokens of those characters, not the end-of-turn token, so they cannot
close their turn and forge a system one. Only the template's own markers are special --
unless the operator opts in (`--allow-special-tokens-in-content`).
"""

from __future__ import annotations

import datetime
import json
import re
import secrets

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment


class ChatTemplateError(ValueError):
    """The model cannot render these messages (no template, or the template refused them)."""


def _raise(message):
    raise TemplateError(message)


def _tojson(value, indent=None):
    return json.dumps(value, ensure_ascii=False, indent=indent)


class ChatTemplate:
    def __init__(self, source: str, bos_token: str | None = None, eos_token: str | None = None):
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
        env.filters["tojson"] = _tojson
        try:
            self.template = env.from_string(source)
        except TemplateError as e:
            raise ChatTemplateError(f"the model's chat template does not compile: {e}") from None
        self.bos_token = bos_token or ""
        self.eos_token = eos_token or ""

    def render(self, messages: list[dict], add_generation_prompt: bool = True, **extra) -> str:
        try:
            return self.template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                        bos_token=self.bos_token, eos_token=self.eos_token, **extra)
        except TemplateError as e:
            raise ChatTemplateError(f"chat template: {e}") from None


def template_for(tokenizer) -> ChatTemplate | None:
    """The tokenizer's chat template, or None when the model has none."""
    if tokenizer is None or not tokenizer.chat_template:
        return None

    def token(tid):
        return tokenizer.tokenizer.id_to_token(tid) if tid is not None else None

    eos = tokenizer.eos_token_ids[0] if tokenizer.eos_token_ids else None
    return ChatTemplate(tokenizer.chat_template, token(tokenizer.bos_token_id), token(eos))


def encode_chat(tokenizer, template: ChatTemplate, messages: list[dict], allow_special_in_content: bool = False,
                add_generation_prompt: bool = True, **extra) -> list[int]:
    """Token ids of the rendered conversation, without a BOS of the tokenizer's own (the template writes
    it, as transformers' apply_chat_template). Raises ChatTemplateError.

    To tell markers from content, the template is rendered a second time with each message's content
    replaced by a random sentinel; putting the real contents back must give the real rendering, and
    then the sentinels' places are exactly the contents' spans. A template that rewrites content (so
    the two disagree) is refused only when some content holds a special-token string.
    """
    text = template.render(messages, add_generation_prompt=add_generation_prompt, **extra)
    contents = [m.get("content") if isinstance(m.get("content"), str) else "" for m in messages]
    if allow_special_in_content or not any(tokenizer.has_special(c) for c in contents):
        return tokenizer.encode(text, add_special_tokens=False)
    nonce = secrets.token_hex(8)
    marks = [f"\ue000{nonce}.{i}\ue001" for i in range(len(messages))]
    skeleton = template.render([{**m, "content": marks[i]} if contents[i] else m for i, m in enumerate(messages)],
                               add_generation_prompt=add_generation_prompt, **extra)
    rebuilt, spans, pos = [], [], 0
    length = 0
    for m in re.finditer(f"\ue000{nonce}\\.(\\d+)\ue001", skeleton):
        rebuilt.append(skeleton[pos:m.start()])
        length += m.start() - pos
        content = contents[int(m.group(1))]
        spans.append((length, length + len(content)))
        rebuilt.append(content)
        length += len(content)
        pos = m.end()
    rebuilt.append(skeleton[pos:])
    if "".join(rebuilt) != text:
        raise ChatTemplateError("message content contains special-token text, and this chat template transforms "
                                "content, so it cannot be kept apart from the template's markers")
    return tokenizer.encode_spans(text, spans)


def normalise_messages(messages) -> list[dict]:
    """Validate OpenAI chat messages; content parts of type "text" are joined into a string."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("'messages' must be a non-empty array")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ValueError(f"messages[{i}] must be an object with a string 'role'")
        content = m.get("content")
        if isinstance(content, list):
            parts = []
            for p in content:
                if not isinstance(p, dict) or p.get("type") != "text" or not isinstance(p.get("text"), str):
                    raise ValueError(f"messages[{i}].content: only text parts are supported")
                parts.append(p["text"])
            content = "".join(parts)
        elif content is not None and not isinstance(content, str):
            raise ValueError(f"messages[{i}].content must be a string or an array of text parts")
        out.append({**m, "content": content if content is not None else ""})
    return out

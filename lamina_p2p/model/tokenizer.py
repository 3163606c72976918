"""Text <-> token ids, exactly as the checkpoint's own tokenizer encodes them.

The tokenizer is a Hugging Face `tokenizers` one: the directory's `tokenizer.json`,
or one built from a GGUF file's metadata (gguf_tokenizer.py). Prompt text goes
through the tokenizer's own post-processor, as `AutoTokenizer(text)` does: Llama 3's
and the tiny preset's add a BOS, SmolLM2's and Qwen's add nothing. A chat
template's output is encoded without it (`add_special_tokens=False`), as
transformers' `apply_chat_template` does, since templates write their BOS themselves.

`parse_special=False` encodes text that merely looks like a special token
(`"<|im_end|>"` typed by a user) as ordinary text; `encode_spans` mixes both, for
a rendered chat whose markers are special and whose message contents are not.
"""

from __future__ import annotations

import re
import threading
from pathlib import Path

from tokenizers import Tokenizer as _HFTokenizer

from .config import ModelError, read_json


class Tokenizer:
    def __init__(self, tokenizer: _HFTokenizer, bos_token_id: int | None,
                 eos_token_ids: tuple[int, ...], chat_template: str | None):
        self.tokenizer = tokenizer
        self.bos_token_id = bos_token_id
        self.eos_token_ids = eos_token_ids
        self.chat_template = chat_template
        # Does the checkpoint's post-processor put a BOS in front of plain text?
        probe = tokenizer.encode("a", add_special_tokens=True).ids
        self.adds_bos = bos_token_id is not None and probe[:1] == [bos_token_id]
        specials = sorted((t.content for t in tokenizer.get_added_tokens_decoder().values() if t.special),
                          key=len, reverse=True)
        self._special_re = re.compile("|".join(map(re.escape, specials))) if specials else None
        self._special_ids = {t: tokenizer.token_to_id(t) for t in specials}
        # encode_special_tokens is a setting of the shared Rust object: flip it under a lock.
        self._lock = threading.Lock()

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True, parse_special: bool = True) -> list[int]:
        """Token ids of `text`; `add_special_tokens`: the checkpoint's BOS/EOS as its post-processor adds them;
        `parse_special`: special-token strings in the text become those tokens (else plain text)."""
        with self._lock:  # every encode: another thread must never see the flag flipped
            if parse_special:
                return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids
            self.tokenizer.encode_special_tokens = True
            try:
                return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids
            finally:
                self.tokenizer.encode_special_tokens = False

    def encode_spans(self, text: str, plain: list[tuple[int, int]]) -> list[int]:
        """Encode `text` (no BOS added) with special tokens parsed everywhere except in the character
        ranges `plain` (sorted, disjoint [start, end)), whose special-token strings stay text.

        The text is cut only at the special tokens that are parsed, and each piece between them is
        encoded whole -- the same cuts the tokenizer makes itself -- so text without special-token
        strings in `plain` encodes exactly as `encode(text, add_special_tokens=False)`.
        """
        if self._special_re is None:
            return self.encode(text, add_special_tokens=False)
        ids: list[int] = []
        start = 0
        for m in self._special_re.finditer(text):
            if any(a < m.end() and m.start() < b for a, b in plain):
                continue  # inside (or overlapping) message content: text
            if m.start() > start:
                ids += self.encode(text[start:m.start()], add_special_tokens=False, parse_special=False)
            ids.append(self._special_ids[m.group()])
            start = m.end()
        if start < len(text):
            ids += self.encode(text[start:], add_special_tokens=False, parse_special=False)
        return ids

    def has_special(self, text: str) -> bool:
        """Does `text` contain a special token's string (e.g. "<|im_end|>")?"""
        return self._special_re is not None and self._special_re.search(text) is not None

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_id(self, token: str) -> int | None:
        return self.tokenizer.token_to_id(token)


def load_tokenizer(path) -> Tokenizer | None:
    """The model's tokenizer (a directory, a .gguf file, or an HF cache repo id; see source.resolve),
    or None when it has none (no tokenizer.json / no GGUF vocabulary).

    BOS/EOS come from tokenizer_config.json (its tokens, as strings), then
    config.json and generation_config.json (ids); EOS ids from all of them are
    kept, since instruct models end turns with tokens other than the base EOS.
    """
    from .source import resolve

    path = resolve(path)
    if path.is_file():
        from .gguf import is_gguf

        if is_gguf(path):
            return load_gguf_tokenizer(path)
    file = path / "tokenizer.json"
    if not file.is_file():
        return None
    try:
        tok = _HFTokenizer.from_file(str(file))
    except Exception as e:  # the Rust side raises plain Exception
        raise ModelError(f"{file}: cannot load tokenizer ({str(e).splitlines()[0]})") from None

    tc = _optional_json(path / "tokenizer_config.json")
    config = _optional_json(path / "config.json")
    gen = _optional_json(path / "generation_config.json")

    def token_id(value, key):
        if isinstance(value, dict):  # AddedToken spelled out
            value = value.get("content")
        if value is None:
            return None
        tid = tok.token_to_id(value)
        if tid is None:
            raise ModelError(f"{path / 'tokenizer_config.json'}: {key} {value!r} is not in tokenizer.json")
        return tid

    if "bos_token" in tc:  # present-but-null means "no BOS" (Qwen), not "look elsewhere"
        bos = token_id(tc["bos_token"], "bos_token")
    else:
        bos = config.get("bos_token_id")
    eos: list[int] = []
    for value in (token_id(tc.get("eos_token"), "eos_token"), config.get("eos_token_id"), gen.get("eos_token_id")):
        for i in value if isinstance(value, list) else [value]:
            if i is not None and i not in eos:
                eos.append(int(i))
    template = tc.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if template is None and (path / "chat_template.jinja").is_file():  # transformers >= 4.43 layout
        template = (path / "chat_template.jinja").read_text(encoding="utf-8")
    return Tokenizer(tok, bos, tuple(eos), template)


def _optional_json(file: Path) -> dict:
    return read_json(file) if file.is_file() else {}


def load_gguf_tokenizer(path, reader=None) -> Tokenizer | None:
    from .gguf import eos_ids, field, open_gguf, release_gguf
    from .gguf_tokenizer import gguf_tokenizer

    reader = reader or open_gguf(path)
    try:
        built = gguf_tokenizer(path, reader)
        if built is None:
            return None
        tok, _ = built
        bos = field(reader, "tokenizer.ggml.bos_token_id")
        return Tokenizer(tok, None if bos is None else int(bos), tuple(eos_ids(reader)),
                         field(reader, "tokenizer.chat_template"))
    finally:
        release_gguf()  # the model was loaded first (or will open the file itself)

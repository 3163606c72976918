"""Text <-> token ids, from a checkpoint's `tokenizer.json` (Hugging Face `tokenizers`).

BOS handling is explicit instead of delegated to the tokenizer's post-processor:
Llama 3's post-processor adds `<|begin_of_text|>`, Qwen's adds nothing, and a
chat template usually writes the BOS itself. So `encode` never lets the
post-processor add special tokens, and prepends `bos_token_id` only when asked.
"""

from __future__ import annotations

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

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        if add_bos and self.bos_token_id is not None and ids[:1] != [self.bos_token_id]:
            ids.insert(0, self.bos_token_id)
        return ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_id(self, token: str) -> int | None:
        return self.tokenizer.token_to_id(token)


def load_tokenizer(path) -> Tokenizer | None:
    """The directory's tokenizer, or None when it has no tokenizer.json.

    BOS/EOS come from tokenizer_config.json (its tokens, as strings), then
    config.json and generation_config.json (ids); EOS ids from all of them are
    kept, since instruct models end turns with tokens other than the base EOS.
    """
    path = Path(path)
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

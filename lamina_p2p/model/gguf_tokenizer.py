"""A GGUF file's tokenizer (its `tokenizer.ggml.*` metadata) as a Hugging Face `tokenizers` tokenizer.

Why not transformers' GGUF converter: transformers is a test-only dependency here
(a large install whose import alone takes seconds), and its converter is internal API
that changed shape between 4.x (`integrations.ggml.GGUF_TO_FAST_CONVERTERS`) and 5.x
(`integrations.gguf.gguf_tokenizer_mapping`). The conversion itself is small given
`tokenizers`' building blocks; what matters is matching llama.cpp, whose tables
(vocabulary types, pre-tokenizer regexes by `tokenizer.ggml.pre`, BOS defaults) are
followed below. transformers' own GGUF loading is the test oracle.

Two vocabulary types, as llama.cpp names them:
- "gpt2": byte-level BPE (Llama 3, Qwen2/3, SmolLM2, Mistral Nemo): vocab + merges,
  text split by the regex its `tokenizer.ggml.pre` names.
- "llama": SentencePiece BPE (Llama 2, Mistral 7B): pieces with scores, "▁" for
  spaces, byte fallback; merges rebuilt from the scores (llama.cpp merges by score).
Tokens marked CONTROL (3) become special added tokens, USER_DEFINED (4) plain added
tokens that still match whole, as llama.cpp matches them.
"""

from __future__ import annotations

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as _HFTokenizer

from .config import ModelError
from .gguf import field

CONTROL, USER_DEFINED = 3, 4

# llama.cpp llama-vocab.cpp, per LLAMA_VOCAB_PRE_TYPE_*.
_LLAMA3 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
           r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
          r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_TEKKEN = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
           r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
           r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# pre type -> (split regex or None for GPT-2's own, digits one by one first, ignore_merges, NFC)
_PRE = {
    "default": (None, False, False, False),
    "gpt-2": (None, False, False, False),
    "gpt2": (None, False, False, False),
    # llama.cpp splits digits first for "smollm"; SmolLM2's own tokenizer.json (and transformers) does
    # not, which differs on runs of spaces before a digit ("  843"). The checkpoint's own tokenizer wins.
    "smollm": (None, False, False, False),
    "llama-bpe": (_LLAMA3, False, True, False),
    "llama3": (_LLAMA3, False, True, False),
    "llama-v3": (_LLAMA3, False, True, False),
    "smaug-bpe": (_LLAMA3, False, False, False),
    "dbrx": (_LLAMA3, False, False, False),
    "qwen2": (_QWEN2, False, False, True),
    "deepseek-r1-qwen": (_QWEN2, False, False, True),
    "tekken": (_TEKKEN, False, True, False),
}


def gguf_tokenizer(path, reader):
    """(tokenizers.Tokenizer, add_bos) from the metadata, or None when the file has no vocabulary."""
    kind = field(reader, "tokenizer.ggml.model")
    if kind is None:
        return None
    tokens = field(reader, "tokenizer.ggml.tokens")
    if not tokens:
        raise ModelError(f"{path}: 'tokenizer.ggml.tokens' is missing or empty")
    types = field(reader, "tokenizer.ggml.token_type") or [1] * len(tokens)
    if kind == "gpt2":
        tok = _byte_level_bpe(path, reader, tokens)
        pre = field(reader, "tokenizer.ggml.pre", "default")
        add_bos_default = _PRE.get(pre, (None, False, False, False))[2]  # llama.cpp: llama3 adds BOS
    elif kind == "llama":
        tok = _sentencepiece_bpe(path, reader, tokens, types)
        add_bos_default = True  # llama.cpp's default for SentencePiece vocabularies
    else:
        raise ModelError(f"{path}: unsupported tokenizer model {kind!r} in 'tokenizer.ggml.model' "
                         "(supported: gpt2, llama)")
    byte_level = kind == "gpt2"
    alphabet = set(pre_tokenizers.ByteLevel.alphabet()) if byte_level else None
    # A control token spelled outside the byte alphabet cannot be matched in a byte-level
    # vocabulary anyway (a mislabel in some files; transformers skips these too).
    special = [AddedToken(t, normalized=False, special=True) for t, ty in zip(tokens, types)
               if ty == CONTROL and (alphabet is None or set(t) <= alphabet)]
    user = [AddedToken(t, normalized=False, special=False) for t, ty in zip(tokens, types) if ty == USER_DEFINED]
    tok.add_special_tokens(special)
    tok.add_tokens(user)
    add_bos = field(reader, "tokenizer.ggml.add_bos_token")
    add_bos = add_bos_default if add_bos is None else bool(add_bos)
    bos = field(reader, "tokenizer.ggml.bos_token_id")
    if add_bos and bos is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{tokens[bos]} $A", pair=f"{tokens[bos]} $A {tokens[bos]} $B",
            special_tokens=[(tokens[bos], int(bos))])
    return tok, add_bos


def _byte_level_bpe(path, reader, tokens):
    merges = field(reader, "tokenizer.ggml.merges")
    if not merges:
        raise ModelError(f"{path}: byte-level BPE vocabulary without 'tokenizer.ggml.merges'")
    pre = field(reader, "tokenizer.ggml.pre", "default")
    if pre not in _PRE:
        raise ModelError(f"{path}: unsupported pre-tokenizer {pre!r} in 'tokenizer.ggml.pre' "
                         f"(supported: {', '.join(_PRE)})")
    split, digits, ignore_merges, nfc = _PRE[pre]
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = _HFTokenizer(models.BPE(vocab=vocab, merges=[tuple(m.split(" ", 1)) for m in merges],
                                  ignore_merges=ignore_merges, fuse_unk=False, byte_fallback=False))
    if split is None:
        steps = [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
    else:
        steps = [pre_tokenizers.Split(Regex(split), behavior="isolated"),
                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    if digits:
        steps.insert(0, pre_tokenizers.Digits(individual_digits=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence(steps)
    if nfc:
        tok.normalizer = normalizers.NFC()
    tok.decoder = decoders.ByteLevel()
    return tok


def _sentencepiece_bpe(path, reader, tokens, types):
    scores = field(reader, "tokenizer.ggml.scores")
    if not scores or len(scores) != len(tokens):
        raise ModelError(f"{path}: SentencePiece vocabulary without one 'tokenizer.ggml.scores' per token")
    vocab = {t: i for i, t in enumerate(tokens)}
    unk_id = field(reader, "tokenizer.ggml.unknown_token_id")
    unk = tokens[unk_id] if unk_id is not None else None
    tok = _HFTokenizer(models.BPE(vocab=vocab, merges=_merges_from_scores(vocab, tokens, scores),
                                  unk_token=unk, fuse_unk=True, byte_fallback=True))
    add_space = field(reader, "tokenizer.ggml.add_space_prefix")
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581",
                                                 prepend_scheme="first" if add_space in (None, True) else "never",
                                                 split=False)
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1 if add_space in (None, True) else 0, 0)])
    return tok


def _merges_from_scores(vocab: dict, tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """SentencePiece BPE merges by score: every split of a piece into two pieces of the vocabulary,
    best-scored merged piece first (as transformers' generate_merges and llama.cpp's tokenizer)."""
    merges = []
    for piece, score in zip(tokens, scores):
        local = [(piece[:i], piece[i:], score) for i in range(1, len(piece))
                 if piece[:i] in vocab and piece[i:] in vocab]
        local.sort(key=lambda m: (vocab[m[0]], vocab[m[1]]))
        merges.extend(local)
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(a, b) for a, b, _ in merges]

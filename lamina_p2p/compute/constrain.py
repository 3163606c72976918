"""Constrained decoding (structured output) with llguidance: a grammar masks the tokens it does not allow.

llguidance was chosen over xgrammar and outlines-core (tools/constrain_bench.py measures the
per-token mask cost on a real 49152-token vocabulary): it has no runtime dependencies (xgrammar
pulls in transformers and triton), it compiles a JSON schema or a Lark grammar lazily (no
up-front automaton over the whole vocabulary, as outlines-core builds), it handles arbitrary
nested JSON (`json_object`), which regex-based outlines-core cannot, and it reads a Hugging Face
`tokenizer.json` directly. vLLM, SGLang and llama.cpp ship it as a backend.

A `Grammar` is compiled and validated once per request; each sequence gets its own `Matcher`,
advanced by every token sampled for it. Masks are computed on the sampling thread.
"""

from __future__ import annotations

import json

import torch

_BITS = torch.arange(32, dtype=torch.int32)


class GrammarError(ValueError):
    """The grammar or schema is invalid (the request's fault: HTTP 400)."""


class TokenSpace:
    """A tokenizer as llguidance sees it (built once per served model: ~10 ms for 50k tokens)."""

    def __init__(self, tokenizer_json: str, vocab_size: int, eos_token_ids: list[int]):
        import llguidance

        self.vocab_size = vocab_size
        self.tokenizer = llguidance.LLTokenizer(tokenizer_json, n_vocab=vocab_size,
                                                eos_token=list(eos_token_ids) or None)

    def token_bytes(self, token: int) -> bytes:
        """The token's own bytes (a token holding part of a UTF-8 character gives just those bytes)."""
        return self.tokenizer.decode_bytes([token])


class Grammar:
    """A validated llguidance grammar (JSON schema, any JSON object, ...)."""

    def __init__(self, space: TokenSpace, grammar: str):
        import llguidance

        err = llguidance.LLMatcher.validate_grammar(grammar, space.tokenizer)
        if err:
            raise GrammarError(err.splitlines()[0])
        self.space = space
        self.grammar = grammar

    @classmethod
    def json_schema(cls, space: TokenSpace, schema: dict) -> Grammar:
        import llguidance

        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema))
        except (ValueError, TypeError) as e:
            raise GrammarError(str(e).splitlines()[0]) from None
        return cls(space, grammar)

    @classmethod
    def json_object(cls, space: TokenSpace) -> Grammar:
        """Any JSON object (OpenAI's response_format {"type": "json_object"})."""
        return cls.json_schema(space, {"type": "object"})

    def matcher(self) -> Matcher:
        return Matcher(self)


class Matcher:
    """One sequence's position in its grammar."""

    def __init__(self, grammar: Grammar):
        import llguidance

        self.space = grammar.space
        self.m = llguidance.LLMatcher(grammar.space.tokenizer, grammar.grammar, log_level=0)
        self._words = torch.empty(-(-self.space.vocab_size // 32), dtype=torch.int32)

    @property
    def done(self) -> bool:
        """The grammar is complete: only end of sequence may follow."""
        return self.m.is_stopped()

    def allowed(self, width: int) -> torch.Tensor:
        """Bool[width]: the tokens the grammar allows next (ids past the tokenizer never are)."""
        self.m.unsafe_compute_mask_ptr(self._words.data_ptr(), self._words.numel() * 4)
        self._check()
        bits = ((self._words[:, None] >> _BITS) & 1).bool().reshape(-1)[: self.space.vocab_size]
        if width <= bits.numel():
            return bits[:width]
        return torch.cat([bits, torch.zeros(width - bits.numel(), dtype=torch.bool)])

    def consume(self, token: int) -> None:
        if not self.m.consume_token(token):
            self._check()
            raise GrammarError(f"token {token} is not allowed by the grammar")

    def _check(self) -> None:
        if self.m.is_error():
            raise GrammarError(self.m.get_error().splitlines()[0])

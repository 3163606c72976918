"""Constrained decoding (structured output) with llguidance: a grammar masks the tokens it does not allow.

Why llguidance (tools/constrain_bench.py, SmolLM2's 49152-token vocabulary, figures in the
issue-14 notes): compiling a JSON schema takes milliseconds where outlines-core builds an index
over the whole vocabulary per schema (1.6-1.9 s), which would be paid per request; outlines-core's
regexes also ignore integer bounds and string patterns that llguidance enforces; per-token mask
cost is of the same order (hundreds of microseconds). xgrammar was not taken: it needs
transformers and triton at run time. llguidance has no Python dependencies, reads a Hugging Face
tokenizer.json directly, is maintained by the guidance project, and vLLM, SGLang and llama.cpp
ship it as a backend.

A `Grammar` is compiled and validated once per request; each sequence gets its own `Matcher`,
advanced by every token sampled for it. Masks are computed on the sampling thread.
"""

from __future__ import annotations

import json

import numpy as np
import torch

COMPACT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


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
        # Compiled once (milliseconds for a JSON schema, more for a large one: callers do this off the
        # event loop); every sequence starts from a copy.
        self._start = llguidance.LLMatcher(space.tokenizer, grammar, log_level=0)
        if self._start.is_error():
            raise GrammarError(self._start.get_error().splitlines()[0])

    @classmethod
    def json_schema(cls, space: TokenSpace, schema: dict) -> Grammar:
        import llguidance

        try:
            # JSON as json.dumps writes it: flexible whitespace would let a model pad forever ("{\n\t\t\n...").
            grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema), overrides=COMPACT)
        except Exception as e:  # noqa: BLE001 - whatever the library says of a schema, it is the schema's fault
            raise GrammarError((str(e) or type(e).__name__).splitlines()[0]) from None
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
        self.space = grammar.space
        self.m = grammar._start.deep_copy()
        self._words = np.empty(-(-self.space.vocab_size // 32), dtype=np.uint32)

    @property
    def done(self) -> bool:
        """The grammar is complete: only end of sequence may follow."""
        return self.m.is_stopped()

    def allowed(self, width: int) -> torch.Tensor:
        """Bool[width]: the tokens the grammar allows next (ids past the tokenizer never are)."""
        self.m.unsafe_compute_mask_ptr(self._words.ctypes.data, self._words.nbytes)
        self._check()
        # Bit i of the little-endian words is token i. numpy, single-threaded: a torch op this small
        # waits on its thread pool (measured 30 ms instead of 0.1 ms on a loaded machine).
        bits = np.unpackbits(self._words.view(np.uint8), bitorder="little")[: self.space.vocab_size]
        allowed = np.zeros(width, dtype=bool)
        n = min(width, bits.size)
        allowed[:n] = bits[:n]
        return torch.from_numpy(allowed)

    def consume(self, token: int) -> None:
        if not self.m.consume_token(token):
            self._check()
            raise GrammarError(f"token {token} is not allowed by the grammar")

    def _check(self) -> None:
        if self.m.is_error():
            raise GrammarError(self.m.get_error().splitlines()[0])

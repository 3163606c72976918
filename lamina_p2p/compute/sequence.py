"""A sequence as the compute peer sees it: its tokens, where its KV lives, how to sample.

`Sequence` is plain state: the prompt and output token ids, `cached` (how many of
them the attention peers hold K/V for; `pending` = the rest, fed to the next step),
its shards (`compute.placement.Shard`: which peer holds which KV heads and token
range) and its per-request sampling state. The engine advances it (tokens, `cached`,
shards); only the scheduler sets `finish_reason`, which ends it. `SamplingParams`
are a request's sampling options, validated once at submission.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lamina_p2p.compute.placement import Shard


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 0.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: bool = False
    top_logprobs: int = 0  # alternatives reported per position (with logprobs), most likely first
    # {token id: added to its logit}, applied before every other step (greedy included), as OpenAI does.
    logit_bias: dict[int, float] | None = None
    # A compute.constrain.Grammar: each sequence gets its own matcher, which masks the tokens the
    # grammar does not allow at that point (structured output).
    grammar: object | None = None

    def validate(self) -> None:
        if self.max_tokens < 1:
            raise ValueError("max_tokens must be at least 1")
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if not 0 <= self.min_p <= 1:
            raise ValueError("min_p must be in [0, 1]")
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0")
        if self.repetition_penalty <= 0:
            raise ValueError("repetition_penalty must be > 0")
        if self.top_logprobs < 0:
            raise ValueError("top_logprobs must be >= 0")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(eq=False)
class Sequence:
    seq_id: int
    prompt: list[int]
    params: SamplingParams
    output: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    shards: list[Shard] = field(default_factory=list)
    cached: int = 0  # tokens whose K/V the attention peers hold
    finish_reason: str | None = None  # "length" | "stop" | "abort" | "error"
    generator: torch.Generator | None = None
    # Per position, with params.top_logprobs: [(token id, logprob), ...] most likely first.
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    # Set when sampling this sequence failed (its own parameters or grammar): it alone ends with
    # finish_reason "error"; the token sampled in that step is a placeholder and is never delivered.
    error: str | None = None
    matcher: object | None = None  # the grammar's state for this sequence

    def __post_init__(self):
        if self.params.seed is not None:
            self.generator = torch.Generator().manual_seed(self.params.seed)
        if self.params.grammar is not None:
            self.matcher = self.params.grammar.matcher()

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.output

    @property
    def length(self) -> int:
        return len(self.prompt) + len(self.output)

    @property
    def pending(self) -> int:
        """Tokens not yet in the KV cache (the prompt at first, then the last sampled token)."""
        return self.length - self.cached

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

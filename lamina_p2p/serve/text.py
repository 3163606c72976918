"""A scheduler Request that turns its tokens into text as they come (detokenise, cut at stop strings).

This runs inside the step loop, so a stop string ends the sequence at the same
step boundary it appears in and its KV is freed right there.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lamina_p2p.compute.scheduler import Request
from lamina_p2p.serve.detok import IncrementalDetokenizer, StopStrings


@dataclass
class TextDelta:
    index: int
    text: str
    tokens: list[int]
    logprobs: list[float]
    token_texts: list[str] | None = None
    finish_reason: str | None = None
    error: str | None = None


@dataclass(eq=False)
class TextRequest(Request):
    tokenizer: object = None
    stops: list[str] = field(default_factory=list)
    index: int = 0
    want_logprobs: bool = False

    def __post_init__(self):
        self.detok = IncrementalDetokenizer(self.tokenizer, self.seq.prompt)
        self.stopper = StopStrings(self.stops)

    def on_tokens(self, tokens, logprobs) -> bool:
        text = self.stopper.feed(self.detok.add(tokens))
        texts = [self.tokenizer.decode([t], skip_special_tokens=False) for t in tokens] if self.want_logprobs else None
        self.queue.put_nowait(TextDelta(self.index, text, tokens, logprobs, texts))
        return self.stopper.stopped

    def on_finish(self, reason, error=None) -> None:
        tail = ""
        if reason in ("stop", "length"):
            tail = self.stopper.feed(self.detok.flush()) + self.stopper.flush()
        self.queue.put_nowait(TextDelta(self.index, tail, [], [], [] if self.want_logprobs else None, reason, error))

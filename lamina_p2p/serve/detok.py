"""Token ids -> text, a few tokens at a time, for streaming.

Byte-level BPE splits multi-byte characters across tokens, and decoding a
token alone drops the spaces or merges some tokenizers add between tokens. So
text is always decoded over a short window of recent tokens: the window's text
before the new tokens is subtracted from its text after them. While the new
text ends in U+FFFD (a character whose remaining bytes are still to come) it is
held back, so a chunk never carries half a character.

Stop strings: the output ends just before the first stop string. Text that
could be the beginning of a stop string is held back until it is clearly not
(or the request finishes without one), so a client never receives text that
would later have to be taken back.
"""

from __future__ import annotations

REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    def __init__(self, tokenizer, context: list[int] | None = None, skip_special_tokens: bool = True):
        self.tok = tokenizer
        self.skip = skip_special_tokens
        # A few prompt tokens as context: the first output token's leading space depends on them.
        self.ids: list[int] = list(context or [])[-4:]
        self.prefix = 0  # window start
        self.read = len(self.ids)  # tokens whose text has been emitted

    def _decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=self.skip)

    def add(self, tokens: list[int]) -> str:
        """Text the new tokens complete (may be '' while a character is incomplete)."""
        self.ids.extend(tokens)
        before = self._decode(self.ids[self.prefix:self.read])
        after = self._decode(self.ids[self.prefix:])
        if after.endswith(REPLACEMENT) or len(after) <= len(before):
            # Incomplete character (or a token that decodes to nothing yet): wait for more.
            return ""
        # Tokenizers that rewrite earlier text as later tokens arrive are rare; the tail by
        # length is what a client would have seen in a full decode.
        new = after[len(before):]
        self.prefix = max(self.prefix, self.read - 4)  # keep a little left context in the window
        self.read = len(self.ids)
        return new

    def flush(self) -> str:
        """At the end: whatever is still held (an incomplete character comes out as U+FFFD)."""
        before = self._decode(self.ids[self.prefix:self.read])
        after = self._decode(self.ids[self.prefix:])
        self.read = len(self.ids)
        return after[len(before):] if after.startswith(before) else ""


class StopStrings:
    """Cuts text at the first stop string and holds back text that may start one."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.text = ""  # all text seen
        self.emitted = 0
        self.stopped = False

    def feed(self, text: str) -> str:
        """Text that may be sent now; after a stop string it returns '' and `stopped` is set."""
        if self.stopped:
            return ""
        scan_from = max(0, self.emitted - max((len(s) for s in self.stops), default=0))
        self.text += text
        if not self.stops:
            out, self.emitted = self.text[self.emitted:], len(self.text)
            return out
        hits = [i for i in (self.text.find(s, scan_from) for s in self.stops) if i >= 0]
        if hits:
            end = min(hits)
            self.stopped = True
            out = self.text[self.emitted:end]
            self.emitted = max(self.emitted, end)
            return out
        safe = len(self.text) - self._held()
        out = self.text[self.emitted:safe] if safe > self.emitted else ""
        self.emitted = max(self.emitted, safe)
        return out

    def _held(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of some stop string."""
        best = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(self.text)), best, -1):
                if self.text.endswith(s[:n]):
                    best = n
                    break
        return best

    def flush(self) -> str:
        """The request ended without a stop string: release what was held."""
        if self.stopped:
            return ""
        out, self.emitted = self.text[self.emitted:], len(self.text)
        return out

"""What can go wrong between a compute peer and its attention peers.

Transports raise `AttentionPeerError` with a `kind` saying what the failure means
for the sequences on that peer (re-place them, preempt, retry later, or give up),
and `NoPeers` when no attention peer is usable at all. The scheduler acts on the
kind (`compute.scheduler.Scheduler.step`); `classify` maps an attention peer's
error reply to a kind.
"""

from __future__ import annotations


class NoPeers(Exception):
    """No attention peer is usable (none joined yet, or all have died)."""


class AttentionPeerError(RuntimeError):
    """An attention peer failed a request.

    kind:
      "failed"  - it is gone or unreachable (died, timed out, connection closed): re-place its shards;
      "kv_full" - it is alive but out of KV: the scheduler preempts;
      "lost"    - it is alive but no longer holds a shard we sent to (it dropped our state): recompute;
      "busy"    - it has too many requests in flight: retry the step after a pause;
      "error"   - it refused the request for another reason.
    """

    def __init__(self, peer: str, reason: str, kind: str = "error"):
        super().__init__(f"attention peer {peer}: {reason}")
        self.peer = peer
        self.reason = reason
        self.kind = kind

    @property
    def kv_full(self) -> bool:
        return self.kind == "kv_full"


def classify(reason: str) -> str:
    """The kind of an error reply, from the exception name the attention peer put in it."""
    if "KVFull" in reason:
        return "kv_full"
    if "ShardError" in reason and ("has no shard" in reason or "not registered" in reason):
        return "lost"
    return "error"

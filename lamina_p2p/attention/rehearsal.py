"""Busy-poll's rehearsal of the attention kernel (net/busypoll.py).

While an attention peer's kernel thread busy-polls for the next attend, it re-runs the Python of the
last message's path (net/stream.py) and, with this, one decode attend of the last request's head
layout and storage on a private one-sequence pool: the kernel's wrapper, planning, dispatch and tile
code are then back in the caches when the next attend comes, instead of evicted by the KV the last
one streamed. Measured (one thread, batch 1, SmolLM2's 9/3/64 bf16 at context 512, a layer's worth of
bytes streamed before each attend): the kernel's span 69-77 -> 59-60 us and the rest of the peer's
path 61-74 -> 55-56 us.
"""

from __future__ import annotations

import numpy as np

from lamina_p2p.attention.service import AttendRequest, AttentionService

_POOL_BYTES = 4 << 20  # a one-sequence pool of a few blocks a kv head, for any head layout


class KernelRehearsal:
    """Runs one decode attend of a layout on its own pool; the attention service it rehearses for is
    never touched. Only the kernel thread uses it."""

    def __init__(self):
        self._layout: tuple | None = None
        self._service: AttentionService | None = None
        self._request: AttendRequest | None = None
        self.runs = 0

    def run(self, storage: str, num_heads: int, num_kv_heads: int, head_dim: int) -> None:
        """One attend of `num_heads` query heads over `num_kv_heads` kv heads of `head_dim` in `storage` (the
        last request's, as held on this peer). Raises what AttentionService raises for a layout it refuses."""
        layout = (storage, num_heads, num_kv_heads, head_dim)
        if layout != self._layout:
            self._layout = self._service = None
            service = AttentionService(_POOL_BYTES)
            service.register("rehearsal", 1, num_heads, num_kv_heads, head_dim, storage, 64)
            dtype = np.float32 if storage == "float32" else np.uint16
            q, kv = np.zeros((1, num_heads, head_dim), dtype), np.zeros((1, num_kv_heads, head_dim), dtype)
            zero, one = np.zeros(1, np.int64), np.ones(1, np.int64)
            service.attend(AttendRequest("rehearsal", 0, zero, zero, one, one, 0, num_kv_heads, q, kv, kv))
            # Then each run appends at position 1 again (a decode step's path) and attends over 2 tokens.
            self._request = AttendRequest("rehearsal", 0, zero, one, one, one, 0, num_kv_heads, q, kv, kv)
            self._layout, self._service = layout, service
        self._service.attend(self._request)
        self.runs += 1

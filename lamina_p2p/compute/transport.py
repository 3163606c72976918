"""The one interface between the engine and wherever attention runs.

Two implementations: `compute.local.LocalTransport` (the same service and kernels
in this process, `generate --attention-peers 0`) and `compute.remote.ClusterTransport`
(attention peers over ZeroMQ). The engine uses nothing of a transport but this.

Two paths, two threads:
- the control path (`bind`, `peers`, `free`, `wait_for_peers`, `mark_failed`, ...)
  is called on the event loop;
- the data path (`send`, `receive`) is called on the engine's dense thread only:
  one layer of one micro-batch goes out with `send` and its (out, lse) comes back
  with `receive`, so the dense thread can run another micro-batch in between
  (the software pipeline of DESIGN.md section 7). No event loop is involved.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np

from lamina_p2p.attention.service import AttendRequest


@runtime_checkable
class Transport(Protocol):
    owner_id: str | None  # the id the engine should own KV under (None: the engine picks one)
    tracer: object | None  # a lamina_p2p.trace.Tracer, or None
    expected_peers: int  # how many attention peers the opener expects (generate waits for them)

    # -- control path: event loop thread ------------------------------------------
    def bind(self, owner: str, geometry: dict) -> None:
        """Register the model geometry with every attention peer, now and as they join."""

    def peers(self) -> dict[str, float]:
        """Usable attention peers (registered, alive, not leaving) -> placement weight."""

    def leaving(self) -> set[str]:
        """Peers that announced they are leaving: their shards must move off."""

    def mark_failed(self, peer: str) -> None:
        """Stop using a peer that failed a request, before membership declares it dead."""

    async def wait_for_peers(self, count: int, timeout: float) -> None:
        """Return once `count` peers are usable; TimeoutError after `timeout` seconds."""

    def block_size(self) -> int:
        """KV block size in tokens: the largest any usable peer reported at registration."""

    def kv_capacity(self) -> dict[str, tuple[int, int]]:
        """peer -> (total, free) KV bytes."""

    def block_bytes_per_token(self) -> float:
        """KV bytes one token of the bound model takes (all heads, all layers)."""

    async def free(self, peer: str, seq_ids: list[int]) -> None:
        """Free these shard keys on a peer (missing ones are ignored)."""

    # -- data path: the engine's dense thread only ----------------------------------
    def send(self, peer: str, req: AttendRequest) -> object:
        """Start one attend; returns a ticket for `receive`. Never blocks on the peer."""

    def receive(self, ticket: object) -> tuple[np.ndarray, np.ndarray]:
        """Wait for an attend's (out f32 [T, Hq, D], lse f32 [T, Hq]).

        Raises AttentionPeerError (kind failed / kv_full / lost / busy / error)."""

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
    tracer: object | None  # a lamina_p2p.trace.Tracer for the attention side's spans, or None
    expected_peers: int  # how many attention peers the opener expects (generate waits for them)

    # -- control path: event loop thread ------------------------------------------
    def bind(self, owner: str, geometry: dict) -> None:
        """Register the model geometry (ModelConfig.kv_geometry) with every attention peer, now and
        as they join. Registration completes asynchronously: `wait_for_peers` waits for it."""

    def peers(self) -> dict[str, float]:
        """Usable attention peers (registered, alive, not leaving) -> placement weight."""

    def leaving(self) -> set[str]:
        """Peers that announced they are leaving: their shards must move off."""

    def mark_failed(self, peer: str) -> None:
        """Stop using a peer that failed a request, before membership declares it dead."""

    async def wait_for_peers(self, count: int, timeout: float, settle_s: float = 0.0) -> None:
        """Return once `count` peers are usable; TimeoutError after `timeout` seconds. With `settle_s`, then wait
        up to that long more for the registrations already under way (peers membership knows), so that a
        starting engine's first placement can use them too."""

    def block_size(self) -> int:
        """KV block size in tokens: the largest any usable peer reported at registration."""

    def kv_capacity(self) -> dict[str, tuple[int, int]]:
        """peer -> (total, free) KV bytes."""

    def block_bytes_per_token(self) -> float:
        """KV bytes one token of the bound model takes (all heads, all layers):
        model.config.geometry_kv_bytes_per_token of the bound geometry."""

    async def free(self, peer: str, seq_ids: list[int]) -> None:
        """Free these shard keys on a peer (missing ones are ignored)."""

    def address(self) -> str | None:
        """The address this compute peer's own server is bound to (None: in process, nothing to dial)."""

    def wire_bytes(self) -> tuple[int, int]:
        """(sent, received) bytes to and from attention peers so far, control and data path
        (0, 0 in process)."""

    # -- data path: the engine's dense thread only ----------------------------------
    def warm_up(self) -> None:
        """Compile (or load from Numba's cache) the data path's code that runs in this process, before
        the first request (Engine.warm_up calls it on the dense thread). Never touches a peer or the KV."""

    def send(self, peer: str, req: AttendRequest) -> object:
        """Start one attend of one layer of one micro-batch on `peer`; returns a ticket for `receive`.

        `req` carries q [query rows, query heads, head_dim] and the new K/V rows [new rows, KV
        heads, head_dim] of the shards held on `peer`, in the registered storage encoding (float32, or float16/bfloat16 as uint16 bits); see
        attention.service.AttendRequest. Never blocks on the peer; a failure to send is raised by
        `receive`.
        """

    def receive(self, ticket: object) -> tuple[np.ndarray, np.ndarray]:
        """Wait for an attend's result: (out float32 [T, Hq, D], lse float32 [T, Hq]), T = the
        request's query rows, Hq its query heads, lse in natural log.

        Raises AttentionPeerError (kind failed / kv_full / lost / busy / error, see
        compute.errors); KVFull as it is in process. Every ticket must be received once, even
        after another failed, so the peer's request ends before its sequences are freed."""

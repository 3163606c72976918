"""In-process attention: the same service, pool and kernels as an attention peer, no network.

Used by `generate --attention-peers 0` and as the single-process baseline. The
engine's dense thread calls the kernel itself (`send` runs it, `receive` hands
back the result): a thread hop per layer costs more than the whole kernel at
decode sizes, and Numba releases the GIL, so nothing else waits on it.
"""

from __future__ import annotations

import threading

from lamina_p2p.attention.kv_pool import DEFAULT_BLOCK_SIZE
from lamina_p2p.attention.service import AttendRequest, AttentionService
from lamina_p2p.model.config import geometry_kv_bytes_per_token
from lamina_p2p.runtime import set_threads
from lamina_p2p.trace import now

LOCAL_PEER = "local"


class _Done:
    """A finished attend: its result, or the error to raise on receive."""

    __slots__ = ("result", "error")

    def __init__(self, result=None, error=None):
        self.result, self.error = result, error


class LocalTransport:
    owner_id = None
    expected_peers = 1

    def __init__(self, kv_bytes: int, block_size: int = DEFAULT_BLOCK_SIZE, threads: int | None = None):
        self.service = AttentionService(kv_bytes, block_size)
        self.threads = threads
        self._threads_set = threading.local()
        self.owner = None
        self.geometry: dict | None = None
        self.tracer = None

    # -- control path -----------------------------------------------------------
    def bind(self, owner: str, geometry: dict) -> None:
        self.owner, self.geometry = owner, geometry
        self.service.register(owner, **geometry)

    def peers(self) -> dict[str, float]:
        return {LOCAL_PEER: float(self.service.budget.total)}

    def leaving(self) -> set[str]:
        return set()

    def mark_failed(self, peer: str) -> None:
        pass  # this process cannot lose its own attention

    async def wait_for_peers(self, count: int, timeout: float) -> None:
        if count > 1:
            raise TimeoutError("in-process attention is one peer")

    def block_size(self) -> int:
        return self.service.block_size

    async def free(self, peer: str, seq_ids: list[int]) -> None:
        self.service.free(self.owner, seq_ids)

    def kv_capacity(self) -> dict[str, tuple[int, int]]:
        """peer -> (total, free) KV bytes."""
        return {LOCAL_PEER: (self.service.budget.total, self.service.budget.free)}

    def block_bytes_per_token(self) -> float:
        """KV bytes one token of the bound model takes on a peer (all heads, all layers)."""
        return geometry_kv_bytes_per_token(self.geometry)

    def address(self) -> str | None:
        return None  # nothing to dial: the attention is in this process

    def wire_bytes(self) -> tuple[int, int]:
        return 0, 0

    def stats(self) -> dict:
        return {LOCAL_PEER: self.service.stats()}

    # -- data path: the dense thread --------------------------------------------
    def send(self, peer: str, req: AttendRequest) -> _Done:
        """Run the attend now, on the calling (dense) thread; `receive` hands back its result.

        req: q [Tq, Hq', D], k/v [Tkv, Hkv', D] in the registered storage (float32, or 16-bit floats
        as uint16 bits). The kernel's errors (ShardError, KVFull) are kept for `receive` to raise,
        as a remote peer's would be; never raises itself."""
        # Numba's thread count is per calling thread: set it once on the thread that runs kernels.
        if self.threads and not getattr(self._threads_set, "done", False):
            set_threads(numba_threads=self.threads)
            self._threads_set.done = True
        t0 = now()
        try:
            done = _Done(self.service.attend(req))
        except Exception as e:  # KVFull goes to the scheduler as it is; anything else is a bug here
            done = _Done(error=e)
        if req.trace and self.tracer is not None:
            self.tracer.add("attention (in process)", "kernel", f"L{req.layer}", t0, now(),
                            {"tokens": len(req.q)})
        return done

    def receive(self, ticket: _Done):
        """The attend's (out float32 [Tq, Hq', D], lse float32 [Tq, Hq']), or raise its error."""
        if ticket.error is not None:
            raise ticket.error
        return ticket.result

    def close(self) -> None:
        pass

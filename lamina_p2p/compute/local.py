"""In-process attention: the same service, pool and kernels as an attention peer, no network.

Used by `generate --attention-peers 0` and as the single-process baseline. The
kernel runs on its own worker thread (Numba releases the GIL), so micro-batches
overlap dense work with attention here too.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

from lamina_p2p.attention.service import AttendRequest, AttentionService
from lamina_p2p.runtime import set_threads
from lamina_p2p.trace import now

LOCAL_PEER = "local"


class LocalTransport:
    def __init__(self, kv_bytes: int, block_size: int = 16, threads: int | None = None):
        self.service = AttentionService(kv_bytes, block_size)
        # Numba's thread count is per calling thread: set it on the thread that runs the kernels.
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="attention", initializer=set_threads,
                                           initargs=(None, threads))
        self.owner = None
        self.tracer = None

    def bind(self, owner: str, geometry: dict) -> None:
        self.owner, self.geometry = owner, geometry
        self.service.register(owner, **geometry)

    def peers(self) -> dict[str, float]:
        return {LOCAL_PEER: float(self.service.budget.total)}

    async def attend(self, peer: str, req: AttendRequest):
        loop = asyncio.get_running_loop()
        if not (req.trace and self.tracer):
            return await loop.run_in_executor(self.executor, self.service.attend, req)
        queued = now()

        def timed():
            t0 = now()
            try:
                return self.service.attend(req)
            finally:
                self.tracer.add("attention (in process)", "queue", f"L{req.layer}", queued, t0)
                self.tracer.add("attention (in process)", "kernel", f"L{req.layer}", t0, now(),
                                {"tokens": int(req.n_q.sum())})

        return await loop.run_in_executor(self.executor, timed)

    async def free(self, peer: str, seq_ids: list[int]) -> None:
        self.service.free(self.owner, seq_ids)

    def kv_capacity(self) -> dict[str, tuple[int, int]]:
        """peer -> (total, free) KV bytes."""
        return {LOCAL_PEER: (self.service.budget.total, self.service.budget.free)}

    def block_bytes_per_token(self) -> float:
        """KV bytes one token of the bound model takes on a peer (all heads, all layers)."""
        g = self.geometry
        return 2 * g["num_layers"] * g["num_kv_heads"] * g["head_dim"] * (4 if g["storage"] == "float32" else 2)

    def stats(self) -> dict:
        return {LOCAL_PEER: self.service.stats()}

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)

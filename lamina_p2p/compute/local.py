"""In-process attention: the same service, pool and kernels as an attention peer, no network.

Used by `generate --attention-peers 0` and as the single-process baseline. The
kernel runs on its own worker thread (Numba releases the GIL), so micro-batches
overlap dense work with attention here too.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

from lamina_p2p.attention.service import AttendRequest, AttentionService

LOCAL_PEER = "local"


class LocalTransport:
    def __init__(self, kv_bytes: int, block_size: int = 16):
        self.service = AttentionService(kv_bytes, block_size)
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="attention")
        self.owner = None

    def bind(self, owner: str, geometry: dict) -> None:
        self.owner = owner
        self.service.register(owner, **geometry)

    def peers(self) -> dict[str, float]:
        return {LOCAL_PEER: float(self.service.budget.total)}

    async def attend(self, peer: str, req: AttendRequest):
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, self.service.attend, req)

    async def free(self, peer: str, seq_ids: list[int]) -> None:
        self.service.free(self.owner, seq_ids)

    def stats(self) -> dict:
        return {LOCAL_PEER: self.service.stats()}

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)

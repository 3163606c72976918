"""In-process attention: the same service, pool and kernels as an attention peer, no network.

Used by `generate --attention-peers 0` and as the single-process baseline. The
engine's dense thread calls the kernel itself (`send` runs it, `receive` hands
back the result): a thread hop per layer costs more than the whole kernel at
decode sizes, and Numba releases the GIL, so nothing else waits on it.

When the engine's dense layers run on a spin pool (model/spin_pool.py: a bf16 model,
two or more threads) a call of up to `pool_max_tokens` query tokens runs its items on
that pool's already-awake worker and the dense thread (model/pool_attention.py) instead
of Numba's OpenMP threads, whose passive second thread must be woken for every call and
then competes with the pool's worker for a CPU. Same results bit for bit as the kernel
with the same plan, same errors.
"""

from __future__ import annotations

import threading

from lamina_p2p.attention import shard_rows
from lamina_p2p.attention.kv_pool import DEFAULT_BLOCK_SIZE
from lamina_p2p.attention.service import AttendRequest, AttentionService
from lamina_p2p.model.config import geometry_kv_bytes_per_token
from lamina_p2p.runtime import set_threads
from lamina_p2p.trace import now

LOCAL_PEER = "local"
POOL_MAX_TOKENS = 64  # see LocalTransport.pool_max_tokens


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
        # Query tokens up to which a call runs on the engine's spin pool (0: never): the dense pool's own row
        # limit (the worker is awake when the dense calls use it). The pool beat the kernel's own choice at
        # every case measured, B1 and B16 at ctx 512 and 2048 (tools/bench_kernels.py --spin-pool,
        # tools/bench_pool_attention.py).
        self.pool_max_tokens = POOL_MAX_TOKENS
        self._spin = None  # (spin_pool.current, pool_attention.attend), imported on first use
        self.pooled_calls = 0  # calls run on the spin pool (tests, traces)

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

    async def wait_for_peers(self, count: int, timeout: float, settle_s: float = 0.0) -> None:
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
            done = _Done(self._attend(req))
        except Exception as e:  # KVFull goes to the scheduler as it is; anything else is a bug here
            done = _Done(error=e)
        if req.trace and self.tracer is not None:
            self.tracer.add("attention (in process)", "kernel", f"L{req.layer}", t0, now(),
                            {"tokens": len(req.q)})
        return done

    def pool_takes(self, tokens: int) -> bool:
        """Whether a call of `tokens` query tokens runs on the engine's spin pool (when it has one and it is free)."""
        return tokens <= self.pool_max_tokens and self.service.device == "cpu"

    def kernel_args(self, req: AttendRequest) -> tuple:
        """The arguments of lamina_kernels.append_attend for `req`, its shard bookkeeping done (service.kernel_args:
        same errors), for a caller that runs the kernel itself: the engine's fused layers (model/fused_step.py), one
        request made for a step's every layer. Counted in pooled_calls, one per layer."""
        args = self.service.kernel_args(req)
        self.pooled_calls += self.geometry["num_layers"] if self.geometry else 1
        return args

    def _attend(self, req: AttendRequest):
        """service.attend, on the engine's spin pool when it has one, the call is small and the pool is free."""
        if self.pool_takes(len(req.q)):
            if self._spin is None:
                from lamina_p2p.model import pool_attention, spin_pool  # numba and torch: only once attending

                self._spin = (spin_pool.current, pool_attention.attend)
            pool = self._spin[0]()
            if pool is not None and pool.lock.acquire(blocking=False):  # held: another caller, the old path
                try:
                    self.pooled_calls += 1
                    return self._spin[1](pool, *self.service.kernel_args(req))
                finally:
                    pool.lock.release()
        return self.service.attend(req)

    def warm_up(self) -> None:
        """The shard-table work of a decode step (attention/shard_rows.py) and the spin pool's attention path
        (model/pool_attention.py), compiled now; the kernel's own variants were compiled when the transport opened
        (launch.open_transport)."""
        shard_rows.compile_now()
        if self.pool_max_tokens and self.service.device == "cpu":
            from lamina_p2p.model import pool_attention

            pool_attention.compile_now()

    def receive(self, ticket: _Done):
        """The attend's (out float32 [Tq, Hq', D], lse float32 [Tq, Hq']), or raise its error."""
        if ticket.error is not None:
            raise ticket.error
        return ticket.result

    def close(self) -> None:
        pass

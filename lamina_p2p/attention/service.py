"""The attention operation behind both the attention peer and in-process attention.

An owner (a compute peer) registers a model geometry, then sends per layer and
micro-batch the new tokens' q/k/v of the sequence shards it keeps here. Shards
are keyed by (owner, sequence id); one peer serves any number of owners from
one byte budget. Everything here is synchronous and runs on a worker thread:
the peer's event loop never calls into it directly.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

import numpy as np

import lamina_kernels as lk
from lamina_p2p.attention.kv_pool import KVBudget, KVFull, KVPool, PoolKey, ShardError

__all__ = ["AttentionService", "AttendRequest", "KVFull", "ShardError"]

STORAGES = ("float32", "float16", "bfloat16")


@dataclass
class Registration:
    owner: str
    pool: KVPool
    num_heads: int
    num_kv_heads: int
    head_dim: int
    storage: str
    scale: float
    slots: dict  # sequence id -> slot


@dataclass
class AttendRequest:
    """One layer of one micro-batch for the shards held here.

    Per sequence i: `ctx[i]` tokens already cached in this shard, `n_q[i]` query
    rows and `n_kv[i]` new K/V rows (n_q[i] to append, 0 for an attend-only
    shard). q is [sum n_q, (h1-h0)*G, D], k and v are [sum n_kv, h1-h0, D], all in
    the registered storage encoding (f16/bf16 as uint16 bits).
    """

    owner: str
    layer: int
    seq_ids: np.ndarray
    ctx: np.ndarray
    n_q: np.ndarray
    n_kv: np.ndarray
    h0: int
    h1: int
    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    trace: bool = False  # the peer reports its queue and kernel times with the reply
    meta: np.ndarray | None = None  # int64 [n, 4] (seq_ids, ctx, n_q, n_kv) as the wire carries it, if built


class AttentionService:
    def __init__(self, kv_bytes: int, block_size: int = 16, device: str = "cpu"):
        if device not in ("cpu", "cuda"):
            raise ValueError(f"device must be cpu or cuda, got {device!r}")
        self.budget = KVBudget(kv_bytes)
        self.block_size = block_size
        self.device = device
        self._pools: dict[PoolKey, KVPool] = {}
        self._owners: dict[str, Registration] = {}
        # Register/free arrive from the event loop's worker threads while a kernel runs.
        self._lock = threading.Lock()

    # -- owners -----------------------------------------------------------------
    def register(self, owner: str, num_layers: int, num_heads: int, num_kv_heads: int, head_dim: int,
                 storage: str, max_positions: int) -> dict:
        if storage not in STORAGES:
            raise ShardError(f"unknown storage dtype {storage!r}; expected one of {', '.join(STORAGES)}")
        for name, value in (("num_layers", num_layers), ("num_heads", num_heads),
                            ("num_kv_heads", num_kv_heads), ("head_dim", head_dim), ("max_positions", max_positions)):
            if not isinstance(value, int) or value <= 0 or value > 1 << 20:
                raise ShardError(f"register: {name} must be a positive int, got {value!r}")
        if num_heads % num_kv_heads:
            raise ShardError(f"register: {num_heads} heads are not a multiple of {num_kv_heads} kv heads")
        key = PoolKey(num_layers, head_dim, storage, self.block_size)
        with self._lock:
            old = self._owners.get(owner)
            if old is not None:
                if (old.pool.key, old.num_heads, old.num_kv_heads) == (key, num_heads, num_kv_heads):
                    return self._describe(old)
                self._drop_locked(owner)
            pool = self._pools.get(key)
            max_blocks = -(-max_positions // self.block_size)
            if pool is None:
                pool = self._pools[key] = KVPool(key, self.budget, max_blocks, num_kv_heads, device=self.device)
            pool.widen_heads(num_kv_heads)
            if max_blocks > pool.max_blocks_per_seq:
                raise ShardError(f"register: max_positions {max_positions} exceeds this pool's "
                                 f"{pool.max_blocks_per_seq * self.block_size}")
            reg = self._owners[owner] = Registration(owner, pool, num_heads, num_kv_heads, head_dim, storage,
                                                     1.0 / math.sqrt(head_dim), {})
            return self._describe(reg)

    def _describe(self, reg: Registration) -> dict:
        return {"block_size": self.block_size, "block_bytes": reg.pool.block_bytes,
                "kv_total_bytes": self.budget.total, "kv_free_bytes": self.budget.free}

    def sequences_by_owner(self) -> dict[str, int]:
        with self._lock:
            return {owner: len(reg.slots) for owner, reg in self._owners.items()}

    def owner_ids(self) -> list[str]:
        with self._lock:
            return list(self._owners)

    def drop_owner(self, owner: str) -> int:
        with self._lock:
            return self._drop_locked(owner)

    def _drop_locked(self, owner: str) -> int:
        reg = self._owners.pop(owner, None)
        if reg is None:
            return 0
        for slot in reg.slots.values():
            reg.pool.release(slot)
        return len(reg.slots)

    def free(self, owner: str, seq_ids) -> int:
        with self._lock:
            reg = self._owner(owner)
            freed = 0
            for sid in seq_ids:
                slot = reg.slots.pop(int(sid), None)
                if slot is not None:
                    reg.pool.release(slot)
                    freed += 1
            return freed

    def stats(self) -> dict:
        with self._lock:
            return {
                "kv_total_bytes": self.budget.total,
                "kv_used_bytes": self.budget.used,
                "kv_free_bytes": self.budget.free,
                "owners": len(self._owners),
                "sequences": sum(len(r.slots) for r in self._owners.values()),
            }

    def _owner(self, owner: str) -> Registration:
        reg = self._owners.get(owner)
        if reg is None:
            raise ShardError(f"owner {owner!r} has not registered a model here")
        return reg

    # -- the operation ----------------------------------------------------------
    def attend(self, req: AttendRequest) -> tuple[np.ndarray, np.ndarray]:
        with self._lock:
            reg = self._owner(req.owner)
            slots = self._prepare(reg, req)
        q_start = _offsets(req.n_q)
        kv_start = _offsets(req.n_kv)
        args = (req.q, req.k, req.v, reg.pool.k, reg.pool.v, reg.pool.table, slots, q_start, kv_start,
                req.ctx.astype(np.int32), req.layer, reg.scale, reg.storage)
        if self.device == "cuda":
            # One launch per layer and micro-batch; the (small) outputs come back for the reply.
            out, lse = lk.append_attend_cuda(*args)
            return out.copy_to_host(), lse.copy_to_host()
        return lk.append_attend(*args)

    def _prepare(self, reg: Registration, req: AttendRequest) -> np.ndarray:
        """Check the request against the shard table, create and grow shards; returns slots."""
        n = len(req.seq_ids)
        heads = req.h1 - req.h0
        group = reg.num_heads // reg.num_kv_heads
        if not (0 <= req.h0 < req.h1 <= reg.num_kv_heads):
            raise ShardError(f"kv head range [{req.h0}, {req.h1}) outside 0..{reg.num_kv_heads}")
        if not 0 <= req.layer < reg.pool.key.num_layers:
            raise ShardError(f"layer {req.layer} outside 0..{reg.pool.key.num_layers - 1}")
        if not (len(req.ctx) == len(req.n_q) == len(req.n_kv) == n) or n == 0:
            raise ShardError("seq_ids, ctx, n_q and n_kv must have one equal, non-zero length")
        if np.any(req.n_q <= 0) or np.any(req.ctx < 0) or np.any((req.n_kv != 0) & (req.n_kv != req.n_q)):
            raise ShardError("each sequence needs n_q > 0, ctx >= 0 and n_kv equal to n_q or 0")
        dtype = np.float32 if reg.storage == "float32" else np.uint16
        t_q, t_kv = int(req.n_q.sum()), int(req.n_kv.sum())
        D = reg.head_dim
        for name, arr, shape in (("q", req.q, (t_q, heads * group, D)), ("k", req.k, (t_kv, heads, D)),
                                 ("v", req.v, (t_kv, heads, D))):
            if arr.dtype != dtype or arr.shape != shape:
                raise ShardError(f"{name}: expected {np.dtype(dtype).name}{list(shape)}, "
                                 f"got {arr.dtype.name}{list(arr.shape)}")
        pool = reg.pool
        known = [reg.slots.get(sid) for sid in req.seq_ids.tolist()]
        if None not in known and len(set(known)) == n:
            return self._prepare_known(reg, req, np.array(known, np.int32), heads)
        slots = np.empty(n, np.int32)
        # A request may name one shard in several entries (a prefill chunk that runs past the end of
        # a shard also attends over all of it): entries are read in order, and an attend-only entry
        # may see what an earlier entry of the same call appends (the kernel appends before it attends).
        length: dict[int, int] = {}  # slot -> cached tokens once this call's appends so far are in
        for i in range(n):
            sid = int(req.seq_ids[i])
            slot = reg.slots.get(sid)
            ctx, n_kv = int(req.ctx[i]), int(req.n_kv[i])
            if slot is None:
                if n_kv == 0 or ctx != 0:
                    raise ShardError(f"sequence {sid} has no shard here")
                slot = reg.slots[sid] = pool.new_table_row(heads)
            elif pool.heads[slot] != heads:
                raise ShardError(f"sequence {sid} holds {pool.heads[slot]} kv heads here, request has {heads}")
            slots[i] = slot
            cached = length.get(slot, int(pool.length[slot]))
            if ctx > cached:
                raise ShardError(f"sequence {sid}: ctx {ctx} > {cached} cached tokens")
            if n_kv:
                if ctx + n_kv > pool.capacity_tokens[slot]:
                    pool.ensure(slot, ctx + n_kv)
                length[slot] = max(cached, ctx + n_kv)
        for slot, end in length.items():
            pool.length[slot] = end
        return slots


    @staticmethod
    def _prepare_known(reg: Registration, req: AttendRequest, slots: np.ndarray, heads: int) -> np.ndarray:
        """_prepare's common case (every decode step): each entry names a shard held here, once. Vectorised."""
        pool = reg.pool
        if np.any(pool.heads[slots] != heads):
            bad = int(np.argmax(pool.heads[slots] != heads))
            raise ShardError(f"sequence {int(req.seq_ids[bad])} holds {pool.heads[slots[bad]]} kv heads here, "
                             f"request has {heads}")
        length = pool.length[slots]
        if np.any(req.ctx > length):
            bad = int(np.argmax(req.ctx > length))
            raise ShardError(f"sequence {int(req.seq_ids[bad])}: ctx {int(req.ctx[bad])} > {int(length[bad])} "
                             f"cached tokens")
        end = req.ctx + req.n_kv
        for i in np.nonzero(end > pool.capacity_tokens[slots])[0]:
            pool.ensure(int(slots[i]), int(end[i]))
        appending = req.n_kv > 0
        pool.length[slots[appending]] = np.maximum(length[appending], end[appending])
        return slots


def _offsets(counts: np.ndarray) -> np.ndarray:
    out = np.zeros(len(counts) + 1, np.int32)
    np.cumsum(counts, out=out[1:])
    return out

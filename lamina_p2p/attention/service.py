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
from dataclasses import dataclass, field

import numpy as np

import lamina_kernels as lk
from lamina_p2p.attention.kv_pool import DEFAULT_BLOCK_SIZE, KVBudget, KVFull, KVPool, PoolKey, ShardError
from lamina_p2p.attention.shard_rows import check_known, extend_lengths

__all__ = ["AttentionService", "AttendRequest", "KVFull", "ShardError"]

STORAGES = lk.STORAGES
_BAD_ENTRY = "each sequence needs n_q > 0, context_len >= 0 and num_new_tokens equal to n_q or 0"


@dataclass
class Registration:
    owner: str
    pool: KVPool
    num_heads: int
    num_kv_heads: int
    head_dim: int
    storage: str
    scale: float
    table_rows: dict  # sequence id -> its block-table row in the pool
    # request layout (meta bytes, h0, h1) -> _Plan: the per-layer work done once per step; see attend
    plans: dict = field(default_factory=dict)
    plans_epoch: int = -1


@dataclass
class AttendRequest:
    """One layer of one micro-batch for the shards held here.

    Per entry i: `context_lens[i]` tokens already cached in the shard `seq_ids[i]`, `n_q[i]` query
    rows and `num_new_tokens[i]` new K/V rows (n_q[i] to append, 0 for an attend-only entry); all
    int64 [n]. q is [sum n_q, (h1-h0)*group_size, D], k and v are [sum num_new_tokens, h1-h0, D],
    all in the registered storage encoding (float32, or f16/bf16 as uint16 bits).
    """

    owner: str
    layer: int
    seq_ids: np.ndarray
    context_lens: np.ndarray
    n_q: np.ndarray
    num_new_tokens: np.ndarray
    h0: int
    h1: int
    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    trace: bool = False  # the peer reports its queue and kernel times with the reply
    # int64 [n, 4] = (seq_ids, context_lens, n_q, num_new_tokens) stacked, as the wire carries it;
    # when given it must equal those columns (it keys the once-per-step plan cache).
    meta: np.ndarray | None = None


@dataclass
class _Plan:
    """What every layer of one request layout shares: checked once, reused by the other layers."""

    table_rows: np.ndarray  # int32 [n]
    q_start: np.ndarray  # int32 [n + 1]
    kv_start: np.ndarray  # int32 [n + 1]
    context_lens: np.ndarray  # int32 [n]
    q_shape: tuple
    kv_shape: tuple


class AttentionService:
    def __init__(self, kv_bytes: int, block_size: int = DEFAULT_BLOCK_SIZE, device: str = "cpu"):
        if device not in ("cpu", "cuda"):
            raise ValueError(f"device must be cpu or cuda, got {device!r}")
        self.budget = KVBudget(kv_bytes)
        self.block_size = block_size
        self.device = device
        self._pools: dict[PoolKey, KVPool] = {}
        self._owners: dict[str, Registration] = {}
        # Register/free arrive from the event loop's worker threads while a kernel runs.
        self._lock = threading.Lock()
        # Bumped by every register/free/drop: a cached plan is valid until a table row may have moved.
        self._epoch = 0

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
            self._epoch += 1
            return self._describe(reg)

    def _describe(self, reg: Registration) -> dict:
        return {"block_size": self.block_size, "block_bytes": reg.pool.block_bytes,
                "kv_total_bytes": self.budget.total, "kv_free_bytes": self.budget.free}

    def sequences_by_owner(self) -> dict[str, int]:
        with self._lock:
            return {owner: len(reg.table_rows) for owner, reg in self._owners.items()}

    def owner_ids(self) -> list[str]:
        with self._lock:
            return list(self._owners)

    def pool_keys(self) -> list[PoolKey]:
        """The model geometries (one KV pool each) this peer holds."""
        with self._lock:
            return list(self._pools)

    def drop_owner(self, owner: str) -> int:
        with self._lock:
            return self._drop_locked(owner)

    def _drop_locked(self, owner: str) -> int:
        self._epoch += 1
        reg = self._owners.pop(owner, None)
        if reg is None:
            return 0
        for row in reg.table_rows.values():
            reg.pool.release(row)
        return len(reg.table_rows)

    def free(self, owner: str, seq_ids) -> int:
        with self._lock:
            self._epoch += 1
            reg = self._owner(owner)
            freed = 0
            for sid in seq_ids:
                row = reg.table_rows.pop(int(sid), None)
                if row is not None:
                    reg.pool.release(row)
                    freed += 1
            return freed

    def stats(self) -> dict:
        with self._lock:
            return {
                "kv_total_bytes": self.budget.total,
                "kv_used_bytes": self.budget.used,
                "kv_free_bytes": self.budget.free,
                "owners": len(self._owners),
                "sequences": self.num_sequences(),
            }

    def num_sequences(self) -> int:
        """Shards held, all owners together (no lock: a racy read is fine for a cap check)."""
        return sum(len(r.table_rows) for r in list(self._owners.values()))

    def storage_of(self, owner: str) -> str:
        """The storage dtype `owner` registered. Raises ShardError for an owner not registered here."""
        with self._lock:
            return self._owner(owner).storage

    def _owner(self, owner: str) -> Registration:
        reg = self._owners.get(owner)
        if reg is None:
            raise ShardError(f"owner {owner!r} has not registered a model here")
        return reg

    # -- the operation ----------------------------------------------------------
    def attend(self, req: AttendRequest) -> tuple[np.ndarray, np.ndarray]:
        """Append the request's new K/V to its shards (creating and growing them), then attend.

        Returns (out float32 [sum n_q, Hq', D], lse float32 [sum n_q, Hq']) with Hq' = (h1-h0) *
        group_size, rows in request order; lse is the natural log of each row's softmax sum (-inf
        where an entry saw no token). Raises ShardError for a request that does not match the
        registration or the shard table (no K/V is written then), KVFull when a shard cannot grow.

        The shard-table work (checks, table rows, offsets) depends on the request's layout only,
        which every layer of a step repeats: it runs for the first layer and is reused (keyed by
        the layout's bytes) until a register/free/drop may have moved a table row.
        """
        args = self.kernel_args(req)
        if self.device == "cuda":
            # One launch per layer and micro-batch; the (small) outputs come back for the reply.
            out, lse = lk.append_attend_cuda(*args)
            return out.copy_to_host(), lse.copy_to_host()
        return lk.append_attend(*args)

    def kernel_args(self, req: AttendRequest) -> tuple:
        """attend's shard-table work (same errors): the arguments of lamina_kernels.append_attend for the request
        (compute/local.py runs them on the engine's spin pool)."""
        with self._lock:
            reg = self._owner(req.owner)
            plan = self._plan(reg, req)
            pool = reg.pool
        return (req.q, req.k, req.v, pool.k, pool.v, pool.table, plan.table_rows, plan.q_start, plan.kv_start,
                plan.context_lens, req.layer, reg.scale, reg.storage)

    def _plan(self, reg: Registration, req: AttendRequest) -> _Plan:
        if not 0 <= req.layer < reg.pool.key.num_layers:
            raise ShardError(f"layer {req.layer} outside 0..{reg.pool.key.num_layers - 1}")
        meta = req.meta if req.meta is not None else \
            np.stack([req.seq_ids, req.context_lens, req.n_q, req.num_new_tokens], axis=1).astype(np.int64)
        key = (meta.tobytes(), req.h0, req.h1)
        if reg.plans_epoch != self._epoch or len(reg.plans) > 64:
            reg.plans.clear()
            reg.plans_epoch = self._epoch
        plan = reg.plans.get(key)
        if plan is None:
            plan = reg.plans[key] = self._prepare(reg, req, meta)
        dtype = np.float32 if reg.storage == "float32" else np.uint16
        if req.q.dtype != dtype or req.k.dtype != dtype or req.v.dtype != dtype or req.q.shape != plan.q_shape \
                or req.k.shape != plan.kv_shape or req.v.shape != plan.kv_shape:
            raise ShardError(f"q/k/v: expected {np.dtype(dtype).name} {list(plan.q_shape)}/{list(plan.kv_shape)}, "
                             f"got {req.q.dtype.name}{list(req.q.shape)}, {req.k.dtype.name}{list(req.k.shape)}, "
                             f"{req.v.dtype.name}{list(req.v.shape)}")
        return plan

    def _prepare(self, reg: Registration, req: AttendRequest, meta: np.ndarray) -> _Plan:
        """Check the request against the shard table, create and grow shards; returns the layout's _Plan.
        meta: the request's columns stacked (AttendRequest.meta)."""
        n = len(req.seq_ids)
        heads = req.h1 - req.h0
        context_lens, num_new = req.context_lens, req.num_new_tokens
        if not (0 <= req.h0 < req.h1 <= reg.num_kv_heads):
            raise ShardError(f"kv head range [{req.h0}, {req.h1}) outside 0..{reg.num_kv_heads}")
        if not (len(context_lens) == len(req.n_q) == len(num_new) == n) or n == 0:
            raise ShardError("seq_ids, context_lens, n_q and num_new_tokens must have one equal, non-zero length")
        known = [reg.table_rows.get(sid) for sid in req.seq_ids.tolist()]
        if None not in known and len(set(known)) == n:
            return self._prepare_known(reg, req, np.require(meta, np.int64, ["C", "W"]), np.array(known, np.int32),
                                       heads)
        if np.any(req.n_q <= 0) or np.any(context_lens < 0) or np.any((num_new != 0) & (num_new != req.n_q)):
            raise ShardError(_BAD_ENTRY)
        self._check_qkv(reg, req, heads, int(req.n_q.sum()), int(num_new.sum()))
        pool = reg.pool
        rows = np.empty(n, np.int32)
        # A request may name one shard in several entries (a prefill chunk that runs past the end of
        # a shard also attends over all of it): entries are read in order, and an attend-only entry
        # may see what an earlier entry of the same call appends (the kernel appends before it attends).
        length: dict[int, int] = {}  # table row -> cached tokens once this call's appends so far are in
        for i in range(n):
            sid = int(req.seq_ids[i])
            row = reg.table_rows.get(sid)
            context_len, new = int(context_lens[i]), int(num_new[i])
            if row is None:
                if new == 0 or context_len != 0:
                    raise ShardError(f"sequence {sid} has no shard here")
                row = reg.table_rows[sid] = pool.new_table_row(heads)
            elif pool.heads[row] != heads:
                raise ShardError(f"sequence {sid} holds {pool.heads[row]} kv heads here, request has {heads}")
            rows[i] = row
            cached = length.get(row, int(pool.length[row]))
            if context_len > cached:
                raise ShardError(f"sequence {sid}: context_len {context_len} > {cached} cached tokens")
            if new:
                if context_len + new > pool.capacity_tokens[row]:
                    pool.ensure(row, context_len + new)
                length[row] = max(cached, context_len + new)
        for row, end in length.items():
            pool.length[row] = end
        return _Plan(rows, _offsets(req.n_q), _offsets(num_new), context_lens.astype(np.int32), tuple(req.q.shape),
                     tuple(req.k.shape))

    @staticmethod
    def _check_qkv(reg: Registration, req: AttendRequest, heads: int, t_q: int, t_kv: int) -> None:
        dtype = np.float32 if reg.storage == "float32" else np.uint16
        D = reg.head_dim
        group_size = reg.num_heads // reg.num_kv_heads
        for name, arr, shape in (("q", req.q, (t_q, heads * group_size, D)), ("k", req.k, (t_kv, heads, D)),
                                 ("v", req.v, (t_kv, heads, D))):
            if arr.dtype != dtype or arr.shape != shape:
                raise ShardError(f"{name}: expected {np.dtype(dtype).name}{list(shape)}, "
                                 f"got {arr.dtype.name}{list(arr.shape)}")

    def _prepare_known(self, reg: Registration, req: AttendRequest, meta: np.ndarray, rows: np.ndarray,
                       heads: int) -> _Plan:
        """_prepare's common case (every decode step): each entry names a shard held here, once (shard_rows.py).
        The same checks in the same order, the same errors, nothing written before they pass."""
        pool = reg.pool
        bad_entry, bad_heads, bad_context, need, q_start, kv_start, context_lens = check_known(
            pool.heads, pool.length, pool.capacity_tokens, rows, heads, meta)
        if bad_entry >= 0:
            raise ShardError(_BAD_ENTRY)
        self._check_qkv(reg, req, heads, int(q_start[-1]), int(kv_start[-1]))
        if bad_heads >= 0:
            raise ShardError(f"sequence {int(meta[bad_heads, 0])} holds {pool.heads[rows[bad_heads]]} kv heads here, "
                             f"request has {heads}")
        if bad_context >= 0:
            raise ShardError(f"sequence {int(meta[bad_context, 0])}: context_len {int(meta[bad_context, 1])} > "
                             f"{int(pool.length[rows[bad_context]])} cached tokens")
        for i in need.tolist():
            pool.ensure(int(rows[i]), int(meta[i, 1] + meta[i, 3]))
        extend_lengths(pool.length, rows, meta)
        return _Plan(rows, q_start, kv_start, context_lens, tuple(req.q.shape), tuple(req.k.shape))


def _offsets(counts: np.ndarray) -> np.ndarray:
    out = np.zeros(len(counts) + 1, np.int32)
    np.cumsum(counts, out=out[1:])
    return out

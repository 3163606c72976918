"""Paged KV storage of an attention peer.

A block holds `block_size` tokens of ONE kv head for ALL layers, so a shard that
holds any range of kv heads, and every model with the same (layers, head_dim,
storage), share one pool. The arrays are `[n_layers, n_blocks, block_size,
head_dim]`: one layer's blocks are one array, so the blocks a sequence was given
together (its prompt's, ascending from the free list) are one run in memory at
every layer, and the kernel's reads of a layer stream through them (a
`[n_blocks, n_layers, ...]` layout put a layer's consecutive blocks n_layers
apart). A sequence shard owns one row of the block table: `table[table_row, h, :]`
lists the blocks of its local kv head h in token order (-1: none yet).

Capacity is a byte budget shared by every pool of the peer. The pool arrays
are allocated with np.empty, which only reserves address space: pages become
resident as blocks are written, so several pools can each be sized to the
whole budget while the budget itself is what limits them.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np

from lamina_kernels import storage_dtype, storage_itemsize
from lamina_p2p.model.config import kv_bytes_per_token


# Tokens a block holds (the default of every pool: in process, attention peers, `--block-size`).
# A block is one contiguous run of block_size x head_dim per (layer, kv head); where blocks are
# scattered (decode's growth, a fragmented free list) the hardware prefetcher restarts at
# every block edge: 16-token runs (2 KiB of bfloat16 at head_dim 64) end before it is up to
# speed. Measured (tools/bench_kernels.py, B16,
# context 2048, 2-vCPU Xeon): 64 costs 0.86-0.97x the time of 16 on every geometry and dtype,
# SmolLM2's bfloat16 0.47 -> 0.68-0.70 of the STREAM read; batch 1 and chunked prefill the same.
# The cost: a sequence's last block is half empty on average (SmolLM2 bfloat16: ~0.7 MB).
DEFAULT_BLOCK_SIZE = 64

# Blocks a table row takes per kv head at once when it grows by fewer (decode, a short chunk): each
# head's are one run in memory. Taken one at a time, a batch's decodes interleave their blocks block by
# block and a long generation's KV scatters. Measured (tools/bench_kernels.py --blocks runs,grown, decode,
# ctx 2048, 2-vCPU Zen 5, two runs, 3 geometries x f32/bf16): batch 16 one at a time 1.01-1.14x the time
# of runs, four at a time 0.92-1.01x the time of one at a time (eight: 0.88-1.00); batch 1 within the
# noise (0.77-1.22 either way). The cost: up to GROW_BLOCKS - 1 blocks a head held ahead of use (SmolLM2
# bf16: up to 4.4 MB a sequence); where the budget cannot hold them a row grows by exactly what it needs.
GROW_BLOCKS = 4


def _aligned_empty(shape, dtype, align: int = 64) -> np.ndarray:
    """np.empty whose data starts on a cache line. A large np.empty comes from mmap with
    a 16-byte header, so every 64-byte vector load of the kernels would straddle two
    lines (measured: ~1.4x slower PV). Still only reserves address space."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape)) * dtype.itemsize
    buf = np.empty(nbytes + align, np.uint8)
    off = (-buf.ctypes.data) % align
    return buf[off:off + nbytes].view(dtype).reshape(shape)


class KVFull(Exception):
    """The byte budget cannot hold the blocks a request needs."""


class ShardError(Exception):
    """A request names a shard that does not exist or contradicts its state."""


@dataclass(frozen=True)
class PoolKey:
    num_layers: int
    head_dim: int
    storage: str
    block_size: int

    def block_bytes(self) -> int:
        # K and V, every layer, one kv head, block_size tokens.
        return self.block_size * kv_bytes_per_token(self.num_layers, 1, self.head_dim, storage_itemsize(self.storage))


class KVBudget:
    """Bytes promised to blocks across all pools of one peer."""

    def __init__(self, total_bytes: int):
        if total_bytes <= 0:
            raise ValueError("kv memory must be positive")
        self.total = int(total_bytes)
        self.used = 0
        self._lock = threading.Lock()

    @property
    def free(self) -> int:
        return self.total - self.used

    def take(self, nbytes: int) -> bool:
        with self._lock:
            if self.used + nbytes > self.total:
                return False
            self.used += nbytes
            return True

    def give(self, nbytes: int) -> None:
        with self._lock:
            self.used -= nbytes


class KVPool:
    """Blocks, block-table rows and the block table for one PoolKey."""

    def __init__(self, key: PoolKey, budget: KVBudget, max_blocks_per_seq: int, num_kv_heads: int,
                 initial_table_rows: int = 64, device: str = "cpu"):
        self.key = key
        self.budget = budget
        self.block_bytes = key.block_bytes()
        n_blocks = max(1, budget.total // self.block_bytes)
        shape = (key.num_layers, n_blocks, key.block_size, key.head_dim)
        dtype = storage_dtype(key.storage)
        if device == "cuda":
            # GPU memory is not overcommitted: this pool takes the whole budget up front.
            from numba import cuda

            self.k = cuda.device_array(shape, dtype)
            self.v = cuda.device_array(shape, dtype)
        else:
            self.k = _aligned_empty(shape, dtype)
            self.v = _aligned_empty(shape, dtype)
        self.max_blocks_per_seq = max_blocks_per_seq
        self.num_kv_heads = num_kv_heads
        # LIFO free list: recently freed blocks are likely still resident. Pops come out
        # ascending (here and after release), so a request's new blocks are runs in memory.
        self._free_blocks = list(range(n_blocks - 1, -1, -1))
        self.table = np.full((initial_table_rows, num_kv_heads, max_blocks_per_seq), -1, np.int32)
        self.capacity_tokens = np.zeros(initial_table_rows, np.int64)  # tokens a row's blocks can hold
        self.heads = np.zeros(initial_table_rows, np.int32)  # kv heads held by a row's shard
        self.length = np.zeros(initial_table_rows, np.int64)  # tokens written (highest position + 1)
        self._free_table_rows = list(range(initial_table_rows - 1, -1, -1))

    def widen_heads(self, num_kv_heads: int) -> None:
        if num_kv_heads <= self.table.shape[1]:
            return
        grown = np.full((self.table.shape[0], num_kv_heads, self.max_blocks_per_seq), -1, np.int32)
        grown[:, : self.table.shape[1]] = self.table
        self.table = grown
        self.num_kv_heads = num_kv_heads

    def new_table_row(self, heads: int) -> int:
        if not self._free_table_rows:
            self._grow_table_rows()
        table_row = self._free_table_rows.pop()
        self.heads[table_row] = heads
        self.capacity_tokens[table_row] = 0
        self.length[table_row] = 0
        return table_row

    def _grow_table_rows(self) -> None:
        old = self.table.shape[0]
        new = old * 2
        table = np.full((new, self.table.shape[1], self.max_blocks_per_seq), -1, np.int32)
        table[:old] = self.table
        self.table = table
        self.capacity_tokens = np.concatenate([self.capacity_tokens, np.zeros(new - old, np.int64)])
        self.heads = np.concatenate([self.heads, np.zeros(new - old, np.int32)])
        self.length = np.concatenate([self.length, np.zeros(new - old, np.int64)])
        self._free_table_rows.extend(range(new - 1, old - 1, -1))

    def ensure(self, table_row: int, tokens: int) -> None:
        """Give the table row enough blocks for `tokens` tokens on each of its heads (past its first take at
        least GROW_BLOCKS more a head where the budget holds them), or raise KVFull (ShardError past the
        shard's token limit)."""
        bs = self.key.block_size
        have = int(self.capacity_tokens[table_row]) // bs
        need = -(-tokens // bs)
        if need <= have:
            return
        if need > self.max_blocks_per_seq:
            raise ShardError(f"{tokens} tokens exceed the {self.max_blocks_per_seq * bs}-token limit of a shard")
        heads = int(self.heads[table_row])
        ahead = min(have + GROW_BLOCKS, self.max_blocks_per_seq) if have else need  # a first take is exact
        for end in (max(need, ahead), need):  # ahead of use where the budget allows, else exactly what is needed
            count = (end - have) * heads
            if count <= len(self._free_blocks) and self.budget.take(count * self.block_bytes):
                break
        else:
            raise KVFull(f"kv pool full: need {(need - have) * heads} blocks, {self.budget.free // self.block_bytes} free")
        blocks = [self._free_blocks.pop() for _ in range(count)]
        self.table[table_row, :heads, have:end] = np.asarray(blocks, np.int32).reshape(heads, end - have)
        self.capacity_tokens[table_row] = end * bs

    def release(self, table_row: int) -> None:
        heads = int(self.heads[table_row])
        used = self.table[table_row, :heads]
        blocks = used[used >= 0]
        self._free_blocks.extend(int(b) for b in blocks[::-1])
        self.budget.give(len(blocks) * self.block_bytes)
        self.table[table_row] = -1
        self.capacity_tokens[table_row] = 0
        self.heads[table_row] = 0
        self.length[table_row] = 0
        self._free_table_rows.append(table_row)

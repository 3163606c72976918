"""The shard-table work of a request whose every entry names a shard already held here, once: every decode step's.

Two compiled calls instead of the ~30 small numpy operations they replace (service.AttentionService._prepare_known).
Why: the engine runs this once a step between two passes over the model's weights, which leave the interpreter's and
numpy's state cold, and there each numpy call cost 5-40 us (SmolLM2, batch 1: ~0.2 ms a step; tools/PERFORMANCE_LOG.md,
stop 39). The attention peer runs the same code for each request layout (once a step too).

`meta` is the request's int64 [n, 4] (seq_ids, context_lens, n_q, num_new_tokens), C-contiguous and writable (one
compiled variant); `rows` int32 [n], the entries' table rows (distinct); `heads` the request's kv heads; `pool_*` the
KV pool's per-row arrays (kv_pool.KVPool: heads int32, length and capacity_tokens int64).
"""

from __future__ import annotations

import numpy as np
from numba import njit

from ..jit import CACHED as _JIT


@njit(**_JIT)
def check_known(pool_heads, pool_length, pool_capacity, rows, heads, meta):
    """Check the entries against their shards; nothing is written.

    Returns (bad_entry, bad_heads, bad_context, need, q_start, kv_start, context_lens32): the first entry
    (-1: none) whose n_q <= 0, context_len < 0 or num_new_tokens is neither 0 nor n_q; the first whose shard holds
    another number of kv heads; the first whose context_len is past its shard's cached tokens; the entries (int64
    [k]) whose shard needs more blocks for context_len + num_new_tokens (KVPool.ensure); the query and new-K/V row
    offsets (int32 [n + 1]) and the context lens as int32 [n], the kernel's arguments. The offsets and the later
    findings are meaningless once bad_entry >= 0."""
    n = rows.shape[0]
    q_start = np.zeros(n + 1, np.int32)
    kv_start = np.zeros(n + 1, np.int32)
    context_lens32 = np.empty(n, np.int32)
    need = np.empty(n, np.int64)
    bad_entry, bad_heads, bad_context, k = -1, -1, -1, 0
    for i in range(n):
        context_len, n_q, new = meta[i, 1], meta[i, 2], meta[i, 3]
        if bad_entry < 0 and (n_q <= 0 or context_len < 0 or (new != 0 and new != n_q)):
            bad_entry = i
        q_start[i + 1] = q_start[i] + n_q
        kv_start[i + 1] = kv_start[i] + new
        context_lens32[i] = context_len
        row = rows[i]
        if bad_heads < 0 and pool_heads[row] != heads:
            bad_heads = i
        if bad_context < 0 and context_len > pool_length[row]:
            bad_context = i
        if context_len + new > pool_capacity[row]:
            need[k] = i
            k += 1
    return bad_entry, bad_heads, bad_context, need[:k], q_start, kv_start, context_lens32


@njit(**_JIT)
def extend_lengths(pool_length, rows, meta):
    """After the appends' blocks are in place: each appending entry's shard holds up to context_len + new tokens."""
    for i in range(rows.shape[0]):
        new = meta[i, 3]
        if new > 0:
            end = meta[i, 1] + new
            if end > pool_length[rows[i]]:
                pool_length[rows[i]] = end


def compile_now() -> None:
    """Compile (or load from the cache) both calls for the types a request gives them, touching no pool."""
    heads, length, capacity = np.zeros(1, np.int32), np.zeros(1, np.int64), np.zeros(1, np.int64)
    rows, meta = np.zeros(1, np.int32), np.zeros((1, 4), np.int64)
    check_known(heads, length, capacity, rows, 0, meta)
    extend_lengths(length, rows, meta)

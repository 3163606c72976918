"""The jitted drivers of the CPU kernel: one call = one layer of one micro-batch in three
passes. (1) append: each (sequence, kv head) copies its new rows (token-major as they
come from the projection) into the head-major pool blocks, on the calling thread when
they are few (a decode step), else a prange; (2) attend: the planned items (plan.py)
in a prange, handed out one at a time, longest first; (3) merge: the split groups'
partials (skipped when there is none). `append_attend_inline` runs the same passes on
the calling thread for a small call, and `plan_and_run_inline` does the shape checks,
validation, plan and (for a small call) that kernel in one dispatch from Python;
`append_attend_threads` is the threaded one. Bits of 16-bit storages are copied as
they are; bfloat16 arrays are viewed as int16 here so each storage compiles its own
decoder (widen16.py).
"""

import numba
import numpy as np
from numba import njit, prange

from . import plan as P
from .checks import shapes_ok as _shapes_ok
from .items import append_rows as _append_rows
from .items import attend_item as _attend_item
from .items import make_scratch as _scratch
from .items import merge_group as _merge_group

# No nnan/ninf: the running max starts at -inf and empty rows yield lse = -inf.
FASTMATH = {"reassoc", "contract", "arcp", "nsz", "afn"}
_JIT = dict(nogil=True, cache=True, error_model="numpy", fastmath=FASTMATH)

# Query positions per group for chunks (prefill). 64 rows x head_dim floats of
# accumulator stay in L1/L2 while the block is streamed.
ROWS_PER_GROUP = 64
# Smallest key range given its own item (per query position).
MIN_SPLIT = 256
# Elements (new tokens x kv heads x head_dim) up to which the append runs on the
# calling thread instead of a parallel region.
SERIAL_APPEND = 1 << 16


@njit(parallel=True, **_JIT)
def append_attend_threads(q, k_new, v_new, k_pool, v_pool, block_table, table_rows, q_start,
                          kv_start, context_lens, layer, scale, groups, items, order, n_parts,
                          q_tile, n_threads, out, lse):
    """The three passes over both threads (see the module docstring)."""
    n_seq = table_rows.shape[0]
    num_kv_heads = k_new.shape[1]  # local kv heads; the table may be wider (rows past it unused)
    d = k_pool.shape[3]
    gsz = q.shape[1] // num_kv_heads
    rmax = q_tile * gsz

    # Pass 1: append. Bits are copied as they are (same encoding in and out). A decode
    # step's rows are a few KB: copied on this thread, a parallel region would cost more.
    if kv_start[n_seq] * num_kv_heads * d <= SERIAL_APPEND:
        for w in range(n_seq * num_kv_heads):
            _append_rows(k_new, v_new, k_pool, v_pool, block_table, table_rows, kv_start,
                         context_lens, layer, w // num_kv_heads, w % num_kv_heads)
    else:
        for w in prange(n_seq * num_kv_heads):
            _append_rows(k_new, v_new, k_pool, v_pool, block_table, table_rows, kv_start,
                         context_lens, layer, w // num_kv_heads, w % num_kv_heads)

    # Pass 2: attend, one item per iteration, longest items first. n_threads:
    # numba.get_num_threads() of the caller (read here it would make the function
    # uncachable); get_thread_id() < n_threads.
    part_o = np.empty((n_parts, rmax, d), np.float32)
    part_lse = np.empty((n_parts, rmax), np.float32)
    scratch = _scratch(n_threads, rmax, k_pool.shape[2], d)
    for it in prange(items.shape[0]):
        _attend_item(order[it], numba.get_thread_id(), q, k_pool, v_pool, block_table, table_rows,
                     q_start, kv_start, context_lens, layer, scale, groups, items, gsz, scratch,
                     part_o, part_lse, out, lse)

    # Pass 3: merge split groups and fill groups that see no key at all (a parallel
    # region only when there is such a group).
    n_groups = groups.shape[0]
    need = n_parts > 0
    for g in range(n_groups):
        need = need or groups[g, P.G_NITEMS] == 0
    for g in prange(n_groups if need else 0):
        _merge_group(g, q_start, groups, gsz, part_o, part_lse, out, lse)


@njit(**_JIT)
def append_attend_inline(q, k_new, v_new, k_pool, v_pool, block_table, table_rows, q_start,
                         kv_start, context_lens, layer, scale, groups, items, order, n_parts,
                         q_tile, n_threads, out, lse):
    """The same passes on the calling thread: for calls too small to pay for waking a
    second thread (plan.validate_and_plan decides; no group is split then)."""
    n_seq = table_rows.shape[0]
    num_kv_heads = k_new.shape[1]
    d = k_pool.shape[3]
    gsz = q.shape[1] // num_kv_heads
    rmax = q_tile * gsz
    for w in range(n_seq * num_kv_heads):
        _append_rows(k_new, v_new, k_pool, v_pool, block_table, table_rows, kv_start,
                     context_lens, layer, w // num_kv_heads, w % num_kv_heads)
    part_o = np.empty((n_parts, rmax, d), np.float32)
    part_lse = np.empty((n_parts, rmax), np.float32)
    scratch = _scratch(1, rmax, k_pool.shape[2], d)
    for it in range(items.shape[0]):
        _attend_item(it, 0, q, k_pool, v_pool, block_table, table_rows, q_start, kv_start,
                     context_lens, layer, scale, groups, items, gsz, scratch, part_o, part_lse,
                     out, lse)
    for g in range(groups.shape[0]):
        _merge_group(g, q_start, groups, gsz, part_o, part_lse, out, lse)


@njit(**_JIT)
def append_attend_16(bf16, q, k_new, v_new, k_pool, v_pool, block_table, table_rows, q_start,
                     kv_start, context_lens, layer, scale, groups, items, order, n_parts, q_tile,
                     n_threads, out, lse):
    """uint16-held storages: bfloat16 bits go to the kernel viewed as int16, which selects
    its decoder at compile time (the views are free here, ~1 us each in Python)."""
    if bf16:
        append_attend_threads(q.view(np.int16), k_new.view(np.int16), v_new.view(np.int16),
                              k_pool.view(np.int16), v_pool.view(np.int16), block_table,
                              table_rows, q_start, kv_start, context_lens, layer,
                              np.float32(scale), groups, items, order, n_parts, q_tile, n_threads,
                              out, lse)
    else:
        append_attend_threads(q, k_new, v_new, k_pool, v_pool, block_table, table_rows,
                              q_start, kv_start, context_lens, layer, np.float32(scale), groups,
                              items, order, n_parts, q_tile, n_threads, out, lse)


@njit(**_JIT)
def plan_and_run_inline(bf16, q, k_new, v_new, k_pool, v_pool, block_table, table_rows, q_start,
                        kv_start, context_lens, layer, scale, n_threads, inline_work, out, lse):
    """plan.validate_and_plan, then, for a call planned inline, the kernel on this thread:
    one dispatch from Python for a small call. Returns the plan (the caller runs the
    threaded kernel when it is not inline, and raises on an error)."""
    num_kv_heads = k_new.shape[1]
    if not _shapes_ok(q, k_new, v_new, k_pool, v_pool, block_table, table_rows, q_start,
                      kv_start, context_lens, layer):
        e = np.empty((0, 8), np.int64)
        return -1, 0, False, 1, e, np.empty((0, 4), np.int64), np.empty(0, np.int64), 0
    gsz = q.shape[1] // num_kv_heads
    err, seq, inline, q_tile, groups, items, order, n_parts = P.validate_and_plan(
        block_table, k_pool.shape[0], table_rows, q_start, kv_start, context_lens, num_kv_heads,
        gsz, k_pool.shape[3], ROWS_PER_GROUP, k_pool.shape[2], n_threads, MIN_SPLIT,
        inline_work)
    if err == 0 and inline and q.shape[0] > 0:
        if bf16:
            append_attend_inline(q.view(np.int16), k_new.view(np.int16), v_new.view(np.int16),
                                 k_pool.view(np.int16), v_pool.view(np.int16), block_table,
                                 table_rows, q_start, kv_start, context_lens, layer,
                                 np.float32(scale), groups, items, order, n_parts, q_tile, 1,
                                 out, lse)
        else:
            append_attend_inline(q, k_new, v_new, k_pool, v_pool, block_table, table_rows,
                                 q_start, kv_start, context_lens, layer, np.float32(scale),
                                 groups, items, order, n_parts, q_tile, 1, out, lse)
    return err, seq, inline, q_tile, groups, items, order, n_parts

"""Work planning shared by the CPU and CUDA kernels.

A call's work is cut into *groups* and *items*:

- a group is (sequence, local kv head, tile of query positions). It owns output rows
  `nq * G` (every query head of the kv head's GQA group for each query position in
  the tile), so each K/V row it reads serves all of them;
- an item is a contiguous key range [k0, k1) of one group. Long groups are split
  into several items so one long sequence still spreads over every worker; the
  partial results of a split group are merged exactly (LSE merge) in a second pass.

Items are sized by token count (key tokens x query positions), not by sequence, and
listed longest first so a dynamically scheduled loop ends on the short ones.

Validation also lives here: the kernels index the pool without bounds checks, so
every block they will touch is checked first.
"""

import numpy as np
from numba import njit

# Columns of the group table.
G_SEQ, G_HEAD, G_J0, G_NQ, G_KMAX, G_ITEM0, G_NITEMS, G_PART0 = range(8)
# Columns of the item table.
I_GROUP, I_K0, I_K1, I_PART = range(4)

_JIT = dict(nogil=True, cache=True, error_model="numpy")

ERRORS = {
    1: "q_start/kv_start must start at 0 and never decrease",
    2: "kv row count must be 0 (attend-only) or equal to the query count",
    3: "table row outside the block table",
    4: "negative context_len",
    5: "tokens do not fit the block table (max_blocks_per_seq * block_size)",
    6: "a block the call needs is -1 or outside the pool",
}


@njit(**_JIT)
def validate(block_table, block_size, n_blocks, table_rows, q_start, kv_start, context_lens, num_kv_heads):
    """Return (error code, sequence index); code 0 means the call is well formed.

    Only the first num_kv_heads rows of a table row are the call's: a shard may hold
    fewer kv heads than the table is wide.
    """
    n_seq = table_rows.shape[0]
    n_rows, _, max_blocks = block_table.shape
    if q_start[0] != 0 or kv_start[0] != 0:
        return 1, 0
    for i in range(n_seq):
        nq = q_start[i + 1] - q_start[i]
        nk = kv_start[i + 1] - kv_start[i]
        if nq < 0 or nk < 0:
            return 1, i
        if nk != 0 and nk != nq:
            return 2, i
        row = table_rows[i]
        if row < 0 or row >= n_rows:
            return 3, i
        if context_lens[i] < 0:
            return 4, i
        total = context_lens[i] + nk
        if total > max_blocks * block_size:
            return 5, i
        nb = (total + block_size - 1) // block_size
        for h in range(num_kv_heads):
            for b in range(nb):
                blk = block_table[row, h, b]
                if blk < 0 or blk >= n_blocks:
                    return 6, i
    return 0, 0


@njit(**_JIT)
def make_plan(q_start, kv_start, context_lens, num_kv_heads, q_tile, block_size, n_workers, min_split):
    """Build (groups, items, order, n_parts).

    q_tile: query positions per group. n_workers: how many workers should get
    items (CPU threads, or a multiple of the GPU's SMs). min_split: smallest key
    range worth an item of its own (per query position).
    """
    n_seq = context_lens.shape[0]
    # Pass 1: count groups and total cost.
    n_groups = 0
    total = 0
    for i in range(n_seq):
        nq = q_start[i + 1] - q_start[i]
        append = kv_start[i + 1] > kv_start[i]
        for j0 in range(0, nq, q_tile):
            nqt = min(q_tile, nq - j0)
            kmax = context_lens[i] + (j0 + nqt if append else 0)
            total += kmax * nqt
            n_groups += 1
    n_groups *= num_kv_heads
    total *= num_kv_heads
    # Aim for ~4 items per worker; never cut finer than min_split keys.
    target = max(total // (4 * n_workers), 1)

    groups = np.empty((n_groups, 8), np.int64)
    g = 0
    n_items = 0
    n_parts = 0
    for i in range(n_seq):
        nq = q_start[i + 1] - q_start[i]
        append = kv_start[i + 1] > kv_start[i]
        for h in range(num_kv_heads):
            for j0 in range(0, nq, q_tile):
                nqt = min(q_tile, nq - j0)
                kmax = context_lens[i] + (j0 + nqt if append else 0)
                span = max((target + nqt - 1) // nqt, min_split)
                span = (span + block_size - 1) // block_size * block_size
                n_split = (kmax + span - 1) // span
                groups[g, G_SEQ] = i
                groups[g, G_HEAD] = h
                groups[g, G_J0] = j0
                groups[g, G_NQ] = nqt
                groups[g, G_KMAX] = kmax
                groups[g, G_ITEM0] = n_items
                groups[g, G_NITEMS] = n_split
                groups[g, G_PART0] = n_parts if n_split > 1 else -1
                n_items += n_split
                if n_split > 1:
                    n_parts += n_split
                g += 1

    items = np.empty((n_items, 4), np.int64)
    cost = np.empty(n_items, np.int64)
    for g in range(n_groups):
        n_split = groups[g, G_NITEMS]
        if n_split == 0:
            continue
        kmax = groups[g, G_KMAX]
        # Equal, block-aligned spans so splits of one group cost about the same.
        per = (kmax + n_split - 1) // n_split
        per = (per + block_size - 1) // block_size * block_size
        for s in range(n_split):
            it = groups[g, G_ITEM0] + s
            k0 = min(s * per, kmax)
            k1 = min(k0 + per, kmax)
            items[it, I_GROUP] = g
            items[it, I_K0] = k0
            items[it, I_K1] = k1
            items[it, I_PART] = groups[g, G_PART0] + s if n_split > 1 else -1
            cost[it] = (k1 - k0) * groups[g, G_NQ]
    # One worker runs the items in table order (the inline path): no sort.
    order = np.argsort(-cost) if n_workers > 1 else np.arange(n_items)
    return groups, items, order, n_parts


@njit(**_JIT)
def call_work(q_start, kv_start, context_lens, num_kv_heads, gsz, head_dim):
    """A call's work in multiply-adds of QK (keys x query rows x head_dim, every kv
    head), plus one row's worth per key for the streaming of K and V: the measure the
    inline threshold (cpu.py) is set in."""
    work = 0
    for i in range(context_lens.shape[0]):
        nq = q_start[i + 1] - q_start[i]
        keys = context_lens[i] + (kv_start[i + 1] - kv_start[i])
        work += keys * (nq * gsz + 1)
    return work * num_kv_heads * head_dim


@njit(**_JIT)
def validate_and_plan(block_table, n_blocks, table_rows, q_start, kv_start, context_lens,
                      num_kv_heads, gsz, head_dim, rows_per_group, block_size, n_workers,
                      min_split, inline_work):
    """validate() then make_plan() in one call (the CPU path's per-call planning).

    The query tile is 1 position for decode, else enough positions for about
    rows_per_group rows (gsz rows each). A call whose call_work() is at most
    inline_work (or with one worker) is planned for the calling thread alone: no
    group is split. Returns (error, sequence, inline, q_tile, groups, items, order,
    n_parts); on error the tables are empty.
    """
    err, seq = validate(block_table, block_size, n_blocks, table_rows, q_start, kv_start,
                        context_lens, num_kv_heads)
    max_chunk = 1
    for i in range(table_rows.shape[0]):
        max_chunk = max(max_chunk, q_start[i + 1] - q_start[i])
    q_tile = max(1, min(max_chunk, rows_per_group // gsz))
    if err:
        e = np.empty((0, 8), np.int64)
        return err, seq, False, q_tile, e, np.empty((0, 4), np.int64), np.empty(0, np.int64), 0
    inline = n_workers <= 1 or call_work(q_start, kv_start, context_lens, num_kv_heads, gsz,
                                         head_dim) <= inline_work
    if inline:
        n_workers = 1
        min_split = 1 << 62  # one item per group: nothing to merge
    groups, items, order, n_parts = make_plan(q_start, kv_start, context_lens, num_kv_heads,
                                              q_tile, block_size, n_workers, min_split)
    return 0, 0, inline, q_tile, groups, items, order, n_parts

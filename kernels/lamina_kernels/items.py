"""The per-work-item bodies of the CPU kernel, shared by its inline and threaded drivers
(drivers.py): `append_rows` copies one (sequence, kv head)'s new K/V rows into its pool
blocks; `attend_item` runs one planned item (plan.py: a key range of one (sequence, kv
head, query tile)) through the vector tiles of tiles.py (head_dim a multiple of 16,
specialised for 64 and 128) or the scalar loops of scalar.py, and normalises it into
out/lse or into a partial slot of a split group; `merge_group` merges a split group's
partials exactly (LSE merge); `make_scratch` allocates the per-thread buffers once per
call.
"""

import numpy as np
from numba import njit

from . import plan as P
from . import tiles as T
from .scalar import attend_rows as _attend_rows
from .widen16 import scaled_row as _scaled_row
from .widen16 import vector_ok as _vector_ok

# No nnan/ninf: the running max starts at -inf and empty rows yield lse = -inf.
FASTMATH = {"reassoc", "contract", "arcp", "nsz", "afn"}
_JIT = dict(nogil=True, cache=True, error_model="numpy", fastmath=FASTMATH)


@njit(**_JIT)
def append_rows(k_new, v_new, k_pool, v_pool, block_table, table_rows, kv_start, context_lens,
                layer, i, h):
    """Copy sequence i's new K/V rows of local kv head h into its pool blocks."""
    bs = k_pool.shape[2]
    d = k_pool.shape[3]
    kv0 = kv_start[i]
    bt_row = block_table[table_rows[i], h]
    for t in range(kv_start[i + 1] - kv0):
        pos = context_lens[i] + t
        blk = bt_row[pos // bs]
        off = pos - (pos // bs) * bs
        for x in range(d):
            k_pool[layer, blk, off, x] = k_new[kv0 + t, h, x]
            v_pool[layer, blk, off, x] = v_new[kv0 + t, h, x]


@njit(inline="always", **_JIT)
def _first_block(it, k_pool, block_table, table_rows, groups, items, layer):
    """Flat pool offset of key 0 of the block holding item it's first key (-1 for it < 0 or an
    item with no key)."""
    if it < 0 or items[it, P.I_K1] <= items[it, P.I_K0]:
        return -1
    g = items[it, P.I_GROUP]
    bs = k_pool.shape[2]
    blk = block_table[table_rows[groups[g, P.G_SEQ]], groups[g, P.G_HEAD], items[it, P.I_K0] // bs]
    return ((layer * k_pool.shape[1] + blk) * bs) * k_pool.shape[3]


@njit(**_JIT)
def attend_item(item, tid, q, k_pool, v_pool, block_table, table_rows, q_start, kv_start,
                context_lens, layer, scale, bf16, dp, groups, items, gsz, scratch, part_o,
                part_lse, out, lse, nxt):
    """One planned item: online softmax of its group's query rows over its key range,
    normalised into out/lse (a whole group) or into its partial slot (a split group).
    scratch: the per-thread buffers of make_scratch, row tid used. dp: a bfloat16 pool's
    QK on bfloat16 dot products where the tiles have them (head_dim 64 and 128; see
    tiles.attend_rows), else ignored. nxt: the item this thread will most likely run
    next (-1: unknown), whose first block the end of this one prefetches."""
    qs_t, lim_t, s_t, m_t, l_t, acc_t, kw_t, vw_t = scratch
    qs = qs_t[tid]
    row_lim = lim_t[tid]
    s = s_t[tid]
    m = m_t[tid]
    l = l_t[tid]
    acc = acc_t[tid]
    d = k_pool.shape[3]
    g = items[item, P.I_GROUP]
    k0 = items[item, P.I_K0]
    k1 = items[item, P.I_K1]
    part = items[item, P.I_PART]
    i = groups[g, P.G_SEQ]
    h = groups[g, P.G_HEAD]
    j0 = groups[g, P.G_J0]
    nqt = groups[g, P.G_NQ]
    n_rows = nqt * gsz
    append = kv_start[i + 1] > kv_start[i]
    # The dot-product QK takes the query rows as stored (raw bfloat16) and scales the scores.
    dpq = T.dp_pool(k_pool, dp) and (d == 64 or d == 128)
    for jj in range(nqt):
        tok = q_start[i] + j0 + jj
        lim = context_lens[i] + (j0 + jj + 1 if append else 0)
        for gg in range(gsz):
            r = jj * gsz + gg
            row_lim[r] = lim
            if dpq:
                T.raw_row(qs, r, q, tok, h * gsz + gg)
            else:
                _scaled_row(qs, r, q, tok, h * gsz + gg, scale, bf16)
    bt_row = block_table[table_rows[i], h]
    pf_next = _first_block(nxt, k_pool, block_table, table_rows, groups, items, layer)
    if not (d % 16 == 0 and _vector_ok(k_pool, bf16)):
        _attend_rows(qs, n_rows, row_lim, k_pool, v_pool, bt_row, layer, k0, k1, s, m, l, acc,
                     bf16)
    elif d == 64:
        T.attend_rows_64(qs, n_rows, row_lim, k_pool, v_pool, bt_row, layer, k0, k1, s, m, l, acc,
                         kw_t[tid], vw_t[tid], bf16, dpq, scale, pf_next)
    elif d == 128:
        T.attend_rows_128(qs, n_rows, row_lim, k_pool, v_pool, bt_row, layer, k0, k1, s, m, l,
                          acc, kw_t[tid], vw_t[tid], bf16, dpq, scale, pf_next)
    else:
        T.attend_rows_any(qs, n_rows, row_lim, k_pool, v_pool, bt_row, layer, k0, k1, s, m, l,
                          acc, kw_t[tid], vw_t[tid], bf16, False, scale, pf_next)
    for jj in range(nqt):
        tok = q_start[i] + j0 + jj
        for gg in range(gsz):
            r = jj * gsz + gg
            hq = h * gsz + gg
            if l[r] > 0.0:
                inv = np.float32(1.0) / l[r]
                val = m[r] + np.log(l[r])
            else:
                inv = np.float32(0.0)
                val = -np.inf
            if part < 0:
                lse[tok, hq] = val
                for x in range(d):
                    out[tok, hq, x] = acc[r, x] * inv
            else:
                part_lse[part, r] = val
                for x in range(d):
                    part_o[part, r, x] = acc[r, x] * inv


@njit(**_JIT)
def merge_group(g, q_start, groups, gsz, part_o, part_lse, out, lse):
    """Exact LSE merge of a split group's partials into out/lse; a group that sees no
    key (no item) gets out = 0, lse = -inf."""
    n_split = groups[g, P.G_NITEMS]
    if n_split == 1:
        return
    d = out.shape[2]
    i = groups[g, P.G_SEQ]
    h = groups[g, P.G_HEAD]
    j0 = groups[g, P.G_J0]
    nqt = groups[g, P.G_NQ]
    p0 = groups[g, P.G_PART0]
    for jj in range(nqt):
        tok = q_start[i] + j0 + jj
        for gg in range(gsz):
            r = jj * gsz + gg
            hq = h * gsz + gg
            mx = -np.inf
            for sp in range(n_split):
                mx = max(mx, part_lse[p0 + sp, r])
            for x in range(d):
                out[tok, hq, x] = 0.0
            if mx == -np.inf:
                lse[tok, hq] = -np.inf
                continue
            wsum = np.float32(0.0)
            for sp in range(n_split):
                v = part_lse[p0 + sp, r]
                if v == -np.inf:
                    continue
                w = np.exp(v - mx)
                wsum += w
                for x in range(d):
                    out[tok, hq, x] += w * part_o[p0 + sp, r, x]
            inv = np.float32(1.0) / wsum
            for x in range(d):
                out[tok, hq, x] *= inv
            lse[tok, hq] = mx + np.log(wsum)


@njit(inline="always", **_JIT)
def _empty64(shape):
    """np.empty(shape, float32) starting on a 64-byte boundary (Numba aligns to 32)."""
    n = 1
    for x in shape:
        n *= x
    raw = np.empty(n + 16, np.float32)
    off = ((64 - raw.ctypes.data % 64) % 64) // 4
    return raw[off:off + n].reshape(shape)


@njit(inline="always", **_JIT)
def sums_width(rmax):
    """Floats per thread of make_scratch's running-sum buffer: the rows' sums l[r] (r <=
    rmax, the spare row included), then from the end 16 lanes per row (tiles.py's lazy
    sums of whole chunks); whole cache lines."""
    return 16 * ((rmax + 16) // 16) + 16 * (rmax + 1)


@njit(**_JIT)
def make_scratch(n_threads, rmax, bs, d):
    """Per-thread buffers of the attend pass (indexed by thread id, not allocated per
    item): query rows, causal limits, scores, running max, running sums (the scalar per
    row, then 16 lanes per row: sums_width), accumulators, and a 16-bit block's K and V
    widened to float32 (tiles.py's staging).

    Each thread's slice is padded by at least one cache line (an unused row or 16
    elements): the slices of two threads never share a line, which they write every
    block (unpadded, m and l of both threads sat in one line: false sharing). The
    float32 buffers start on a cache line, so with head_dim and the block size
    multiples of 16 every 16-lane load and store of the tiles is within one line (at
    Numba's 32-byte alignment half of them split two lines: one thread, bf16 G8 D128
    in cache, 49.2 -> 43.8 ns per key aligned)."""
    pad_s = (16 + bs - 1) // bs  # score rows of bs floats making >= 64 bytes
    return (_empty64((n_threads, rmax + 1, d)),
            np.empty((n_threads, rmax + 8), np.int64),
            _empty64((n_threads, rmax + pad_s, bs)),
            _empty64((n_threads, rmax + 16)),
            _empty64((n_threads, sums_width(rmax))),
            _empty64((n_threads, rmax + 1, d)),
            _empty64((n_threads, bs * d + 16)),
            _empty64((n_threads, bs * d + 16)))

"""Scalar inner loops of the CPU attend pass, for a head_dim that is not a multiple of 16
(the vector tiles of tiles.py take every real checkpoint's). One item's online softmax
streams its key range block by block: QK scores register-blocked 4 query rows x 4 keys
(`_qk4`, `_qk1` for the remainder rows), softmax.softmax_block, then PV into the row
accumulators (`_pv4`, `_pv1`); LLVM vectorises the head_dim loops. K and V are read
from the pool in place and decoded as they are loaded (widen16.dec); the next block's
rows are prefetched inside the tile loops. Scores use q pre-multiplied by `scale`.
"""

import numpy as np
from numba import njit

from .simd import prefetch
from .softmax import softmax_block as _softmax_block
from .widen16 import dec as _dec

# No nnan/ninf: the running max starts at -inf and empty rows yield lse = -inf.
FASTMATH = {"reassoc", "contract", "arcp", "nsz", "afn"}
_JIT = dict(nogil=True, cache=True, error_model="numpy", fastmath=FASTMATH)


@njit(inline="always", **_JIT)
def _prefetch_rows(pool, blk, layer, t, n):
    """Prefetch every cache line of rows [t, t + n) of pool[layer, blk] (into L2).
    Flat offsets, no array views (a view costs an NRT incref/decref)."""
    bs = pool.shape[2]
    d = pool.shape[3]
    base = (layer * pool.shape[1] + blk) * bs * d
    for o in range(base + t * d, base + min(t + n, bs) * d, 64 // pool.itemsize):
        prefetch(pool, o)


@njit(**_JIT)
def _qk4(qs, r, kp, blk, layer, t0, t1, s, bn, pf, bf16):
    """s[r:r+4, t] = qs[r:r+4] . kp[layer, blk, t] for t in [t0, t1).

    Tiles of 4 rows x 4 tokens: 16 dot products in flight, each q and K element
    loaded once per tile (with one token at a time the loop is bound by q loads and
    the horizontal adds of each dot).
    """
    d = kp.shape[3]
    t = t0
    while t + 4 <= t1:
        if pf:
            _prefetch_rows(kp, bn, layer, t, 4)
        a00 = a01 = a02 = a03 = np.float32(0.0)
        a10 = a11 = a12 = a13 = np.float32(0.0)
        a20 = a21 = a22 = a23 = np.float32(0.0)
        a30 = a31 = a32 = a33 = np.float32(0.0)
        for x in range(d):
            q0 = qs[r, x]; q1 = qs[r + 1, x]; q2 = qs[r + 2, x]; q3 = qs[r + 3, x]
            k0 = _dec(kp[layer, blk, t, x], bf16); k1 = _dec(kp[layer, blk, t + 1, x], bf16); k2 = _dec(kp[layer, blk, t + 2, x], bf16); k3 = _dec(kp[layer, blk, t + 3, x], bf16)
            a00 += q0 * k0; a01 += q0 * k1; a02 += q0 * k2; a03 += q0 * k3
            a10 += q1 * k0; a11 += q1 * k1; a12 += q1 * k2; a13 += q1 * k3
            a20 += q2 * k0; a21 += q2 * k1; a22 += q2 * k2; a23 += q2 * k3
            a30 += q3 * k0; a31 += q3 * k1; a32 += q3 * k2; a33 += q3 * k3
        s[r, t] = a00; s[r, t + 1] = a01; s[r, t + 2] = a02; s[r, t + 3] = a03
        s[r + 1, t] = a10; s[r + 1, t + 1] = a11; s[r + 1, t + 2] = a12; s[r + 1, t + 3] = a13
        s[r + 2, t] = a20; s[r + 2, t + 1] = a21; s[r + 2, t + 2] = a22; s[r + 2, t + 3] = a23
        s[r + 3, t] = a30; s[r + 3, t + 1] = a31; s[r + 3, t + 2] = a32; s[r + 3, t + 3] = a33
        t += 4
    while t < t1:
        a0 = a1 = a2 = a3 = np.float32(0.0)
        for x in range(d):
            k = _dec(kp[layer, blk, t, x], bf16)
            a0 += qs[r, x] * k
            a1 += qs[r + 1, x] * k
            a2 += qs[r + 2, x] * k
            a3 += qs[r + 3, x] * k
        s[r, t] = a0; s[r + 1, t] = a1; s[r + 2, t] = a2; s[r + 3, t] = a3
        t += 1


@njit(**_JIT)
def _pv4(p, r, vp, blk, layer, t0, t1, acc, bn, pf, bf16):
    """acc[r:r+4] += sum_t p[r:r+4, t] * vp[layer, blk, t] for t in [t0, t1).

    Four tokens per pass: the 16 probabilities are hoisted (broadcast once), each
    accumulator element is loaded and stored once per 4 tokens, each V element
    decoded once for the 4 rows.
    """
    d = vp.shape[3]
    t = t0
    while t + 4 <= t1:
        if pf:
            _prefetch_rows(vp, bn, layer, t, 4)
        p00 = p[r, t]; p01 = p[r, t + 1]; p02 = p[r, t + 2]; p03 = p[r, t + 3]
        p10 = p[r + 1, t]; p11 = p[r + 1, t + 1]; p12 = p[r + 1, t + 2]; p13 = p[r + 1, t + 3]
        p20 = p[r + 2, t]; p21 = p[r + 2, t + 1]; p22 = p[r + 2, t + 2]; p23 = p[r + 2, t + 3]
        p30 = p[r + 3, t]; p31 = p[r + 3, t + 1]; p32 = p[r + 3, t + 2]; p33 = p[r + 3, t + 3]
        for x in range(d):
            v0 = _dec(vp[layer, blk, t, x], bf16); v1 = _dec(vp[layer, blk, t + 1, x], bf16); v2 = _dec(vp[layer, blk, t + 2, x], bf16); v3 = _dec(vp[layer, blk, t + 3, x], bf16)
            acc[r, x] += p00 * v0 + p01 * v1 + p02 * v2 + p03 * v3
            acc[r + 1, x] += p10 * v0 + p11 * v1 + p12 * v2 + p13 * v3
            acc[r + 2, x] += p20 * v0 + p21 * v1 + p22 * v2 + p23 * v3
            acc[r + 3, x] += p30 * v0 + p31 * v1 + p32 * v2 + p33 * v3
        t += 4
    while t < t1:
        p0 = p[r, t]; p1 = p[r + 1, t]; p2 = p[r + 2, t]; p3 = p[r + 3, t]
        for x in range(d):
            v = _dec(vp[layer, blk, t, x], bf16)
            acc[r, x] += p0 * v
            acc[r + 1, x] += p1 * v
            acc[r + 2, x] += p2 * v
            acc[r + 3, x] += p3 * v
        t += 1


@njit(**_JIT)
def _qk1(qs, r, kp, blk, layer, t0, t1, s, bn, pf, bf16):
    """s[r, t] = qs[r] . kp[layer, blk, t] for one row, four tokens at a time."""
    d = kp.shape[3]
    t = t0
    while t + 4 <= t1:
        if pf:
            _prefetch_rows(kp, bn, layer, t, 4)
        a0 = a1 = a2 = a3 = np.float32(0.0)
        for x in range(d):
            q = qs[r, x]
            a0 += q * _dec(kp[layer, blk, t, x], bf16)
            a1 += q * _dec(kp[layer, blk, t + 1, x], bf16)
            a2 += q * _dec(kp[layer, blk, t + 2, x], bf16)
            a3 += q * _dec(kp[layer, blk, t + 3, x], bf16)
        s[r, t] = a0; s[r, t + 1] = a1; s[r, t + 2] = a2; s[r, t + 3] = a3
        t += 4
    while t < t1:
        a = np.float32(0.0)
        for x in range(d):
            a += qs[r, x] * _dec(kp[layer, blk, t, x], bf16)
        s[r, t] = a
        t += 1


@njit(**_JIT)
def _pv1(p, r, vp, blk, layer, t0, t1, acc, bn, pf, bf16):
    """acc[r] += sum_t p[r, t] * vp[layer, blk, t] for one row, four tokens at a time."""
    d = vp.shape[3]
    t = t0
    while t + 4 <= t1:
        if pf:
            _prefetch_rows(vp, bn, layer, t, 4)
        p0 = p[r, t]; p1 = p[r, t + 1]; p2 = p[r, t + 2]; p3 = p[r, t + 3]
        for x in range(d):
            acc[r, x] += (p0 * _dec(vp[layer, blk, t, x], bf16) + p1 * _dec(vp[layer, blk, t + 1, x], bf16)
                          + p2 * _dec(vp[layer, blk, t + 2, x], bf16) + p3 * _dec(vp[layer, blk, t + 3, x], bf16))
        t += 4
    while t < t1:
        p0 = p[r, t]
        for x in range(d):
            acc[r, x] += p0 * _dec(vp[layer, blk, t, x], bf16)
        t += 1


@njit(**_JIT)
def _prefetch_block(k_pool, v_pool, blk, layer):
    """Prefetch every line of one block's K and V rows of a layer (an item's first block)."""
    _prefetch_rows(k_pool, blk, layer, 0, k_pool.shape[2])
    _prefetch_rows(v_pool, blk, layer, 0, v_pool.shape[2])


@njit(**_JIT)
def attend_rows(qs, n_rows, row_lim, k_pool, v_pool, bt_row, layer, k0, k1, s, m, l, acc,
                bf16):
    """Online softmax of rows qs[:n_rows] over keys [k0, k1); row r sees keys < row_lim[r].

    Leaves the running max m, sum l and unnormalised accumulator acc. K and V are
    read from the pool in place, decoded as they are loaded.
    """
    bs = k_pool.shape[2]
    d = k_pool.shape[3]
    for r in range(n_rows):
        m[r] = -np.inf
        l[r] = 0.0
        for x in range(d):
            acc[r, x] = 0.0
    if k1 <= k0:
        return
    r4 = n_rows - n_rows % 4
    b_end = (k1 + bs - 1) // bs
    _prefetch_block(k_pool, v_pool, bt_row[k0 // bs], layer)
    for b in range(k0 // bs, b_end):
        blk = bt_row[b]  # one table lookup per block, not per token
        # Blocks may be scattered and a layer's rows of one are only bs * d elements, so
        # the hardware prefetcher stops at every block edge: the next block's rows
        # are prefetched a few at a time inside the QK/PV tile loops (a burst of a
        # whole block ahead stalls the loads of the current one in the miss queue).
        pf = b + 1 < b_end
        base = b * bs
        t0 = max(k0 - base, 0)
        t1 = min(k1 - base, bs)
        bn = bt_row[b + 1] if pf else blk
        for r in range(0, r4, 4):
            _qk4(qs, r, k_pool, blk, layer, t0, t1, s, bn, pf and r == 0, bf16)
        for r in range(r4, n_rows):
            _qk1(qs, r, k_pool, blk, layer, t0, t1, s, bn, pf and r == 0, bf16)
        _softmax_block(s, n_rows, row_lim, base, t0, t1, m, l, acc)
        for r in range(0, r4, 4):
            _pv4(s, r, v_pool, blk, layer, t0, t1, acc, bn, pf and r == 0, bf16)
        for r in range(r4, n_rows):
            _pv1(s, r, v_pool, blk, layer, t0, t1, acc, bn, pf and r == 0, bf16)

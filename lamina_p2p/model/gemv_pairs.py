"""The gemv kernel with AVX512-BF16's pair dot product (vdpbf16ps) for bfloat16 weights and activations.

`vdpbf16ps acc, a, b` does acc[i] += a[2i] * b[2i] + a[2i+1] * b[2i+1] over 32 bfloat16 pairs in one
instruction (Intel SDM, VDPBF16PS): a bfloat16 product is exact in float32, so where both operands are
bfloat16 values -- the fused layer's inputs are (fused.py rounds every activation to bfloat16 as torch
does) -- it computes what gemv.py's widen-then-FMA path computes, only summed in another order, with
half the multiply instructions and no widening. (It treats subnormal inputs and results as zero: below
1e-38, nothing a bfloat16 model holds matters there.)

Layout (`pack_pairs`, from gemv.pack's blocks [nb, in, 16]): [nb, in/2, 32], the two weights of each
input pair side by side, `wp[j, p, 2 o + e] = w[16 j + o, 2 p + e]`: one 64-byte load is a vdpbf16ps
operand for 16 outputs. The activations are each row's bfloat16 bits read as int32 pairs
(x[2p] in the low half, x[2p+1] in the high: memory order), in row panels as gemv's (`panel_index`
over pairs), broadcast from memory into every lane. Per pair of inputs and 16 rows: one load and 16
vdpbf16ps, where gemv.py does two loads, two widenings and 32 FMAs.

`block` runs one 16-output block of either layout (the array's last dimension tells: 16 or 32), so
the fused layer and the spin pool call one function. Where Numba's target lacks AVX512-BF16 the same
code compiles to the widen-then-FMA sequence (lamina_kernels.simd.vdpbf16): fused.py packs pairs only
where the CPU has it (`NATIVE`), the tests run the layout everywhere.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from lamina_kernels.simd import dpbf16_default, prefetch_nta, vadd, vbcast_raw32, vdpbf16, vload, vload_raw, vzero

from .gemv import BLOCK, PANEL, _JIT, _block, _put, flat

PAIR_BLOCK = 2 * BLOCK  # int16 elements of one input pair's weights for a block's 16 outputs

# Pairs where the kernels' bfloat16 dot products are on by default: the host and Numba's target have
# AVX512-BF16 (lamina_kernels.simd.dpbf16_default); elsewhere vdpbf16 compiles to widen and FMA.
NATIVE = dpbf16_default()


@njit(inline="always", **_JIT)
def dot_pairs(acc, w, xs, idx):
    """acc + the pair dot products of w (16 lanes of two bfloat16: vload_raw) with xs[idx] (int32: two
    bfloat16) in every lane."""
    return vdpbf16(acc, w, vbcast_raw32(xs, idx))


def pack_pairs(wb: np.ndarray) -> np.ndarray:
    """gemv.pack's bfloat16 blocks [nb, in, 16] (int16 bits, `in` even) -> [nb, in/2, 32] (module doc).
    Raises ValueError for another dtype or an odd `in`."""
    nb, k_in, width = wb.shape
    if wb.dtype != np.int16 or width != BLOCK or k_in % 2:
        raise ValueError(f"pairs need bfloat16 blocks [nb, even in, {BLOCK}], not {wb.dtype} {wb.shape}")
    return np.ascontiguousarray(wb.reshape(nb, k_in // 2, 2, BLOCK).transpose(0, 1, 3, 2)).reshape(nb, k_in // 2, 2 * BLOCK)


def unpack_pairs(wp: np.ndarray) -> np.ndarray:
    """pack_pairs undone: [nb, in/2, 32] -> [nb, in, 16]."""
    nb, k2, _ = wp.shape
    return np.ascontiguousarray(wp.reshape(nb, k2, BLOCK, 2).transpose(0, 1, 3, 2)).reshape(nb, 2 * k2, BLOCK)


@njit(**_JIT)
def block(xs, wb, bias, y, tail, j, n_out):
    """gemv._block for either weight layout: [nb, in, 16] (xs float32 panels) or pack_pairs' [nb, in/2, 32]
    (xs then holds int32 pairs in its first half: fused._load_rows with pairs)."""
    if wb.shape[2] == BLOCK:
        _block(xs, wb, bias, y, tail, j, n_out)
    else:
        _block_pairs(flat(xs).view(np.int32), wb, bias, y, tail, j, n_out)


@njit(inline="always", **_JIT)
def _block_pairs(xi, wb, bias, y, tail, j, n_out):
    rows = y.shape[0]
    k2 = wb.shape[1]
    wf, yf, tf = flat(wb), flat(y), flat(tail)
    base = j * k2 * PAIR_BLOCK
    full = (j + 1) * BLOCK <= n_out
    bv = vload(bias, j * BLOCK)
    step = k2 * PAIR_BLOCK  # neighbours prefetched as gemv._block does (its comment)
    pf = base + step if j + 1 < wb.shape[0] else base
    pb = base - step if j > 0 else base
    for g0 in range(0, rows, PANEL):
        if g0 > 0:
            pf = pb = base
        if g0 + PANEL <= rows:
            _rows16(xi, g0 * k2, wf, base, k2, yf, tf, g0, j, bv, full, n_out, pf, pb)
        else:
            _rows_rest(xi, g0 * k2, rows - g0, wf, base, k2, yf, tf, g0, j, bv, full, n_out, pf, pb)


@njit(**_JIT)
def _rows16(xi, p0, wf, base, k2, y, tail, r, j, bv, full, n_out, pf, pb):
    """A whole panel: 16 rows, each input pair's 16 int32 one 64-byte line."""
    a0 = vzero()
    a1 = vzero()
    a2 = vzero()
    a3 = vzero()
    a4 = vzero()
    a5 = vzero()
    a6 = vzero()
    a7 = vzero()
    a8 = vzero()
    a9 = vzero()
    a10 = vzero()
    a11 = vzero()
    a12 = vzero()
    a13 = vzero()
    a14 = vzero()
    a15 = vzero()
    for p in range(k2):
        prefetch_nta(wf, pf + p * PAIR_BLOCK)
        prefetch_nta(wf, pb + p * PAIR_BLOCK)
        w = vload_raw(wf, base + p * PAIR_BLOCK)
        q = p0 + p * PANEL
        a0 = dot_pairs(a0, w, xi, q)
        a1 = dot_pairs(a1, w, xi, q + 1)
        a2 = dot_pairs(a2, w, xi, q + 2)
        a3 = dot_pairs(a3, w, xi, q + 3)
        a4 = dot_pairs(a4, w, xi, q + 4)
        a5 = dot_pairs(a5, w, xi, q + 5)
        a6 = dot_pairs(a6, w, xi, q + 6)
        a7 = dot_pairs(a7, w, xi, q + 7)
        a8 = dot_pairs(a8, w, xi, q + 8)
        a9 = dot_pairs(a9, w, xi, q + 9)
        a10 = dot_pairs(a10, w, xi, q + 10)
        a11 = dot_pairs(a11, w, xi, q + 11)
        a12 = dot_pairs(a12, w, xi, q + 12)
        a13 = dot_pairs(a13, w, xi, q + 13)
        a14 = dot_pairs(a14, w, xi, q + 14)
        a15 = dot_pairs(a15, w, xi, q + 15)
    _put(y, tail, r + 0, j, vadd(a0, bv), full, n_out)
    _put(y, tail, r + 1, j, vadd(a1, bv), full, n_out)
    _put(y, tail, r + 2, j, vadd(a2, bv), full, n_out)
    _put(y, tail, r + 3, j, vadd(a3, bv), full, n_out)
    _put(y, tail, r + 4, j, vadd(a4, bv), full, n_out)
    _put(y, tail, r + 5, j, vadd(a5, bv), full, n_out)
    _put(y, tail, r + 6, j, vadd(a6, bv), full, n_out)
    _put(y, tail, r + 7, j, vadd(a7, bv), full, n_out)
    _put(y, tail, r + 8, j, vadd(a8, bv), full, n_out)
    _put(y, tail, r + 9, j, vadd(a9, bv), full, n_out)
    _put(y, tail, r + 10, j, vadd(a10, bv), full, n_out)
    _put(y, tail, r + 11, j, vadd(a11, bv), full, n_out)
    _put(y, tail, r + 12, j, vadd(a12, bv), full, n_out)
    _put(y, tail, r + 13, j, vadd(a13, bv), full, n_out)
    _put(y, tail, r + 14, j, vadd(a14, bv), full, n_out)
    _put(y, tail, r + 15, j, vadd(a15, bv), full, n_out)


@njit(inline="always", **_JIT)
def _rows_rest(xi, p0, width, wf, base, k2, y, tail, g0, j, bv, full, n_out, pf, pb):
    """The last panel's `width` (< 16) rows: 8, then 4 at a time, then one by one, as gemv._rows_rest (the
    pairs split in two halves, or four accumulators at one row, to hide vdpbf16ps' latency). Pair p of
    panel row c is xi[p0 + p * width + c]. Each pass is a function of its own, not inlined: with all three
    in one body the 1-row loop ran at 21-22 GB/s on one thread, alone 36 (Zen 5, 226 MB from DRAM; the
    8- and 4-row passes 20-23 -> 28)."""
    c = 0
    while c + 8 <= width:
        _rows8(xi, p0, width, c, wf, base, k2, y, tail, g0, j, bv, full, n_out, pf, pb)
        c += 8
    while c + 4 <= width:
        _rows4(xi, p0, width, c, wf, base, k2, y, tail, g0, j, bv, full, n_out, pf, pb)
        c += 4
    while c < width:
        _row1(xi, p0, width, c, wf, base, k2, y, tail, g0, j, bv, full, n_out, pf, pb)
        c += 1


@njit(**_JIT)
def _rows8(xi, p0, width, c, wf, base, k2, y, tail, g0, j, bv, full, n_out, pf, pb):
    """Rows c .. c + 7 of the last panel, the pairs in two halves (16 accumulators)."""
    half = k2 // 2
    a0 = vzero()
    a1 = vzero()
    a2 = vzero()
    a3 = vzero()
    a4 = vzero()
    a5 = vzero()
    a6 = vzero()
    a7 = vzero()
    b0 = vzero()
    b1 = vzero()
    b2 = vzero()
    b3 = vzero()
    b4 = vzero()
    b5 = vzero()
    b6 = vzero()
    b7 = vzero()
    for p in range(half):
        prefetch_nta(wf, pf + p * PAIR_BLOCK)
        prefetch_nta(wf, pf + (p + half) * PAIR_BLOCK)
        prefetch_nta(wf, pb + p * PAIR_BLOCK)
        prefetch_nta(wf, pb + (p + half) * PAIR_BLOCK)
        w = vload_raw(wf, base + p * PAIR_BLOCK)
        v = vload_raw(wf, base + (p + half) * PAIR_BLOCK)
        q = p0 + p * width + c
        s = q + half * width
        a0 = dot_pairs(a0, w, xi, q)
        a1 = dot_pairs(a1, w, xi, q + 1)
        a2 = dot_pairs(a2, w, xi, q + 2)
        a3 = dot_pairs(a3, w, xi, q + 3)
        a4 = dot_pairs(a4, w, xi, q + 4)
        a5 = dot_pairs(a5, w, xi, q + 5)
        a6 = dot_pairs(a6, w, xi, q + 6)
        a7 = dot_pairs(a7, w, xi, q + 7)
        b0 = dot_pairs(b0, v, xi, s)
        b1 = dot_pairs(b1, v, xi, s + 1)
        b2 = dot_pairs(b2, v, xi, s + 2)
        b3 = dot_pairs(b3, v, xi, s + 3)
        b4 = dot_pairs(b4, v, xi, s + 4)
        b5 = dot_pairs(b5, v, xi, s + 5)
        b6 = dot_pairs(b6, v, xi, s + 6)
        b7 = dot_pairs(b7, v, xi, s + 7)
    if k2 % 2:  # the last pair of an odd count
        p = k2 - 1
        w = vload_raw(wf, base + p * PAIR_BLOCK)
        q = p0 + p * width + c
        a0 = dot_pairs(a0, w, xi, q)
        a1 = dot_pairs(a1, w, xi, q + 1)
        a2 = dot_pairs(a2, w, xi, q + 2)
        a3 = dot_pairs(a3, w, xi, q + 3)
        a4 = dot_pairs(a4, w, xi, q + 4)
        a5 = dot_pairs(a5, w, xi, q + 5)
        a6 = dot_pairs(a6, w, xi, q + 6)
        a7 = dot_pairs(a7, w, xi, q + 7)
    r = g0 + c
    _put(y, tail, r, j, vadd(vadd(a0, b0), bv), full, n_out)
    _put(y, tail, r + 1, j, vadd(vadd(a1, b1), bv), full, n_out)
    _put(y, tail, r + 2, j, vadd(vadd(a2, b2), bv), full, n_out)
    _put(y, tail, r + 3, j, vadd(vadd(a3, b3), bv), full, n_out)
    _put(y, tail, r + 4, j, vadd(vadd(a4, b4), bv), full, n_out)
    _put(y, tail, r + 5, j, vadd(vadd(a5, b5), bv), full, n_out)
    _put(y, tail, r + 6, j, vadd(vadd(a6, b6), bv), full, n_out)
    _put(y, tail, r + 7, j, vadd(vadd(a7, b7), bv), full, n_out)


@njit(**_JIT)
def _rows4(xi, p0, width, c, wf, base, k2, y, tail, g0, j, bv, full, n_out, pf, pb):
    """Rows c .. c + 3 of the last panel, the pairs in two halves (8 accumulators)."""
    half = k2 // 2
    a0 = vzero()
    a1 = vzero()
    a2 = vzero()
    a3 = vzero()
    b0 = vzero()
    b1 = vzero()
    b2 = vzero()
    b3 = vzero()
    for p in range(half):
        prefetch_nta(wf, pf + p * PAIR_BLOCK)
        prefetch_nta(wf, pf + (p + half) * PAIR_BLOCK)
        prefetch_nta(wf, pb + p * PAIR_BLOCK)
        prefetch_nta(wf, pb + (p + half) * PAIR_BLOCK)
        w = vload_raw(wf, base + p * PAIR_BLOCK)
        v = vload_raw(wf, base + (p + half) * PAIR_BLOCK)
        q = p0 + p * width + c
        s = q + half * width
        a0 = dot_pairs(a0, w, xi, q)
        a1 = dot_pairs(a1, w, xi, q + 1)
        a2 = dot_pairs(a2, w, xi, q + 2)
        a3 = dot_pairs(a3, w, xi, q + 3)
        b0 = dot_pairs(b0, v, xi, s)
        b1 = dot_pairs(b1, v, xi, s + 1)
        b2 = dot_pairs(b2, v, xi, s + 2)
        b3 = dot_pairs(b3, v, xi, s + 3)
    if k2 % 2:  # the last pair of an odd count
        p = k2 - 1
        w = vload_raw(wf, base + p * PAIR_BLOCK)
        q = p0 + p * width + c
        a0 = dot_pairs(a0, w, xi, q)
        a1 = dot_pairs(a1, w, xi, q + 1)
        a2 = dot_pairs(a2, w, xi, q + 2)
        a3 = dot_pairs(a3, w, xi, q + 3)
    r = g0 + c
    _put(y, tail, r, j, vadd(vadd(a0, b0), bv), full, n_out)
    _put(y, tail, r + 1, j, vadd(vadd(a1, b1), bv), full, n_out)
    _put(y, tail, r + 2, j, vadd(vadd(a2, b2), bv), full, n_out)
    _put(y, tail, r + 3, j, vadd(vadd(a3, b3), bv), full, n_out)


@njit(**_JIT)
def _row1(xi, p0, width, c, wf, base, k2, y, tail, g0, j, bv, full, n_out, pf, pb):
    """Row c of the last panel: four accumulators over successive pairs; a lone row (width 1) issues no software
    prefetch (gemv._row1)."""
    a0 = vzero()
    a1 = vzero()
    a2 = vzero()
    a3 = vzero()
    p = 0
    lone = width == 1
    while p + 4 <= k2:
        if not lone:
            prefetch_nta(wf, pf + p * PAIR_BLOCK)
            prefetch_nta(wf, pf + (p + 2) * PAIR_BLOCK)
            prefetch_nta(wf, pb + p * PAIR_BLOCK)
            prefetch_nta(wf, pb + (p + 2) * PAIR_BLOCK)
        q = base + p * PAIR_BLOCK
        s = p0 + p * width + c
        a0 = dot_pairs(a0, vload_raw(wf, q), xi, s)
        a1 = dot_pairs(a1, vload_raw(wf, q + PAIR_BLOCK), xi, s + width)
        a2 = dot_pairs(a2, vload_raw(wf, q + 2 * PAIR_BLOCK), xi, s + 2 * width)
        a3 = dot_pairs(a3, vload_raw(wf, q + 3 * PAIR_BLOCK), xi, s + 3 * width)
        p += 4
    while p < k2:
        a0 = dot_pairs(a0, vload_raw(wf, base + p * PAIR_BLOCK), xi, p0 + p * width + c)
        p += 1
    _put(y, tail, g0 + c, j, vadd(vadd(vadd(a0, a1), vadd(a2, a3)), bv), full, n_out)



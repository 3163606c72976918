"""Register-blocked attention tiles over one KV block, written with explicit vectors.

The tile loop (flash attention): a tile of query rows (decode: the GQA group of one
kv head; prefill: the group x up to 64/G query positions) is held in a float32
scratch; each KV block of the pool is streamed once and serves every row of the
tile: QK scores, online-softmax update, then PV into the row accumulators.

- QK: 16 keys at a time, one unreduced 16-lane accumulator per key over head_dim
  (16 zmm registers), folded by one transposed reduction (simd.vsum16) into the 16
  scores; the q chunk is loaded once per 16 keys.
- PV: each row's accumulator, 64 columns at a time (4 registers), stays in registers
  over the block's keys; the probability is broadcast into the FMA.
- K/V are decoded in the vector load (simd.vload), so 16-bit pools move half the
  bytes and are widened in registers.
- The next block's rows are prefetched one key row at a time inside the QK/PV loops
  of the first query row: blocks are scattered, so the hardware prefetcher stops at
  every block edge.

Requires head_dim % 16 == 0 (every real checkpoint's head_dim); cpu.py keeps a
scalar path for the rest.
"""

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from .simd import vfma, vhsum, vload, vstore, vsum16, vzero

FASTMATH = {"reassoc", "contract", "arcp", "nsz", "afn"}
_JIT = dict(nogil=True, cache=True, error_model="numpy", fastmath=FASTMATH)


@intrinsic
def _prefetch(typingctx, arr, idx):
    """llvm.prefetch (read, into L2) of the element at flat index idx of an array."""
    sig = types.void(arr, types.intp)

    def codegen(context, builder, signature, args):
        ary = context.make_array(signature.args[0])(context, builder, args[0])
        i8p = ir.IntType(8).as_pointer()
        i32 = ir.IntType(32)
        fn = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]),
            "llvm.prefetch.p0")
        ptr = builder.bitcast(builder.gep(ary.data, [args[1]]), i8p)
        builder.call(fn, [ptr, i32(0), i32(1), i32(1)])
        return context.get_dummy_value()

    return sig, codegen


@njit(inline="always", **_JIT)
def _prefetch_row(pool, start, d):
    """Prefetch the cache lines of one key row (d elements from flat index start)."""
    for o in range(start, start + d, 64 // pool.itemsize):
        _prefetch(pool, o)


@njit(inline="always", **_JIT)
def qk_rows(qs, n_rows, kp, base, n, s, sc, pf):
    """s[r, sc + t] = qs[r] . kp.flat[base + t*d : base + t*d + d] for r < n_rows, t < n.

    qs: float32 [rows, d] (scaled queries); kp: the K pool (any storage); s: float32
    scores [rows, >= sc + n]. pf >= 0: flat index of the next block's first row,
    prefetched row by row while row 0 is scored.
    """
    d = qs.shape[1]
    sw = s.shape[1]
    for r in range(n_rows):
        qb = r * d
        t = 0
        while t + 16 <= n:
            if pf >= 0 and r == 0:
                for j in range(16):
                    _prefetch_row(kp, pf + (t + j) * d, d)
            a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = vzero()
            a8 = a9 = a10 = a11 = a12 = a13 = a14 = a15 = vzero()
            o = base + t * d
            for c in range(0, d, 16):
                qv = vload(qs, qb + c)
                a0 = vfma(qv, vload(kp, o + c), a0)
                a1 = vfma(qv, vload(kp, o + d + c), a1)
                a2 = vfma(qv, vload(kp, o + 2 * d + c), a2)
                a3 = vfma(qv, vload(kp, o + 3 * d + c), a3)
                a4 = vfma(qv, vload(kp, o + 4 * d + c), a4)
                a5 = vfma(qv, vload(kp, o + 5 * d + c), a5)
                a6 = vfma(qv, vload(kp, o + 6 * d + c), a6)
                a7 = vfma(qv, vload(kp, o + 7 * d + c), a7)
                a8 = vfma(qv, vload(kp, o + 8 * d + c), a8)
                a9 = vfma(qv, vload(kp, o + 9 * d + c), a9)
                a10 = vfma(qv, vload(kp, o + 10 * d + c), a10)
                a11 = vfma(qv, vload(kp, o + 11 * d + c), a11)
                a12 = vfma(qv, vload(kp, o + 12 * d + c), a12)
                a13 = vfma(qv, vload(kp, o + 13 * d + c), a13)
                a14 = vfma(qv, vload(kp, o + 14 * d + c), a14)
                a15 = vfma(qv, vload(kp, o + 15 * d + c), a15)
            vstore(s, r * sw + sc + t,
                   vsum16(a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11, a12, a13, a14, a15))
            t += 16
        while t < n:
            if pf >= 0 and r == 0:
                _prefetch_row(kp, pf + t * d, d)
            a = vzero()
            o = base + t * d
            for c in range(0, d, 16):
                a = vfma(vload(qs, qb + c), vload(kp, o + c), a)
            s[r, sc + t] = vhsum(a)
            t += 1


@njit(inline="always", **_JIT)
def pv_rows(p, n_rows, vp, base, n, acc, sc, pf):
    """acc[r] += sum_t p[r, sc + t] * vp.flat[base + t*d : ... + d] for r < n_rows, t < n.

    acc: float32 [rows, d]; p: float32 probabilities (0 for masked keys).
    """
    d = acc.shape[1]
    for r in range(n_rows):
        c = 0
        while c + 64 <= d:
            o = r * d + c
            x0 = vload(acc, o)
            x1 = vload(acc, o + 16)
            x2 = vload(acc, o + 32)
            x3 = vload(acc, o + 48)
            for t in range(n):
                if pf >= 0 and r == 0 and c == 0:
                    _prefetch_row(vp, pf + t * d, d)
                pt = p[r, sc + t]
                b = base + t * d + c
                x0 = vfma(vload(vp, b), pt, x0)
                x1 = vfma(vload(vp, b + 16), pt, x1)
                x2 = vfma(vload(vp, b + 32), pt, x2)
                x3 = vfma(vload(vp, b + 48), pt, x3)
            vstore(acc, o, x0)
            vstore(acc, o + 16, x1)
            vstore(acc, o + 32, x2)
            vstore(acc, o + 48, x3)
            c += 64
        while c < d:
            o = r * d + c
            x0 = vload(acc, o)
            for t in range(n):
                if pf >= 0 and r == 0 and c == 0:
                    _prefetch_row(vp, pf + t * d, d)
                x0 = vfma(vload(vp, base + t * d + c), p[r, sc + t], x0)
            vstore(acc, o, x0)
            c += 16


@njit(**_JIT)
def prefetch_block_rows(pool, start, n, d):
    """Prefetch n key rows from flat index start (an item's first block)."""
    for t in range(n):
        _prefetch_row(pool, start + t * d, d)

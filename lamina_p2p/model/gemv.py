"""A bandwidth-bound GEMV / skinny GEMM for decode: y = x @ w.T + b with 16-bit weights.

At batch 1 a decode step reads every weight once and does two flops with it, so the
step costs what its bytes cost, if the kernel keeps the memory system busy. FBGEMM's
fp16 GEMM (linear._Fp16Gemm) is built for GEMM: at M = 1 it read SmolLM2's 7 MB a
layer at ~6 GB/s of the ~17-21 GB/s two cores of the 2-vCPU Xeon read.

Layout (built once at load, `pack`): the weights [out, in] become blocks of 16 output
rows stored k-major, `wb[j, k, 0:16] = w[16 j : 16 j + 16, k]`, as 16-bit bits
(bfloat16 as int16, float16 as uint16: Numba has no 16-bit float arithmetic, the
vector load widens them, simd.vload). A block is then one contiguous stream: for each
input k, one 32-byte load widened to a 16-lane float32 vector and one FMA with x[k]
broadcast (AVX-512's embedded broadcast), accumulating 16 outputs in a register, in
float32. The last block is padded with zero rows, so `in` and `out` may be anything.

The activations are float32 in row panels (`panel_index`): 16 rows k-major, so the 16
values one input k multiplies are one 64-byte line. Batch rows are taken 16 at a time
(16 accumulators share each widened weight vector: per k one weight load, its 2-uop
widen and 16 FMAs with embedded broadcasts at fixed offsets; ~77 % of the FMA peak at
16 rows with the block in L1), the last panel's rows 8, 4, then 1 at a time, with k split
over 2 accumulators a row at 8 and 4 rows and over 4 at one row, so the FMA latency is hidden. Each block of
more than one row prefetches its neighbours (a lone row: `_row1`), so one thread streams the weights from DRAM
while it computes; non-temporal (prefetchnta): a decode step reads every weight once, and normal prefetches
let ~270 MB a step (SmolLM2) flush the L2 and L3 of what the step reuses (the KV cache, activations, the
interpreter's state). SmolLM2 bf16 in the engine, batch 1, context 512,
alternating 4 times: 8.5-8.8 -> 7.8-8.1 ms a step with gemv_pairs; the widened layout 8.3-9.2 -> 8.2-8.6; the GEMV
alone over 256 MB unchanged (tools/bench_gemv.py, two threads 42-43 GB/s both ways). Blocks
are split over Numba's threads (prange); with one thread, or a call too small to be worth
waking the second (PARALLEL_MIN_BYTES), the serial twin runs instead.
"""

from __future__ import annotations

import numpy as np
import torch
from numba import njit, prange, types
from numba.extending import intrinsic

from lamina_kernels.simd import prefetch_nta, vadd, vfma, vload, vstore, vzero

from ..jit import FAST as _JIT

BLOCK = 16
PANEL = 16  # activation rows per panel (panel_index): the float32 values of one input k are one 64-byte line


@intrinsic
def at(typingctx, arr, idx):
    """arr.flat[idx] of a C-contiguous float32 or int16 array, idx >= 0, with no bounds or negative-index check:
    an indexing's wraparound test (a compare and cmov per broadcast) had doubled the panel loop's integer work,
    and it keeps LLVM from vectorising the element-wise loops (fused.py)."""
    if not isinstance(arr, types.Array) or arr.dtype not in (types.float32, types.int16):
        return None
    sig = arr.dtype(arr, types.intp)

    def codegen(context, builder, signature, args):
        ary = context.make_array(signature.args[0])(context, builder, args[0])
        return builder.load(builder.gep(ary.data, [args[1]]), align=arr.dtype.bitwidth // 8)

    return sig, codegen


@intrinsic
def put(typingctx, arr, idx, value):
    """arr.flat[idx] = value (cast to the array's float32 or int16) with no bounds or negative-index check (see `at`)."""
    if not isinstance(arr, types.Array) or arr.dtype not in (types.float32, types.int16) \
            or not isinstance(value, (types.Integer, types.Float)):
        return None
    sig = types.void(arr, types.intp, value)

    def codegen(context, builder, signature, args):
        ary = context.make_array(signature.args[0])(context, builder, args[0])
        v = context.cast(builder, args[2], value, arr.dtype)
        builder.store(v, builder.gep(ary.data, [args[1]]), align=arr.dtype.bitwidth // 8)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def flat(typingctx, arr):
    """A C-contiguous array's elements as a 1-d view that holds no reference (no meminfo): the kernel's
    loops pass their arrays to inlined helpers, and each pass of a counted array cost an atomic
    increment and decrement of its count (~0.65 us a block of 16 outputs, 59 such calls; on two threads
    the counts of the shared weights and activations would also bounce between the cores). Valid while
    the caller holds arr."""
    if not isinstance(arr, types.Array) or arr.layout != "C":
        return None
    view = types.Array(arr.dtype, 1, "C")

    def codegen(context, builder, signature, args):
        src = context.make_array(signature.args[0])(context, builder, args[0])
        out = context.make_array(view)(context, builder)
        itemsize = context.get_constant(types.intp, context.get_abi_sizeof(context.get_data_type(arr.dtype)))
        context.populate_array(out, data=src.data, shape=[src.nitems], strides=[itemsize], itemsize=itemsize,
                               meminfo=None)
        return out._getvalue()

    return view(arr), codegen


# Not inlined: every caller (serial, parallel, the fused kernels) calls one compiled copy, which
# keeps Numba's first compile to about a minute instead of several.
@njit(**_JIT)
def _block(xs, wb, bias, y, tail, j, n_out):
    """Outputs 16 j .. 16 j + 15 of every row; xs holds the rows in panels (`panel_index`), y [rows, n_out]."""
    rows = y.shape[0]
    k_in = wb.shape[1]
    xf, wf, yf, tf = flat(xs), flat(wb), flat(y), flat(tail)
    base = j * k_in * BLOCK
    full = (j + 1) * BLOCK <= n_out
    bv = vload(flat(bias), j * BLOCK)
    # While this block computes, the blocks on either side are prefetched (off the ends: this one
    # again): one thread goes forward through the blocks, the spin pool's worker backward (spin_pool.py), and the
    # side a thread has just done is still in its cache (a hit costs one load slot). Without it one thread
    # alternated between computing and waiting for DRAM: 16 rows x 3.5 MB from DRAM ran at 75 GFLOP/s, with it 125.
    step = k_in * BLOCK
    pf = base + step if j + 1 < wb.shape[0] else base
    pb = base - step if j > 0 else base
    for g0 in range(0, rows, PANEL):
        if g0 > 0:  # the first panel's pass has brought them in
            pf = pb = base
        if g0 + PANEL <= rows:
            _rows16(xf, g0 * k_in, wf, base, k_in, yf, tf, g0, j, bv, full, n_out, pf, pb)
        else:
            _rows_rest(xf, g0 * k_in, rows - g0, wf, base, k_in, yf, tf, g0, j, bv, full, n_out, pf, pb)


@njit(**_JIT)
def _rows16(xf, p0, wb, base, k_in, y, tail, r, j, bv, full, n_out, pf, pb):
    """A whole panel: 16 rows, each input k's 16 values one 64-byte line (embedded broadcasts at fixed offsets)."""
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
    for k in range(k_in):
        if k % 2 == 0:  # two k a 64-byte line
            prefetch_nta(wb, pf + k * BLOCK)
            prefetch_nta(wb, pb + k * BLOCK)
        w = vload(wb, base + k * BLOCK)
        p = p0 + k * PANEL
        a0 = vfma(w, at(xf, p), a0)
        a1 = vfma(w, at(xf, p + 1), a1)
        a2 = vfma(w, at(xf, p + 2), a2)
        a3 = vfma(w, at(xf, p + 3), a3)
        a4 = vfma(w, at(xf, p + 4), a4)
        a5 = vfma(w, at(xf, p + 5), a5)
        a6 = vfma(w, at(xf, p + 6), a6)
        a7 = vfma(w, at(xf, p + 7), a7)
        a8 = vfma(w, at(xf, p + 8), a8)
        a9 = vfma(w, at(xf, p + 9), a9)
        a10 = vfma(w, at(xf, p + 10), a10)
        a11 = vfma(w, at(xf, p + 11), a11)
        a12 = vfma(w, at(xf, p + 12), a12)
        a13 = vfma(w, at(xf, p + 13), a13)
        a14 = vfma(w, at(xf, p + 14), a14)
        a15 = vfma(w, at(xf, p + 15), a15)
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
def _rows_rest(xf, p0, width, wb, base, k_in, y, tail, g0, j, bv, full, n_out, pf, pb):
    """The last panel's `width` (< 16) rows: 8, then 4 at a time, then one by one. Value k of panel row c is
    xf[p0 + k * width + c]. The 8- and 4-row passes run the two halves of k at once (a second accumulator a
    row, added at the end): with one accumulator a row, 8 or 4 chains of dependent FMAs (4 cycles each) left
    the FMA ports idle ~half the time (measured one thread, SmolLM2's shapes: 8 rows 113 -> 135 GFLOP/s in
    L2, 4 rows 76 -> 112); a single row splits k over 4 accumulators for the same reason.
    Each pass is a function of its own (gemv_pairs._rows_rest says why)."""
    c = 0
    while c + 8 <= width:
        _rows8(xf, p0, width, c, wb, base, k_in, y, tail, g0, j, bv, full, n_out, pf, pb)
        c += 8
    while c + 4 <= width:
        _rows4(xf, p0, width, c, wb, base, k_in, y, tail, g0, j, bv, full, n_out, pf, pb)
        c += 4
    while c < width:
        _row1(xf, p0, width, c, wb, base, k_in, y, tail, g0, j, bv, full, n_out, pf, pb)
        c += 1


@njit(**_JIT)
def _rows8(xf, p0, width, c, wb, base, k_in, y, tail, g0, j, bv, full, n_out, pf, pb):
    """Rows c .. c + 7 of the last panel, k in two halves (16 accumulators)."""
    half = k_in // 2
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
    for k in range(half):
        if k % 2 == 0:
            prefetch_nta(wb, pf + k * BLOCK)
            prefetch_nta(wb, pf + (k + half) * BLOCK)
            prefetch_nta(wb, pb + k * BLOCK)
            prefetch_nta(wb, pb + (k + half) * BLOCK)
        w = vload(wb, base + k * BLOCK)
        v = vload(wb, base + (k + half) * BLOCK)
        p = p0 + k * width + c
        q = p + half * width
        a0 = vfma(w, at(xf, p), a0)
        a1 = vfma(w, at(xf, p + 1), a1)
        a2 = vfma(w, at(xf, p + 2), a2)
        a3 = vfma(w, at(xf, p + 3), a3)
        a4 = vfma(w, at(xf, p + 4), a4)
        a5 = vfma(w, at(xf, p + 5), a5)
        a6 = vfma(w, at(xf, p + 6), a6)
        a7 = vfma(w, at(xf, p + 7), a7)
        b0 = vfma(v, at(xf, q), b0)
        b1 = vfma(v, at(xf, q + 1), b1)
        b2 = vfma(v, at(xf, q + 2), b2)
        b3 = vfma(v, at(xf, q + 3), b3)
        b4 = vfma(v, at(xf, q + 4), b4)
        b5 = vfma(v, at(xf, q + 5), b5)
        b6 = vfma(v, at(xf, q + 6), b6)
        b7 = vfma(v, at(xf, q + 7), b7)
    if k_in % 2:  # the last k of an odd count
        k = k_in - 1
        w = vload(wb, base + k * BLOCK)
        p = p0 + k * width + c
        a0 = vfma(w, at(xf, p), a0)
        a1 = vfma(w, at(xf, p + 1), a1)
        a2 = vfma(w, at(xf, p + 2), a2)
        a3 = vfma(w, at(xf, p + 3), a3)
        a4 = vfma(w, at(xf, p + 4), a4)
        a5 = vfma(w, at(xf, p + 5), a5)
        a6 = vfma(w, at(xf, p + 6), a6)
        a7 = vfma(w, at(xf, p + 7), a7)
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
def _rows4(xf, p0, width, c, wb, base, k_in, y, tail, g0, j, bv, full, n_out, pf, pb):
    """Rows c .. c + 3 of the last panel, k in two halves (8 accumulators)."""
    half = k_in // 2
    a0 = vzero()
    a1 = vzero()
    a2 = vzero()
    a3 = vzero()
    b0 = vzero()
    b1 = vzero()
    b2 = vzero()
    b3 = vzero()
    for k in range(half):
        if k % 2 == 0:
            prefetch_nta(wb, pf + k * BLOCK)
            prefetch_nta(wb, pf + (k + half) * BLOCK)
            prefetch_nta(wb, pb + k * BLOCK)
            prefetch_nta(wb, pb + (k + half) * BLOCK)
        w = vload(wb, base + k * BLOCK)
        v = vload(wb, base + (k + half) * BLOCK)
        p = p0 + k * width + c
        q = p + half * width
        a0 = vfma(w, at(xf, p), a0)
        a1 = vfma(w, at(xf, p + 1), a1)
        a2 = vfma(w, at(xf, p + 2), a2)
        a3 = vfma(w, at(xf, p + 3), a3)
        b0 = vfma(v, at(xf, q), b0)
        b1 = vfma(v, at(xf, q + 1), b1)
        b2 = vfma(v, at(xf, q + 2), b2)
        b3 = vfma(v, at(xf, q + 3), b3)
    if k_in % 2:
        k = k_in - 1
        w = vload(wb, base + k * BLOCK)
        p = p0 + k * width + c
        a0 = vfma(w, at(xf, p), a0)
        a1 = vfma(w, at(xf, p + 1), a1)
        a2 = vfma(w, at(xf, p + 2), a2)
        a3 = vfma(w, at(xf, p + 3), a3)
    r = g0 + c
    _put(y, tail, r, j, vadd(vadd(a0, b0), bv), full, n_out)
    _put(y, tail, r + 1, j, vadd(vadd(a1, b1), bv), full, n_out)
    _put(y, tail, r + 2, j, vadd(vadd(a2, b2), bv), full, n_out)
    _put(y, tail, r + 3, j, vadd(vadd(a3, b3), bv), full, n_out)


@njit(**_JIT)
def _row1(xf, p0, width, c, wb, base, k_in, y, tail, g0, j, bv, full, n_out, pf, pb):
    """Row c of the last panel: four accumulators over successive k. Software prefetches only where the panel has
    more rows (width > 1): a lone row does too little work a line for them to pay, and the hardware prefetchers
    stream the blocks alone (Zen 5, SmolLM2 bf16: the batch-1 LM head 1.63-1.64 -> 1.51-1.53 ms from DRAM)."""
    a0 = vzero()
    a1 = vzero()
    a2 = vzero()
    a3 = vzero()
    k = 0
    lone = width == 1
    while k + 4 <= k_in:
        if not lone:
            prefetch_nta(wb, pf + k * BLOCK)
            prefetch_nta(wb, pf + k * BLOCK + 2 * BLOCK)
            prefetch_nta(wb, pb + k * BLOCK)
            prefetch_nta(wb, pb + k * BLOCK + 2 * BLOCK)
        q = base + k * BLOCK
        p = p0 + k * width + c
        a0 = vfma(vload(wb, q), at(xf, p), a0)
        a1 = vfma(vload(wb, q + BLOCK), at(xf, p + width), a1)
        a2 = vfma(vload(wb, q + 2 * BLOCK), at(xf, p + 2 * width), a2)
        a3 = vfma(vload(wb, q + 3 * BLOCK), at(xf, p + 3 * width), a3)
        k += 4
    while k < k_in:
        a0 = vfma(vload(wb, base + k * BLOCK), at(xf, p0 + k * width + c), a0)
        k += 1
    _put(y, tail, g0 + c, j, vadd(vadd(vadd(a0, a1), vadd(a2, a3)), bv), full, n_out)


@njit(inline="always", **_JIT)
def panel_index(r, k, rows, k_in):
    """Where x[r, k] lies in the panel layout of a [rows, k_in] activation: rows in panels of PANEL (the
    last one `rows % PANEL` wide), each panel k-major, `[k, row in panel]`, panels one after another. The
    layout has rows * k_in elements like the row-major one and equals it for one row; at 16 rows the
    16 values an input k multiplies are one 64-byte line instead of 16 lines a row apart."""
    g0 = r - r % PANEL
    width = min(PANEL, rows - g0)
    return g0 * k_in + k * width + (r - g0)


@njit(**_JIT)
def to_panels(x, xs):
    """xs (any float32 array of x.size elements, C order) = row-major float32 x [rows, k_in] in the panel layout."""
    rows, k_in = x.shape
    xf = xs.reshape(xs.size)
    for r in range(rows):
        for k in range(k_in):
            xf[panel_index(r, k, rows, k_in)] = x[r, k]


@njit(inline="always", **_JIT)
def _put(yf, tf, r, j, v, full, n_out):
    """Row r's outputs of block j into y (flat, rows n_out wide)."""
    if full:
        vstore(yf, r * n_out + j * BLOCK, v)
    else:  # the last, partial block: through a 16-wide scratch row (one block only, no race)
        vstore(tf, r * BLOCK, v)
        for i in range(n_out - j * BLOCK):
            yf[r * n_out + j * BLOCK + i] = tf[r * BLOCK + i]


@njit(**_JIT)
def _gemv_serial(x, wb, bias, y, tail):
    n_out = y.shape[1]
    for j in range(wb.shape[0]):
        _block(x, wb, bias, y, tail, j, n_out)


@njit(parallel=True, **_JIT)
def _gemv_parallel(x, wb, bias, y, tail):
    n_out = y.shape[1]
    for j in prange(wb.shape[0]):
        _block(x, wb, bias, y, tail, j, n_out)


# Weight bytes from which a call is split over Numba's threads: below it waking the second
# thread costs more than it saves (measured: 100 x 77 bf16, 15 kB, 2 us serial vs 3 us split;
# 960 x 576, 1.1 MB, 31 vs 15 us).
PARALLEL_MIN_BYTES = 1 << 16
_STORAGE = {torch.bfloat16: np.int16, torch.float16: np.uint16, torch.float32: np.float32}

# Rows (tokens) from which a call widens the packed weights to float32 and hands the product to
# MKL's sgemm instead: a prefill chunk is compute-bound, where this kernel's one-row-at-a-time
# broadcasts reach about half of sgemm's rate (SmolLM2's gate/up at 1024 rows: 20.1 vs 11.7 ms),
# while widening costs one pass over the weights (~1 ms for its 3.5 MB). Decode batches stay below it.
WIDE_MIN_ROWS = 512


def widened_t(wb: np.ndarray) -> torch.Tensor:
    """Packed blocks [nb, in, 16] (or gemv_pairs' [nb, in / 2, 32]) -> float32 [in, nb * 16]: w.T with the
    padding columns, made per call (nothing held), for `torch.mm(x, widened_t(wb))`."""
    return plain_weights(wb).float().t()


def plain_weights(wb: np.ndarray, halves: bool = False) -> torch.Tensor:
    """Packed blocks [nb, in, 16] (or gemv_pairs' [nb, in / 2, 32]) -> [nb * 16, in] in their storage dtype
    (a torch bfloat16, float16 or float32 tensor, padding rows included), made per call (nothing held).
    `halves`: the even blocks' rows first, then the odd ones' (fused.pack_gate_up's interleaved gate and
    up blocks back to [gate; up]) in the same single copy."""
    if wb.shape[2] != BLOCK:
        from .gemv_pairs import unpack_pairs  # imports this module

        wb = unpack_pairs(wb)
    t = torch.from_numpy(wb)
    if wb.dtype != np.float32:
        t = torch.from_numpy(wb.view(np.int16)).view(torch.bfloat16 if wb.dtype == np.int16 else torch.float16)
    if halves:
        t = t.view(-1, 2, *t.shape[1:]).transpose(0, 1)
    return t.transpose(-1, -2).reshape(-1, wb.shape[1])


def pack(w: torch.Tensor) -> np.ndarray:
    """[out, in] weights -> [ceil(out/16), in, 16], zero rows padding the last block.

    bfloat16 is kept as its bits in int16, float16 as uint16, float32 as float32 (the
    vector load widens the 16-bit ones). Raises ValueError for another dtype or shape.
    """
    if w.dtype not in _STORAGE or w.dim() != 2:
        raise ValueError(f"gemv weights are 2-d float32, bfloat16 or float16, not {w.dtype} {tuple(w.shape)}")
    n_out, k_in = w.shape
    nb = -(-n_out // BLOCK)
    padded = torch.zeros(nb * BLOCK, k_in, dtype=w.dtype)
    padded[:n_out] = w.detach().cpu()
    bits = padded.numpy() if w.dtype == torch.float32 else padded.view(torch.int16).numpy()
    blocks = np.ascontiguousarray(bits.reshape(nb, BLOCK, k_in).transpose(0, 2, 1))
    return blocks.view(_STORAGE[w.dtype])


class Gemv:
    """y = x @ w.T + b for float32 x [..., in], float32 y [..., out]; w packed once.

    `w` [out, in] float32/bfloat16/float16 and `b` [out] (any float dtype or None) are copied at
    construction. Splits the output blocks over Numba's threads when torch runs more than one
    thread (the dense thread's setting, read at each call) and the weights are PARALLEL_MIN_BYTES
    or more; otherwise runs on the calling thread. From WIDE_MIN_ROWS rows (prefill) the weights
    are widened for the call and multiplied by torch.addmm.
    """

    __slots__ = ("wb", "bias", "in_features", "out_features", "split")

    def __init__(self, w: torch.Tensor, b: torch.Tensor | None):
        self.out_features, self.in_features = w.shape
        self.wb = pack(w)
        self.bias = np.zeros(self.wb.shape[0] * BLOCK, np.float32)
        if b is not None:
            self.bias[: self.out_features] = b.detach().float().cpu().numpy()
        self.split = self.wb.nbytes >= PARALLEL_MIN_BYTES

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features).contiguous()
        rows = x2.shape[0]
        if rows >= WIDE_MIN_ROWS:
            y = torch.addmm(torch.from_numpy(self.bias), x2, widened_t(self.wb))
            if y.shape[1] != self.out_features:
                y = y[:, : self.out_features].contiguous()
            return y if len(lead) == 1 else y.view(*lead, self.out_features)
        y = torch.empty(rows, self.out_features, dtype=torch.float32)
        tail = _NO_TAIL if self.out_features % BLOCK == 0 else np.empty((rows, BLOCK), np.float32)
        fn = _gemv_parallel if self.split and torch.get_num_threads() > 1 else _gemv_serial
        xs = x2.numpy()
        if rows > 1:  # one row is its own panel layout
            xs = np.empty_like(xs)
            to_panels(x2.numpy(), xs)
        fn(xs, self.wb, self.bias, y.numpy(), tail)
        return y if len(lead) == 1 else y.view(*lead, self.out_features)


_NO_TAIL = np.empty((0, BLOCK), np.float32)

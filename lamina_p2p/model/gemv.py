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

Batch rows are taken 4 at a time (4 accumulators share each widened weight vector,
which stays in L1 for the next 4 rows: a block is 16 x in x 2 bytes, 18 kB at in 576);
a single row splits k over 4 accumulators so the FMA latency is hidden. Blocks are
split over Numba's threads (prange); with one thread, or a call too small to be worth
waking the second (see `parallel_min_blocks`), the serial twin runs instead.
"""

from __future__ import annotations

import numpy as np
import torch
from numba import njit, prange

from lamina_kernels.simd import vadd, vfma, vload, vstore, vzero

BLOCK = 16
_JIT = dict(nogil=True, cache=True, error_model="numpy", fastmath={"reassoc", "contract", "arcp", "nsz", "afn"})


# Not inlined: every caller (serial, parallel, the fused kernels) calls one compiled copy, which
# keeps Numba's first compile to about a minute instead of several.
@njit(**_JIT)
def _block(x, wb, bias, y, tail, j, n_out):
    """Outputs 16 j .. 16 j + 15 of every row of x."""
    rows, k_in = x.shape
    base = j * k_in * BLOCK
    full = (j + 1) * BLOCK <= n_out
    bv = vload(bias, j * BLOCK)
    r = 0
    while r + 16 <= rows:
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
            w = vload(wb, base + k * BLOCK)
            a0 = vfma(w, x[r + 0, k], a0)
            a1 = vfma(w, x[r + 1, k], a1)
            a2 = vfma(w, x[r + 2, k], a2)
            a3 = vfma(w, x[r + 3, k], a3)
            a4 = vfma(w, x[r + 4, k], a4)
            a5 = vfma(w, x[r + 5, k], a5)
            a6 = vfma(w, x[r + 6, k], a6)
            a7 = vfma(w, x[r + 7, k], a7)
            a8 = vfma(w, x[r + 8, k], a8)
            a9 = vfma(w, x[r + 9, k], a9)
            a10 = vfma(w, x[r + 10, k], a10)
            a11 = vfma(w, x[r + 11, k], a11)
            a12 = vfma(w, x[r + 12, k], a12)
            a13 = vfma(w, x[r + 13, k], a13)
            a14 = vfma(w, x[r + 14, k], a14)
            a15 = vfma(w, x[r + 15, k], a15)
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
        r += 16
    while r + 8 <= rows:
        a0 = vzero()
        a1 = vzero()
        a2 = vzero()
        a3 = vzero()
        a4 = vzero()
        a5 = vzero()
        a6 = vzero()
        a7 = vzero()
        for k in range(k_in):
            w = vload(wb, base + k * BLOCK)
            a0 = vfma(w, x[r, k], a0)
            a1 = vfma(w, x[r + 1, k], a1)
            a2 = vfma(w, x[r + 2, k], a2)
            a3 = vfma(w, x[r + 3, k], a3)
            a4 = vfma(w, x[r + 4, k], a4)
            a5 = vfma(w, x[r + 5, k], a5)
            a6 = vfma(w, x[r + 6, k], a6)
            a7 = vfma(w, x[r + 7, k], a7)
        _put(y, tail, r, j, vadd(a0, bv), full, n_out)
        _put(y, tail, r + 1, j, vadd(a1, bv), full, n_out)
        _put(y, tail, r + 2, j, vadd(a2, bv), full, n_out)
        _put(y, tail, r + 3, j, vadd(a3, bv), full, n_out)
        _put(y, tail, r + 4, j, vadd(a4, bv), full, n_out)
        _put(y, tail, r + 5, j, vadd(a5, bv), full, n_out)
        _put(y, tail, r + 6, j, vadd(a6, bv), full, n_out)
        _put(y, tail, r + 7, j, vadd(a7, bv), full, n_out)
        r += 8
    while r + 4 <= rows:
        a0 = vzero()
        a1 = vzero()
        a2 = vzero()
        a3 = vzero()
        for k in range(k_in):
            w = vload(wb, base + k * BLOCK)
            a0 = vfma(w, x[r, k], a0)
            a1 = vfma(w, x[r + 1, k], a1)
            a2 = vfma(w, x[r + 2, k], a2)
            a3 = vfma(w, x[r + 3, k], a3)
        _put(y, tail, r, j, vadd(a0, bv), full, n_out)
        _put(y, tail, r + 1, j, vadd(a1, bv), full, n_out)
        _put(y, tail, r + 2, j, vadd(a2, bv), full, n_out)
        _put(y, tail, r + 3, j, vadd(a3, bv), full, n_out)
        r += 4
    while r < rows:
        a0 = vzero()
        a1 = vzero()
        a2 = vzero()
        a3 = vzero()
        k = 0
        while k + 4 <= k_in:
            p = base + k * BLOCK
            a0 = vfma(vload(wb, p), x[r, k], a0)
            a1 = vfma(vload(wb, p + BLOCK), x[r, k + 1], a1)
            a2 = vfma(vload(wb, p + 2 * BLOCK), x[r, k + 2], a2)
            a3 = vfma(vload(wb, p + 3 * BLOCK), x[r, k + 3], a3)
            k += 4
        while k < k_in:
            a0 = vfma(vload(wb, base + k * BLOCK), x[r, k], a0)
            k += 1
        _put(y, tail, r, j, vadd(vadd(vadd(a0, a1), vadd(a2, a3)), bv), full, n_out)
        r += 1


@njit(inline="always", **_JIT)
def _put(y, tail, r, j, v, full, n_out):
    if full:
        vstore(y, r * n_out + j * BLOCK, v)
    else:  # the last, partial block: through a 16-wide scratch row (one block only, no race)
        vstore(tail, r * BLOCK, v)
        for i in range(n_out - j * BLOCK):
            y[r, j * BLOCK + i] = tail[r, i]


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
    """Packed blocks [nb, in, 16] -> float32 [in, nb * 16]: w.T with the padding columns, made per call
    (nothing held), for `torch.mm(x, widened_t(wb))`."""
    t = torch.from_numpy(wb)
    if wb.dtype != np.float32:
        t = torch.from_numpy(wb.view(np.int16)).view(torch.bfloat16 if wb.dtype == np.int16 else torch.float16)
    return t.permute(1, 0, 2).reshape(wb.shape[1], -1).float()


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
        fn(x2.numpy(), self.wb, self.bias, y.numpy(), tail)
        return y if len(lead) == 1 else y.view(*lead, self.out_features)


_NO_TAIL = np.empty((0, BLOCK), np.float32)

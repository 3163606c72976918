"""A bfloat16 decoder layer's dense work in four Numba calls around the gemv kernel.

At batch 1 a layer's small torch ops (norms, casts, rotary, SiLU*mul, residual adds:
~30 dispatches of several us each) cost about as much as reading its weights at the
memory's speed. Here each GEMV carries its neighbours instead:

    norm_linear   RMSNorm of the residual stream, then x @ w.T (+ b)   (QKV, LM head)
    rope_split    rotary on the q and k heads, split into q, k, v      (after QKV)
    linear_add    residual + x @ w.T                                   (O proj, down proj)
    norm_swiglu   RMSNorm, then the gate/up GEMV with SiLU(gate)*up    (MLP input)

Numerics follow transformers' bfloat16 Llama op for op, as transformer.py does with
torch ops: the norm in float32 (sum of squares in float64, within float32 rounding of
torch's), rounded to bfloat16 before the weight and after it; each GEMV accumulates in
float32 and rounds its output once; the residual add, SiLU, the product and each rotary
term are rounded to bfloat16 as torch's bfloat16 ops round them (to nearest even).
Activations travel as bfloat16 bits (torch bfloat16 tensors viewed as int16).
`split` runs the output blocks over Numba's threads; otherwise the calling thread.
Where the CPU has AVX512-BF16 the weights are packed in input pairs (gemv_pairs.py) and every
GEMV multiplies the bfloat16 activations by them with vdpbf16ps: the same exact products, half
the multiply instructions; each call takes either layout (the weights' shape tells which).
"""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

from lamina_kernels.softmax import exp_nonpos, u32_as_f32

from .gemv import BLOCK, PANEL, WIDE_MIN_ROWS, _JIT, at, flat, plain_weights, put, widened_t
from .gemv_pairs import NATIVE, block, pack_pairs
from .linear import _native_bf16

# Weights in gemv_pairs' layout (vdpbf16ps) where the CPU has AVX512-BF16; tests set it to run that layout
# (emulated) anywhere.
USE_PAIRS = NATIVE


@intrinsic
def _f32_as_u32(typingctx, f):
    """The bits of a float32 as uint32 (no value conversion)."""
    if f != types.float32:
        return None
    sig = types.uint32(types.float32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return sig, codegen


@njit(inline="always", **_JIT)
def bf16_bits(f):
    """float32 -> bfloat16 bits (int16), rounded to nearest even; NaN -> 0x7FC0 (as c10::BFloat16)."""
    u = _f32_as_u32(np.float32(f))
    if (u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000):
        return np.int16(0x7FC0)
    u = u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))
    return np.int16(np.uint16(u >> np.uint32(16)))


@njit(inline="always", **_JIT)
def bf16_value(h):
    """bfloat16 bits (int16) -> float32."""
    return u32_as_f32(np.uint32(np.uint16(h)) << np.uint32(16))


@njit(inline="always", **_JIT)
def _round(f):
    return bf16_value(bf16_bits(f))


@njit(inline="always", **_JIT)
def _load_rows(x, xs, norm_w, eps, use_norm, pairs):
    """xs = float32 of the rows of x (bfloat16 bits), RMS-normalised and scaled when use_norm, in the
    gemv kernel's panel layout (gemv.panel_index; xs is [rows, in] C-ordered memory). With `pairs`
    (weights in gemv_pairs' layout) the rows' bfloat16 bits instead, in panels of int32 pairs in xs's
    first half (pair p of panel row c at int32 g0 * in / 2 + p * width + c)."""
    rows, h = x.shape
    xf, x1, nw = flat(xs), flat(x), flat(norm_w)
    if pairs:
        # A row is normalised into a contiguous scratch row first (a loop that vectorises), then its
        # int32 pairs are scattered into the panel: written into the panel element by element, the strided
        # stores kept the normalisation scalar. This runs on the caller alone before an op is posted (Zen 5,
        # 16 rows x 576 with the norm: 17.6 -> 4.1 us; x 1536 without: 8.6 -> 6.5; PERFORMANCE_LOG stop 38).
        xi = xf.view(np.int32)
        row = np.empty(h, np.int16)  # h is even: pair-packed weights have an even input width
        row32 = row.view(np.int32)
        for g0 in range(0, rows, PANEL):
            width = min(PANEL, rows - g0)
            q0 = g0 * h // 2
            for c in range(width):
                src = (g0 + c) * h
                if use_norm:
                    s = _inv_rms(x1, src, h, eps)
                    for k in range(h):
                        put(row, k, bf16_bits(_round(bf16_value(at(x1, src + k)) * s) * bf16_value(at(nw, k))))
                else:
                    for k in range(h):
                        put(row, k, at(x1, src + k))
                for p in range(h // 2):
                    xi[q0 + p * width + c] = row32[p]
        return
    inv = np.empty(PANEL, np.float32)  # not np.ones: see _zeros
    for g0 in range(0, rows, PANEL):
        width = min(PANEL, rows - g0)
        p0 = g0 * h
        if use_norm:
            for c in range(width):
                inv[c] = _inv_rms(x1, (g0 + c) * h, h, eps)
        # A panel is written k-major, a row at a time: in tiles of LOAD_TILE inputs, so that the lines a row
        # writes are still in L1 for the next row (a whole panel at 1536 inputs is 98 kB: 7x slower untiled).
        for k0 in range(0, h, LOAD_TILE):
            k1 = min(h, k0 + LOAD_TILE)
            for c in range(width):
                src = (g0 + c) * h
                if use_norm:
                    s = inv[c]
                    for k in range(k0, k1):
                        put(xf, p0 + k * width + c, _round(_round(bf16_value(at(x1, src + k)) * s) * bf16_value(at(nw, k))))
                else:
                    for k in range(k0, k1):
                        put(xf, p0 + k * width + c, bf16_value(at(x1, src + k)))


LOAD_TILE = 64


@njit(inline="always", **_JIT)
def _inv_rms(x1, src, h, eps):
    """1 / sqrt(mean(x^2) + eps) of the h bfloat16 bits at x1[src:] (the sum of squares in float64), float32."""
    ss = 0.0
    for k in range(h):
        f = bf16_value(at(x1, src + k))
        ss += np.float64(f) * np.float64(f)
    return np.float32(1.0) / np.sqrt(np.float32(ss / h) + np.float32(eps))


@njit(parallel=True, **_JIT)
def norm_linear(x, norm_w, eps, use_norm, wb, bias, out, round_out, split):
    """out[r] = (RMSNorm(x[r]) if use_norm else x[r]) @ w.T + b.

    x [rows, in] bfloat16 bits; norm_w [in] bfloat16 bits; wb/bias as gemv.pack and Gemv hold
    them; out [rows, out] bfloat16 bits (round_out) or float32 (as accumulated: the LM head).
    """
    rows, n_out = out.shape
    nb = wb.shape[0]
    xs = np.empty((rows, x.shape[1]), np.float32)
    _load_rows(x, xs, norm_w, eps, use_norm, wb.shape[2] != BLOCK)
    yf = np.empty((rows, nb * BLOCK), np.float32)
    tail = np.empty((0, BLOCK), np.float32)
    if split:
        for j in prange(nb):
            block(xs, wb, bias, yf, tail, j, nb * BLOCK)
            _store(yf, out, j, n_out, round_out)
    else:
        for j in range(nb):
            block(xs, wb, bias, yf, tail, j, nb * BLOCK)
            _store(yf, out, j, n_out, round_out)


@njit(parallel=True, **_JIT)
def norm_linear_f32(x, norm_w, eps, wb, bias, out, split):
    """out[r] = RMSNorm(x[r]) @ w.T + b into float32 out [rows, out] directly (the LM head: norm_linear with
    round_out False would write every logit to a scratch first and copy it, 2 x 3 MB more at 16 rows of SmolLM2)."""
    rows, n_out = out.shape
    nb = wb.shape[0]
    xs = np.empty((rows, x.shape[1]), np.float32)
    _load_rows(x, xs, norm_w, eps, True, wb.shape[2] != BLOCK)
    tail = np.empty((rows, BLOCK), np.float32)  # the last, partial block's rows (gemv._put)
    if split:
        for j in prange(nb):
            block(xs, wb, bias, out, tail, j, n_out)
    else:
        for j in range(nb):
            block(xs, wb, bias, out, tail, j, n_out)


@njit(inline="always", **_JIT)
def _zeros(n):
    """n float32 zeros without np.zeros: inside a parallel=True function np.zeros becomes a parallel loop of its
    own, and with the output blocks on one thread (split False) waking Numba's pool for it cost a scheduler
    time slice (~8 ms) whenever the other CPU was busy."""
    z = np.empty(n, np.float32)
    for i in range(n):
        z[i] = 0.0
    return z


@njit(inline="always", **_JIT)
def _store(yf, out, j, n_out, round_out):
    """out[:, block j] = yf's (rounded to bfloat16 bits when round_out, else as is: float32 out)."""
    w = yf.shape[1]
    yv, ov = flat(yf), flat(out)
    c0 = j * BLOCK
    n = min(n_out - c0, BLOCK)
    for r in range(out.shape[0]):
        if round_out:
            for i in range(n):
                put(ov, r * n_out + c0 + i, bf16_bits(at(yv, r * w + c0 + i)))
        else:
            for i in range(n):
                put(ov, r * n_out + c0 + i, at(yv, r * w + c0 + i))


@njit(parallel=True, **_JIT)
def linear_add(x, wb, res, out, split):
    """out = res + x @ w.T in bfloat16 (the product rounded, then the sum). x [rows, in], res and
    out [rows, out], all bfloat16 bits; out may not alias res."""
    rows, n_out = out.shape
    nb = wb.shape[0]
    xs = np.empty((rows, x.shape[1]), np.float32)
    _load_rows(x, xs, x[0], np.float32(0.0), False, wb.shape[2] != BLOCK)
    yf = np.empty((rows, nb * BLOCK), np.float32)
    tail = np.empty((0, BLOCK), np.float32)
    zero = _zeros(nb * BLOCK)
    if split:
        for j in prange(nb):
            block(xs, wb, zero, yf, tail, j, nb * BLOCK)
            _store_add(yf, res, out, j, n_out)
    else:
        for j in range(nb):
            block(xs, wb, zero, yf, tail, j, nb * BLOCK)
            _store_add(yf, res, out, j, n_out)


@njit(inline="always", **_JIT)
def _store_add(yf, res, out, j, n_out):
    w = yf.shape[1]
    yv, rv, ov = flat(yf), flat(res), flat(out)
    c0 = j * BLOCK
    n = min(n_out - c0, BLOCK)
    for r in range(out.shape[0]):
        for i in range(n):
            o = r * n_out + c0 + i
            put(ov, o, bf16_bits(bf16_value(at(rv, o)) + _round(at(yv, r * w + c0 + i))))


@njit(parallel=True, **_JIT)
def norm_swiglu(x, norm_w, eps, wb, out, split):
    """out = SiLU(g) * u with [g | u] = RMSNorm(x) @ w_gate_up.T, in bfloat16.

    wb holds gate and up blocks interleaved (pack_gate_up): block 2m is gate rows 16m..16m+15,
    block 2m+1 the same up rows, so one thread finishes out[:, 16m:16m+16]. x [rows, hidden]
    and out [rows, intermediate] bfloat16 bits.
    """
    rows, inter = out.shape
    nb = wb.shape[0]
    xs = np.empty((rows, x.shape[1]), np.float32)
    _load_rows(x, xs, norm_w, eps, True, wb.shape[2] != BLOCK)
    yf = np.empty((rows, nb * BLOCK), np.float32)
    tail = np.empty((0, BLOCK), np.float32)
    zero = _zeros(nb * BLOCK)
    if split:
        for m in prange(nb // 2):
            _swiglu_pair(xs, wb, zero, yf, tail, m, out)
    else:
        for m in range(nb // 2):
            _swiglu_pair(xs, wb, zero, yf, tail, m, out)


@njit(inline="always", **_JIT)
def _swiglu_pair(xs, wb, zero, yf, tail, m, out):
    n = wb.shape[0] * BLOCK
    block(xs, wb, zero, yf, tail, 2 * m, n)
    block(xs, wb, zero, yf, tail, 2 * m + 1, n)
    yv, ov = flat(yf), flat(out)
    inter = out.shape[1]
    for r in range(out.shape[0]):
        for i in range(BLOCK):
            g = _round(at(yv, r * n + 2 * m * BLOCK + i))
            u = _round(at(yv, r * n + (2 * m + 1) * BLOCK + i))
            # SiLU = g * sigmoid(g) from exp(-|g|) <= 1 (exp_nonpos: a polynomial that vectorises,
            # ~1 ulp from expf, where np.exp is a scalar call per element): 16 elements in a few ns.
            e = exp_nonpos(-abs(g))
            sig = (np.float32(1.0) if g >= 0 else e) / (np.float32(1.0) + e)
            s = _round(g * sig)
            put(ov, r * inter + m * BLOCK + i, bf16_bits(s * u))


@njit(**_JIT)
def rope_split(qkv, cos, sin, nq, nk, q, k, v):
    """q, k (rotated) and v from qkv [T, (nq + 2 nk) * D] bfloat16 bits; cos/sin [T, D] bfloat16
    bits with rotate_half's sign folded into sin (transformer._build_rope_table):
    x * cos + roll(x, D/2) * sin, each product and the sum rounded to bfloat16."""
    t, nh, d = q.shape[0], nq + nk, q.shape[2]
    half = d // 2
    width = qkv.shape[1]
    src, cv, sv, qv, kv, vv = flat(qkv), flat(cos), flat(sin), flat(q), flat(k), flat(v)
    for r in range(t):
        row = r * width
        for h in range(nh):
            base = row + h * d
            dst, to = (qv, (r * nq + h) * d) if h < nq else (kv, (r * nk + h - nq) * d)
            # roll(x, D/2): element i pairs with i + D/2 in the first half, i - D/2 in the second (no modulo)
            for i in range(half):
                a = _round(bf16_value(at(src, base + i)) * bf16_value(at(cv, r * d + i)))
                b = _round(bf16_value(at(src, base + i + half)) * bf16_value(at(sv, r * d + i)))
                put(dst, to + i, bf16_bits(a + b))
            for i in range(half, d):
                a = _round(bf16_value(at(src, base + i)) * bf16_value(at(cv, r * d + i)))
                b = _round(bf16_value(at(src, base + i - half)) * bf16_value(at(sv, r * d + i)))
                put(dst, to + i, bf16_bits(a + b))
        for h in range(nk):
            for i in range(d):
                put(vv, (r * nk + h) * d + i, at(src, row + (nh + h) * d + i))


def pack_gate_up(w_gate_up: np.ndarray) -> np.ndarray:
    """gemv.pack's blocks of [gate; up] (intermediate a multiple of 16) -> gate and up blocks interleaved."""
    nb = w_gate_up.shape[0]
    half = nb // 2
    out = np.empty_like(w_gate_up)
    out[0::2] = w_gate_up[:half]
    out[1::2] = w_gate_up[half:]
    return out


class FusedDense:
    """A bfloat16 Llama-family model's dense weights for the four fused calls (see the module doc).

    Built from the plain [out, in] bfloat16 weights of transformer.Layer (each packed once by
    gemv.pack, gate/up interleaved); `eligible` says whether a model can take this path.
    """

    def __init__(self, model):
        from .gemv import PARALLEL_MIN_BYTES, Gemv

        self.eps = float(model.config.rms_norm_eps)
        c = model.config
        self.nq, self.nk, self.d = c.num_heads, c.num_kv_heads, c.head_dim
        self.layers = []
        for L in model._layers:
            qkv, o, down = Gemv(L.wqkv, L.bqkv), Gemv(L.wo, None), Gemv(L.w_down, None)
            gate_up = pack_gate_up(Gemv(L.w_gate_up, None).wb)
            bits = [n.view(torch.int16).numpy() for n in (L.input_norm, L.post_norm)]
            self.layers.append((bits[0], qkv, o, bits[1], gate_up, down))
        self.head = Gemv(model.lm_head_weight, None)
        if USE_PAIRS:
            self._to_pairs()
        self._to_huge_pages()
        self.final_norm = model.final_norm.view(torch.int16).numpy()
        self.min_bytes = PARALLEL_MIN_BYTES
        from . import spin_pool  # imports this module: not at the top

        # Up to pool_max_rows rows, with more than one thread, the calls run on the spin pool
        # (spin_pool.py: no wake-up per call); 0 turns it off.
        self._spin, self.pool_max_rows = spin_pool, spin_pool.POOL_MAX_ROWS
        self.prefetch_bytes = spin_pool.PREFETCH_BYTES  # see pool_pre; 0 turns the prefetch off
        self.default_pool_max_rows = self.pool_max_rows
        self._cpus = _allowed_cpus()
        self._solo, self._solo_max_rows = None, spin_pool.POOL_MAX_ROWS  # one thread's pool (see _pool); 0: off
        width = max(max(L[2].wb.shape[0], L[4].shape[0], L[5].wb.shape[0]) for L in self.layers) if self.layers else 0
        self._zero = np.zeros(width * BLOCK, np.float32)  # the bias of the bias-free pool calls
        # A prefill chunk of wide_min_rows tokens or more is compute-bound: transformer.py runs it
        # with its torch ops over these matmuls (qkv, o, gate_up, down per layer), which widen the
        # same packed weights for the call (gemv.WIDE_MIN_ROWS) instead of the fused calls; where torch
        # has native bfloat16 GEMMs (AVX512-BF16: oneDNN) they unpack them to bfloat16 instead (Zen 5,
        # one thread, 1024 x 576 x 3072: 7.8 ms against 35.4 for the widened float32 sgemm).
        self.wide_min_rows = WIDE_MIN_ROWS
        self._scratches: dict[int, tuple[np.ndarray, ...]] = {}
        self._last_out = None  # (the last bfloat16 tensor post made on the pool, its int16 bits)
        self._rope_bits: dict = {}  # id(cos) -> (cos, sin, their bits): each micro-batch's table of the step
        self.prefill_linears = tuple((_bf16_out(qkv), _bf16_out(o), _WideGateUp(gate_up), _bf16_out(down))
                                     for _, qkv, o, _, gate_up, down in self.layers)

    def _to_pairs(self) -> None:
        """Every packed weight with an even input width into gemv_pairs' layout (the kernels take either)."""
        def pairs(wb):
            return pack_pairs(wb) if wb.shape[1] % 2 == 0 else wb

        layers = []
        for norm0, qkv, o, norm1, gate_up, down in self.layers:
            for lin in (qkv, o, down):
                lin.wb = pairs(lin.wb)
            layers.append((norm0, qkv, o, norm1, pairs(gate_up), down))
        self.layers = layers
        self.head.wb = pairs(self.head.wb)

    def _to_huge_pages(self) -> None:
        """Move every packed weight into one huge-page mapping (hugepages.py), in the order a step reads
        them (layer by layer: qkv, o, gate/up, down; then the head), so the stream has no 4 KiB page edges."""
        from .hugepages import huge_copies

        order = []
        for _, qkv, o, _, gate_up, down in self.layers:
            order += [qkv.wb, o.wb, gate_up, down.wb]
        order.append(self.head.wb)
        moved = huge_copies(order)
        if moved[0] is order[0]:
            return
        it = iter(moved)
        layers = []
        for norm0, qkv, o, norm1, _, down in self.layers:
            qkv.wb, o.wb = next(it), next(it)
            gate_up = next(it)
            down.wb = next(it)
            layers.append((norm0, qkv, o, norm1, gate_up, down))
        self.head.wb = next(it)
        self.layers = layers

    @staticmethod
    def eligible(model) -> bool:
        c = model.config
        return (model.dtype == torch.bfloat16 and model.device.type == "cpu" and not c.qk_norm
                and c.intermediate_size % BLOCK == 0)

    def _threads(self) -> int:
        """The compute threads: torch's setting, at most the CPUs this process may run on. Not torch's alone:
        Numba's OpenMP layer sets OpenMP's thread count to its own at each parallel region (torch reads 2
        again after one, though set to 1), and a compute process pinned to one CPU (a cluster's, bench_e2e
        --split-cores) then split its GEMVs over two threads on that one CPU."""
        return min(torch.get_num_threads(), self._cpus)

    def _split(self, wb) -> bool:
        return wb.nbytes >= self.min_bytes and self._threads() > 1

    def _pool(self, rows: int):
        """The spin pool (held: release it) for a call of `rows` rows, or None: then Numba's prange
        (larger batches, where a parallel region's wake-up is small against the work) or one thread."""
        threads = self._threads()
        if threads <= 1:
            # One thread: a pool of no worker, which runs every unit on the caller. Nothing spins, so it serves
            # a cluster's compute side too (where pool_max_rows is 0); what it saves is per-call work: a pre or
            # post is one compiled call on kept scratch instead of three or four calls on new torch tensors.
            if rows > self._solo_max_rows:
                return None
            if self._solo is None:
                self._solo = self._spin.SpinPool(0, start=False)
            return self._solo if self._solo.lock.acquire(blocking=False) else None
        if rows > self.pool_max_rows:
            return None
        pool = self._spin.shared(threads)
        return pool if pool.lock.acquire(blocking=False) else None  # another thread has it: the old path

    def _in_bits(self, x: torch.Tensor) -> np.ndarray:
        """_bits(x), without the torch calls when x is the last layer output this object made (its bits kept)."""
        last = self._last_out
        return last[1] if last is not None and last[0] is x else _bits(x)

    def _scratch(self, t: int) -> tuple[np.ndarray, ...]:
        """Per-call intermediates that never leave the pool path (qkv, x1, act) for t rows, made once per t.
        Used only while holding the pool's lock, so one caller at a time."""
        bufs = self._scratches.get(t)
        if bufs is None:
            _, qkv, _, _, _, down = self.layers[0]
            bufs = (np.empty((t, qkv.out_features), np.int16), np.empty((t, down.out_features), np.int16),
                    np.empty((t, down.in_features), np.int16))
            self._scratches = {**self._scratches, t: bufs}
        return bufs

    def _prefetch_counts(self, o_wb: np.ndarray, gate_up: np.ndarray) -> tuple[int, int]:
        """Blocks of O and of gate/up (from their ends) a worker prefetches during attention: up to half of each
        (the worker's share when both threads compute), within prefetch_bytes (0: none)."""
        budget = self.prefetch_bytes
        block_o, block_gu = o_wb[0].nbytes, gate_up[0].nbytes
        n_o = min(o_wb.shape[0] // 2, budget // block_o)
        n_gu = min(gate_up.shape[0] // 2, (budget - n_o * block_o) // block_gu)
        return int(n_o), int(n_gu)

    def pre(self, layer: int, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, wire: bool = False):
        """q [T, Hq, D], k, v [T, Hkv, D] bfloat16; with `wire`, on the pool, as the uint16 numpy arrays
        written (the attention requests' encoding: no tensor made and taken apart again per layer)."""
        norm, qkv, o, _, gate_up, _ = self.layers[layer]
        t = x.shape[0]
        pool = self._pool(t)
        if pool is not None:
            # The outputs leave (attention requests): fresh numpy memory seen as bfloat16 tensors, which costs
            # less than torch.empty plus a view back to bits; the intermediates are kept (_scratch).
            q = np.empty((t, self.nq, self.d), np.int16)
            k = np.empty((t, self.nk, self.d), np.int16)
            v = np.empty((t, self.nk, self.d), np.int16)
            rope = self._rope_bits.get(id(cos))
            if rope is None or rope[0] is not cos or rope[1] is not sin:  # once per step and micro-batch
                if len(self._rope_bits) >= 32:  # older steps' tables
                    self._rope_bits.clear()
                rope = self._rope_bits[id(cos)] = (cos, sin, _bits(cos.view(t, -1)), _bits(sin.view(t, -1)))
            # A worker's prefetch during attention; the solo pool has no worker
            n_o, n_gate_up = self._prefetch_counts(o.wb, gate_up) if pool is not self._solo else (0, 0)
            try:
                pool.run(self._spin.pool_pre, self._in_bits(x), norm, self.eps, qkv.wb, qkv.bias, self._scratch(t)[0],
                         rope[2], rope[3], self.nq, self.nk, q, k, v, o.wb, n_o, gate_up, n_gate_up,
                         keep=(o.wb, gate_up) if n_o + n_gate_up else None)
            finally:
                pool.lock.release()
            if wire:
                return q.view(np.uint16), k.view(np.uint16), v.view(np.uint16)
            return _as_bf16(q), _as_bf16(k), _as_bf16(v)
        y = torch.empty(t, qkv.out_features, dtype=torch.bfloat16)
        q = torch.empty(t, self.nq, self.d, dtype=torch.bfloat16)
        k = torch.empty(t, self.nk, self.d, dtype=torch.bfloat16)
        v = torch.empty(t, self.nk, self.d, dtype=torch.bfloat16)
        norm_linear(_bits(x), norm, self.eps, True, qkv.wb, qkv.bias, _bits(y), True, self._split(qkv.wb))
        rope_split(_bits(y), _bits(cos.view(t, -1)), _bits(sin.view(t, -1)), self.nq, self.nk, _bits(q), _bits(k), _bits(v))
        return q, k, v

    def post(self, layer: int, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        _, _, o, norm, gate_up, down = self.layers[layer]
        t = x.shape[0]
        pool = self._pool(t)
        if pool is not None:
            x2 = np.empty((t, x.shape[1]), np.int16)
            try:
                _, x1, act = self._scratch(t)
                pool.run(self._spin.pool_post, _bits(attn).reshape(t, -1), o.wb, self._zero, self._in_bits(x), x1,
                         norm, self.eps, gate_up, act, down.wb, x2)
            finally:
                pool.lock.release()
            out = _as_bf16(x2)
            self._last_out = (out, x2)  # the next pre/post gets x2 back without torch calls
            return out
        x1 = torch.empty_like(x)
        act = torch.empty(t, down.in_features, dtype=torch.bfloat16)
        x2 = torch.empty_like(x)
        linear_add(_bits(attn.reshape(t, -1)), o.wb, _bits(x), _bits(x1), self._split(o.wb))
        norm_swiglu(_bits(x1), norm, self.eps, gate_up, _bits(act), self._split(gate_up))
        linear_add(_bits(act), down.wb, _bits(x1), _bits(x2), self._split(down.wb))
        return x2

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        head = self.head
        out = torch.empty(x.shape[0], head.out_features, dtype=torch.float32)
        self._cpus = _allowed_cpus()  # once a step: a process may be pinned after the model is made
        pool = self._pool(x.shape[0]) if self._threads() > 1 else None  # one thread: norm_linear_f32
        if pool is not None:
            try:
                pool.run(self._spin.pool_norm_linear, _bits(x), self.final_norm, self.eps, True, head.wb, head.bias,
                         out.numpy(), False)
            finally:
                pool.lock.release()
            return out
        norm_linear_f32(_bits(x), self.final_norm, self.eps, head.wb, head.bias, out.numpy(), self._split(head.wb))
        return out


def _allowed_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def _bf16_out(gemv):
    """A Gemv as transformer.py's matmuls are called: bfloat16 in, bfloat16 out (one rounding)."""
    if not _native_bf16():
        return lambda x: gemv(x.float()).to(torch.bfloat16)
    bias = torch.from_numpy(gemv.bias[: gemv.out_features]).to(torch.bfloat16)  # a bfloat16 bias, held as float32

    def linear(x):
        return F.linear(x.to(torch.bfloat16), plain_weights(gemv.wb)[: gemv.out_features], bias)

    return linear


class _WideGateUp:
    """The MLP's [gate; up] product, [T, 2 * intermediate] bfloat16, from the interleaved gate/up
    blocks (pack_gate_up) widened for the call: for prefill chunks, see FusedDense.prefill_linears."""

    __slots__ = ("wb",)

    def __init__(self, wb: np.ndarray):
        self.wb = wb

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if _native_bf16():  # the weights' rows put back in [gate; up] order as they are unpacked
            return torch.mm(x.to(torch.bfloat16), plain_weights(self.wb, halves=True).t())
        y = torch.mm(x.float(), widened_t(self.wb))
        t = y.shape[0]  # columns: gate block 0, up block 0, gate block 1, ...
        return y.view(t, -1, 2, BLOCK).transpose(1, 2).reshape(t, -1).to(torch.bfloat16)


def _as_bf16(a: np.ndarray) -> torch.Tensor:
    """int16 bfloat16 bits as a bfloat16 tensor sharing their memory."""
    return torch.from_numpy(a).view(torch.bfloat16)


@njit(**_JIT)
def _round_bf16(src, dst):
    """float32 [n] -> bfloat16 bits int16 [n], rounded as torch's .to(torch.bfloat16) (bf16_bits)."""
    for i in range(src.shape[0]):
        dst[i] = bf16_bits(src[i])


def _bits(t) -> np.ndarray:
    """A bfloat16 tensor as its int16 bits (no copy when contiguous bfloat16; another dtype, e.g. a
    float32 attention output, is rounded to bfloat16 first, as the layer's bfloat16 input). A float32
    numpy array (an attention output as the kernel or the wire gave it) is rounded here, compiled."""
    if isinstance(t, np.ndarray):
        src = np.ascontiguousarray(t, np.float32)
        out = np.empty(src.shape, np.int16)
        _round_bf16(src.reshape(-1), out.reshape(-1))
        return out
    if t.dtype != torch.bfloat16:
        t = t.to(torch.bfloat16)
    return t.contiguous().view(torch.int16).numpy()

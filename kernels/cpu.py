"""append_attend on CPU with Numba: append a chunk's K/V into the paged pool, then attend.

One call = one layer of one micro-batch. Three passes:

1. append: (sequence, kv head) copies the new rows (token-major as they come from
   the projection) into the head-major pool blocks; on the calling thread when they
   are few (a decode step), else a prange;
2. attend: the planned items (see plan.py), each an online-softmax pass over a key
   range of one (sequence, kv head, query tile) for all its query rows, handed out
   one at a time (dynamic scheduling);
3. merge: groups that were split (or see no key), exact LSE merge of their
   partials; skipped when there is none.

A small call (plan.call_work up to _INLINE_WORK, e.g. batch 1 at a short context)
runs all three on the calling thread, planned without splits, in the same jitted
call as its validation and plan: waking the second thread costs more than it saves
there. Larger calls run the passes over numba's threads.

Pools of float16/bfloat16 hold uint16 bits. The storage is a compile-time property:
bfloat16 arrays reach the jitted code viewed as int16, float16 as uint16, so each
variant is compiled with its own decoder and no branch. The vector tiles widen a
16-bit block once into float32 scratch (tiles._stage); the scalar loops decode in
each load (bfloat16 a 16-bit shift, float16 vcvtph2ps where the CPU has F16C).

head_dim a multiple of 16 (every real checkpoint) takes the explicit-vector tile
loop of tiles.py, specialised for head_dim 64 and 128; other head dims take the
scalar loops below (register-blocked 4 rows x 4 keys, vectorised by LLVM). Scores
use q pre-multiplied by `scale`.

Per-call cost matters (one call per layer per micro-batch): type checks are identity
tests in Python, shape checks, validation, planning and (for a small call) the
kernel are one jitted call; numba's thread count and chunk size are read and set
through its raw ctypes entry points; out/lse may be passed in preallocated.
"""

import math

import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic, overload

from . import plan as P
from . import tiles as T
from .simd import prefetch
from .softmax import softmax_block as _softmax_block
from .softmax import u32_as_f32 as _u32_as_f32
from .storage import STORAGES, check_storage, widen

# No nnan/ninf: the running max starts at -inf and empty rows yield lse = -inf.
FASTMATH = {"reassoc", "contract", "arcp", "nsz", "afn"}
_JIT = dict(nogil=True, cache=True, error_model="numpy", fastmath=FASTMATH)

# Query positions per group for chunks (prefill). 64 rows x head_dim floats of
# accumulator stay in L1/L2 while the block is streamed.
_ROWS_PER_GROUP = 64
# Smallest key range given its own item (per query position).
_MIN_SPLIT = 256
# Elements (new tokens x kv heads x head_dim) up to which the append runs on the
# calling thread instead of a parallel region.
_SERIAL_APPEND = 1 << 16
# plan.call_work up to which a whole call runs on the calling thread: below it, waking
# the second thread (and merging split groups) costs more than it saves. Measured on
# the 2-vCPU Xeon (tools/bench_kernels.py --inline-sweep): SmolLM2's 9/3/64 bf16 at
# batch 1 crosses between context 1024 (work 0.79M) and 2048 (1.57M); 32/8/128 near 256 (1.3M).
_INLINE_WORK = 1 << 20


@intrinsic
def _half_bits_to_f32(typingctx, h):
    """IEEE half bits (a 16-bit integer) to float32 via LLVM's fpext half: one
    vcvtph2ps per 16 lanes on CPUs with F16C."""
    if not isinstance(h, types.Integer) or h.bitwidth != 16:
        return None
    sig = types.float32(h)

    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

    return sig, codegen


def _host_has_f16c():
    # Only when compiling for this host: for a generic target LLVM would lower fpext
    # half to a runtime call that may not resolve.
    from llvmlite import binding

    if numba.config.CPU_NAME or numba.config.CPU_FEATURES:
        return "+f16c" in (numba.config.CPU_FEATURES or "")
    try:
        return bool(binding.get_host_cpu_features().get("f16c", False))
    except RuntimeError:
        return False


_F16C = _host_has_f16c()


def _host_has(feature):
    from llvmlite import binding

    try:
        return bool(binding.get_host_cpu_features().get(feature, False))
    except RuntimeError:
        return False


# Whether this CPU reports avx512_bf16 (vdpbf16ps). The kernels do not use it: on the
# machines measured it is masked (the hypervisor hides it), so bfloat16 is widened to
# float32 in the vector load (a shift) and computed with float32 FMAs. Reported by
# tools/bench_kernels.py.
HOST_AVX512_BF16 = _host_has("avx512bf16")


@njit(inline="always", **_JIT)
def _bf16_to_f32(h):
    # Works for uint16 and int16 bits alike: the shift drops any sign extension.
    return _u32_as_f32(np.uint32(h) << np.uint32(16))


@njit(inline="always", **_JIT)
def _f16_to_f32(h):
    # Manual IEEE half decode, for CPUs without F16C; written branch-light so LLVM
    # turns it into selects and the loops still vectorise.
    a = np.uint32(h) & np.uint32(0x7FFF)
    normal = _u32_as_f32((a << np.uint32(13)) + np.uint32(0x38000000))  # rebias 15 -> 127
    special = _u32_as_f32((a << np.uint32(13)) | np.uint32(0x7F800000))  # inf / nan
    subnormal = np.float32(a) * np.float32(5.9604644775390625e-08)  # a * 2**-24
    f = normal if a >= np.uint32(0x0400) else subnormal
    f = special if a >= np.uint32(0x7C00) else f
    return -f if (np.uint32(h) & np.uint32(0x8000)) != 0 else f


def _vector_ok(pool):
    """Whether the vector tiles can decode this pool's storage (host version)."""
    return pool.dtype != np.uint16 or _F16C


@overload(_vector_ok, jit_options=_JIT)
def _ov_vector_ok(pool):
    # float16 is widened by LLVM's fpext half: one instruction with F16C, else a
    # runtime call that the JIT may not resolve; such hosts keep the scalar decoder.
    ok = pool.dtype != types.uint16 or _F16C
    return lambda pool: ok


def _dec(h):
    """float32 value of one stored element. Jitted code gets the overload below (the
    storage told apart by type); this host version is the same mapping, for checks."""
    if isinstance(h, np.int16):
        return widen(np.array([h]).view(np.uint16), "bfloat16")[0]
    if isinstance(h, np.uint16):
        return widen(np.array([h], np.uint16), "float16")[0]
    return np.float32(h)


@overload(_dec, inline="always", jit_options=_JIT)
def _ov_dec(h):
    # The storage is told apart by type: float32 as is, bfloat16 bits as int16,
    # float16 bits as uint16 (see _append_attend_16).
    if h == types.float32:
        return lambda h: h
    if h == types.int16:
        return lambda h: _bf16_to_f32(h)
    if h == types.uint16:
        if _F16C:
            return lambda h: _half_bits_to_f32(h)
        return lambda h: _f16_to_f32(h)
    return None


@njit(inline="always", **_JIT)
def _prefetch_rows(pool, blk, layer, t, n):
    """Prefetch every cache line of rows [t, t + n) of pool[blk, layer] (into L2).
    Flat offsets, no array views (a view costs an NRT incref/decref)."""
    bs = pool.shape[2]
    d = pool.shape[3]
    base = (blk * pool.shape[1] + layer) * bs * d
    for o in range(base + t * d, base + min(t + n, bs) * d, 64 // pool.itemsize):
        prefetch(pool, o)


@njit(**_JIT)
def _qk4(qs, r, kp, blk, layer, t0, t1, s, bn, pf):
    """s[r:r+4, t] = qs[r:r+4] . kp[blk, layer, t] for t in [t0, t1).

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
            k0 = _dec(kp[blk, layer, t, x]); k1 = _dec(kp[blk, layer, t + 1, x]); k2 = _dec(kp[blk, layer, t + 2, x]); k3 = _dec(kp[blk, layer, t + 3, x])
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
            k = _dec(kp[blk, layer, t, x])
            a0 += qs[r, x] * k
            a1 += qs[r + 1, x] * k
            a2 += qs[r + 2, x] * k
            a3 += qs[r + 3, x] * k
        s[r, t] = a0; s[r + 1, t] = a1; s[r + 2, t] = a2; s[r + 3, t] = a3
        t += 1


@njit(**_JIT)
def _pv4(p, r, vp, blk, layer, t0, t1, acc, bn, pf):
    """acc[r:r+4] += sum_t p[r:r+4, t] * vp[blk, layer, t] for t in [t0, t1).

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
            v0 = _dec(vp[blk, layer, t, x]); v1 = _dec(vp[blk, layer, t + 1, x]); v2 = _dec(vp[blk, layer, t + 2, x]); v3 = _dec(vp[blk, layer, t + 3, x])
            acc[r, x] += p00 * v0 + p01 * v1 + p02 * v2 + p03 * v3
            acc[r + 1, x] += p10 * v0 + p11 * v1 + p12 * v2 + p13 * v3
            acc[r + 2, x] += p20 * v0 + p21 * v1 + p22 * v2 + p23 * v3
            acc[r + 3, x] += p30 * v0 + p31 * v1 + p32 * v2 + p33 * v3
        t += 4
    while t < t1:
        p0 = p[r, t]; p1 = p[r + 1, t]; p2 = p[r + 2, t]; p3 = p[r + 3, t]
        for x in range(d):
            v = _dec(vp[blk, layer, t, x])
            acc[r, x] += p0 * v
            acc[r + 1, x] += p1 * v
            acc[r + 2, x] += p2 * v
            acc[r + 3, x] += p3 * v
        t += 1


@njit(**_JIT)
def _qk1(qs, r, kp, blk, layer, t0, t1, s, bn, pf):
    """s[r, t] = qs[r] . kp[blk, layer, t] for one row, four tokens at a time."""
    d = kp.shape[3]
    t = t0
    while t + 4 <= t1:
        if pf:
            _prefetch_rows(kp, bn, layer, t, 4)
        a0 = a1 = a2 = a3 = np.float32(0.0)
        for x in range(d):
            q = qs[r, x]
            a0 += q * _dec(kp[blk, layer, t, x])
            a1 += q * _dec(kp[blk, layer, t + 1, x])
            a2 += q * _dec(kp[blk, layer, t + 2, x])
            a3 += q * _dec(kp[blk, layer, t + 3, x])
        s[r, t] = a0; s[r, t + 1] = a1; s[r, t + 2] = a2; s[r, t + 3] = a3
        t += 4
    while t < t1:
        a = np.float32(0.0)
        for x in range(d):
            a += qs[r, x] * _dec(kp[blk, layer, t, x])
        s[r, t] = a
        t += 1


@njit(**_JIT)
def _pv1(p, r, vp, blk, layer, t0, t1, acc, bn, pf):
    """acc[r] += sum_t p[r, t] * vp[blk, layer, t] for one row, four tokens at a time."""
    d = vp.shape[3]
    t = t0
    while t + 4 <= t1:
        if pf:
            _prefetch_rows(vp, bn, layer, t, 4)
        p0 = p[r, t]; p1 = p[r, t + 1]; p2 = p[r, t + 2]; p3 = p[r, t + 3]
        for x in range(d):
            acc[r, x] += (p0 * _dec(vp[blk, layer, t, x]) + p1 * _dec(vp[blk, layer, t + 1, x])
                          + p2 * _dec(vp[blk, layer, t + 2, x]) + p3 * _dec(vp[blk, layer, t + 3, x]))
        t += 4
    while t < t1:
        p0 = p[r, t]
        for x in range(d):
            acc[r, x] += p0 * _dec(vp[blk, layer, t, x])
        t += 1


@njit(**_JIT)
def _prefetch_block(k_pool, v_pool, blk, layer):
    """Prefetch every line of one block's K and V rows of a layer (an item's first block)."""
    _prefetch_rows(k_pool, blk, layer, 0, k_pool.shape[2])
    _prefetch_rows(v_pool, blk, layer, 0, v_pool.shape[2])


@njit(**_JIT)
def _attend_rows(qs, n_rows, row_lim, k_pool, v_pool, bt_row, layer, k0, k1, s, m, l, acc):
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
        # Blocks are scattered and a layer's rows of one are only bs * d elements, so
        # the hardware prefetcher stops at every block edge: the next block's rows
        # are prefetched a few at a time inside the QK/PV tile loops (a burst of a
        # whole block ahead stalls the loads of the current one in the miss queue).
        pf = b + 1 < b_end
        base = b * bs
        t0 = max(k0 - base, 0)
        t1 = min(k1 - base, bs)
        bn = bt_row[b + 1] if pf else blk
        for r in range(0, r4, 4):
            _qk4(qs, r, k_pool, blk, layer, t0, t1, s, bn, pf and r == 0)
        for r in range(r4, n_rows):
            _qk1(qs, r, k_pool, blk, layer, t0, t1, s, bn, pf and r == 0)
        _softmax_block(s, n_rows, row_lim, base, t0, t1, m, l, acc)
        for r in range(0, r4, 4):
            _pv4(s, r, v_pool, blk, layer, t0, t1, acc, bn, pf and r == 0)
        for r in range(r4, n_rows):
            _pv1(s, r, v_pool, blk, layer, t0, t1, acc, bn, pf and r == 0)


@njit(**_JIT)
def _append_rows(k_new, v_new, k_pool, v_pool, block_table, table_rows, kv_start, context_lens,
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
            k_pool[blk, layer, off, x] = k_new[kv0 + t, h, x]
            v_pool[blk, layer, off, x] = v_new[kv0 + t, h, x]


@njit(**_JIT)
def _attend_item(item, tid, q, k_pool, v_pool, block_table, table_rows, q_start, kv_start,
                 context_lens, layer, scale, groups, items, gsz, scratch, part_o, part_lse,
                 out, lse):
    """One planned item: online softmax of its group's query rows over its key range,
    normalised into out/lse (a whole group) or into its partial slot (a split group).
    scratch: the per-thread buffers of _scratch, row tid used."""
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
    for jj in range(nqt):
        tok = q_start[i] + j0 + jj
        lim = context_lens[i] + (j0 + jj + 1 if append else 0)
        for gg in range(gsz):
            r = jj * gsz + gg
            row_lim[r] = lim
            for x in range(d):
                qs[r, x] = _dec(q[tok, h * gsz + gg, x]) * scale
    bt_row = block_table[table_rows[i], h]
    if not (d % 16 == 0 and _vector_ok(k_pool)):
        _attend_rows(qs, n_rows, row_lim, k_pool, v_pool, bt_row, layer, k0, k1, s, m, l, acc)
    elif d == 64:
        T.attend_rows_64(qs, n_rows, row_lim, k_pool, v_pool, bt_row, layer, k0, k1, s, m, l, acc,
                         kw_t[tid], vw_t[tid])
    elif d == 128:
        T.attend_rows_128(qs, n_rows, row_lim, k_pool, v_pool, bt_row, layer, k0, k1, s, m, l,
                          acc, kw_t[tid], vw_t[tid])
    else:
        T.attend_rows_any(qs, n_rows, row_lim, k_pool, v_pool, bt_row, layer, k0, k1, s, m, l,
                          acc, kw_t[tid], vw_t[tid])
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
def _merge_group(g, q_start, groups, gsz, part_o, part_lse, out, lse):
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


@njit(**_JIT)
def _scratch(n_threads, rmax, bs, d):
    """Per-thread buffers of the attend pass (indexed by thread id, not allocated per
    item): query rows, causal limits, scores, running max and sum, accumulators, and
    a 16-bit block's K and V widened to float32 (tiles._stage)."""
    return (np.empty((n_threads, rmax, d), np.float32), np.empty((n_threads, rmax), np.int64),
            np.empty((n_threads, rmax, bs), np.float32), np.empty((n_threads, rmax), np.float32),
            np.empty((n_threads, rmax), np.float32), np.empty((n_threads, rmax, d), np.float32),
            np.empty((n_threads, bs * d), np.float32), np.empty((n_threads, bs * d), np.float32))


@njit(parallel=True, **_JIT)
def _append_attend(q, k_new, v_new, k_pool, v_pool, block_table, table_rows, q_start, kv_start,
                   context_lens, layer, scale, groups, items, order, n_parts, q_tile, n_threads,
                   out, lse):
    """The three passes over both threads (see the module docstring)."""
    n_seq = table_rows.shape[0]
    num_kv_heads = k_new.shape[1]  # local kv heads; the table may be wider (rows past it unused)
    d = k_pool.shape[3]
    gsz = q.shape[1] // num_kv_heads
    rmax = q_tile * gsz

    # Pass 1: append. Bits are copied as they are (same encoding in and out). A decode
    # step's rows are a few KB: copied on this thread, a parallel region would cost more.
    if kv_start[n_seq] * num_kv_heads * d <= _SERIAL_APPEND:
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
def _append_attend_inline(q, k_new, v_new, k_pool, v_pool, block_table, table_rows, q_start,
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
def _append_attend_16(bf16, q, k_new, v_new, k_pool, v_pool, block_table, table_rows, q_start,
                      kv_start, context_lens, layer, scale, groups, items, order, n_parts, q_tile,
                      n_threads, out, lse):
    """uint16-held storages: bfloat16 bits go to the kernel viewed as int16, which selects
    its decoder at compile time (the views are free here, ~1 us each in Python)."""
    if bf16:
        _append_attend(q.view(np.int16), k_new.view(np.int16), v_new.view(np.int16),
                       k_pool.view(np.int16), v_pool.view(np.int16), block_table, table_rows,
                       q_start, kv_start, context_lens, layer, np.float32(scale), groups, items,
                       order, n_parts, q_tile, n_threads, out, lse)
    else:
        _append_attend(q, k_new, v_new, k_pool, v_pool, block_table, table_rows, q_start,
                       kv_start, context_lens, layer, np.float32(scale), groups, items, order,
                       n_parts, q_tile, n_threads, out, lse)


@njit(**_JIT)
def _shapes_ok(q, k_new, v_new, k_pool, v_pool, block_table, table_rows, q_start, kv_start,
               context_lens, layer):
    """The shape checks of prepare() as one jitted test (they cost ~2 us in Python);
    prepare() says what is wrong when this is False."""
    d = k_pool.shape[3]
    num_kv_heads = k_new.shape[1]
    n_seq = table_rows.shape[0]
    if v_pool.shape != k_pool.shape or block_table.shape[1] < num_kv_heads:
        return False
    if q.shape[2] != d or k_new.shape[2] != d or v_new.shape != k_new.shape:
        return False
    if num_kv_heads == 0 or q.shape[1] % num_kv_heads != 0:
        return False
    if (q_start.shape[0] != n_seq + 1 or kv_start.shape[0] != n_seq + 1
            or context_lens.shape[0] != n_seq):
        return False
    if n_seq > 0 and (q_start[n_seq] != q.shape[0] or kv_start[n_seq] != k_new.shape[0]):
        return False
    return 0 <= layer < k_pool.shape[1]


@njit(**_JIT)
def _plan_and_run_inline(bf16, q, k_new, v_new, k_pool, v_pool, block_table, table_rows, q_start,
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
        gsz, k_pool.shape[3], _ROWS_PER_GROUP, k_pool.shape[2], n_threads, _MIN_SPLIT,
        inline_work)
    if err == 0 and inline and q.shape[0] > 0:
        if bf16:
            _append_attend_inline(q.view(np.int16), k_new.view(np.int16), v_new.view(np.int16),
                                  k_pool.view(np.int16), v_pool.view(np.int16), block_table,
                                  table_rows, q_start, kv_start, context_lens, layer,
                                  np.float32(scale), groups, items, order, n_parts, q_tile, 1,
                                  out, lse)
        else:
            _append_attend_inline(q, k_new, v_new, k_pool, v_pool, block_table, table_rows,
                                  q_start, kv_start, context_lens, layer, np.float32(scale),
                                  groups, items, order, n_parts, q_tile, 1, out, lse)
    return err, seq, inline, q_tile, groups, items, order, n_parts


def _check_array(name, a, dtype, ndim):
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{name} must be a numpy array, got {type(a).__name__}")
    if a.dtype != dtype or a.ndim != ndim:
        raise TypeError(f"{name} must be {ndim}-d {np.dtype(dtype)}, got {a.ndim}-d {a.dtype}")
    if not a.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous")


_DT = {"float32": np.dtype(np.float32), "float16": np.dtype(np.uint16),
       "bfloat16": np.dtype(np.uint16)}
_I32 = np.dtype(np.int32)


def _is(a, dt, ndim):
    """The common case of _check_array, cheaply: native dtypes are singletons (`is`)."""
    return type(a) is np.ndarray and a.dtype is dt and a.ndim == ndim and a.flags.c_contiguous


def prepare(q, k_new, v_new, k_pool, v_pool, block_table, table_rows, q_start, kv_start,
            context_lens, layer, storage):
    """Check a call's arguments' types and shapes; return the int32 index arrays
    (table_rows, q_start, kv_start, context_lens).

    The blocks the call touches are checked by plan.validate (in append_attend).
    """
    dt = _DT.get(storage) if type(storage) is str else None
    if dt is None:
        check_storage(storage)  # raises
    if not (_is(q, dt, 3) and _is(k_new, dt, 3) and _is(v_new, dt, 3) and _is(k_pool, dt, 4)
            and _is(v_pool, dt, 4)):
        for name, a, nd in (("q", q, 3), ("k_new", k_new, 3), ("v_new", v_new, 3),
                            ("k_pool", k_pool, 4), ("v_pool", v_pool, 4)):
            _check_array(name, a, dt, nd)
    table_rows, q_start, kv_start, context_lens = (
        a if type(a) is np.ndarray and a.dtype is _I32 and a.flags.c_contiguous
        else np.ascontiguousarray(a, dtype=np.int32)
        for a in (table_rows, q_start, kv_start, context_lens))
    if not _is(block_table, _I32, 3):
        _check_array("block_table", block_table, np.int32, 3)
    n_blocks, n_layers, bs, d = k_pool.shape
    if v_pool.shape != k_pool.shape:
        raise ValueError("k_pool and v_pool differ in shape")
    num_kv_heads = k_new.shape[1]
    n_seq = table_rows.shape[0]
    if block_table.shape[1] < num_kv_heads:
        raise ValueError(f"block table has {block_table.shape[1]} kv head rows, request has "
                         f"{num_kv_heads}")
    if q.shape[2] != d or k_new.shape[1:] != (num_kv_heads, d) or v_new.shape != k_new.shape:
        raise ValueError(f"shape mismatch: q {q.shape}, k_new {k_new.shape}, v_new "
                         f"{v_new.shape}, pool head_dim {d}, {num_kv_heads} local kv heads")
    if num_kv_heads == 0 or q.shape[1] % num_kv_heads:
        raise ValueError(f"{q.shape[1]} query heads is not a multiple of {num_kv_heads} kv heads")
    if (q_start.shape != (n_seq + 1,) or kv_start.shape != (n_seq + 1,)
            or context_lens.shape != (n_seq,)):
        raise ValueError("q_start/kv_start need n_seq+1 entries and context_lens n_seq")
    if n_seq and (q_start[-1] != q.shape[0] or kv_start[-1] != k_new.shape[0]):
        raise ValueError("q_start/kv_start must end at the token counts of q/k_new")
    if not 0 <= layer < n_layers:
        raise ValueError(f"layer {layer} outside the pool's {n_layers} layers")
    return table_rows, q_start, kv_start, context_lens


def q_tile_for(n_q_heads, num_kv_heads, max_chunk):
    """Query positions per group: 1 for decode, enough for ~64 rows in prefill."""
    g = n_q_heads // num_kv_heads
    return max(1, min(max_chunk, _ROWS_PER_GROUP // g))


def _check_out(name, a, shape):
    _check_array(name, a, np.float32, len(shape))
    if a.shape != shape:
        raise ValueError(f"{name} must have shape {shape}, got {a.shape}")


def append_attend(q, k_new, v_new, k_pool, v_pool, block_table, table_rows, q_start, kv_start,
                  context_lens, layer, scale, storage, *, out=None, lse=None):
    """Append each sequence's new K/V rows into the paged pool, then attend (DESIGN.md s4).

    One call is one layer of one micro-batch of n_seq sequences (shards). T = q_start[-1]
    query tokens, T_kv = kv_start[-1] new K/V rows; Hq query heads, Hkv = k_new.shape[1]
    local kv heads (Hq a multiple of Hkv: GQA group Hq // Hkv), D head_dim.

    Arguments (arrays C-contiguous; "storage dtype": float32 as float32, float16 and
    bfloat16 as their uint16 bits):
      q             [T, Hq, D] storage dtype: queries, sequence i's rows at
                    q_start[i]:q_start[i+1] (its newest positions, in order).
      k_new, v_new  [T_kv, Hkv, D] storage dtype: the new rows to append, token-major;
                    sequence i's at kv_start[i]:kv_start[i+1].
      k_pool, v_pool [n_blocks, n_layers, block_size, D] storage dtype: the paged KV
                    cache (one block = block_size tokens of one kv head); written by the
                    append.
      block_table   int32 [n_table_rows, >= Hkv, max_blocks]: block_table[r, h, b] is the
                    pool block holding tokens [b * block_size, (b+1) * block_size) of kv
                    head h of the sequence in table row r (-1: none).
      table_rows    int32-like [n_seq]: each sequence's row in block_table.
      q_start       int32-like [n_seq + 1]: query-token offsets, from 0, non-decreasing.
      kv_start      int32-like [n_seq + 1]: new-K/V-row offsets; sequence i appends 0 rows
                    (attend-only) or exactly as many as it has queries.
      context_lens  int32-like [n_seq]: tokens already cached per sequence (appended rows
                    go at positions context_lens[i]...).
      layer         int: the pool layer, 0 <= layer < n_layers.
      scale         float: multiplies q.k (usually 1/sqrt(D)).
      storage       "float32" | "float16" | "bfloat16".
      out, lse      optional preallocated float32 arrays [T, Hq, D] and [T, Hq], written
                    in full and returned (a caller that reuses them allocates nothing).

    Query j of sequence i (0-based among its q rows) sees keys < context_lens[i] + j + 1
    when the sequence appends (causal over its chunk), else < context_lens[i].
    Returns (out float32 [T, Hq, D], lse float32 [T, Hq]): the softmax-weighted values
    and the natural-log sum of exp(scaled scores); a row that sees no key gets out = 0,
    lse = -inf.

    Raises TypeError (wrong array type or dtype) or ValueError (shapes that disagree,
    offsets that are not monotone, a table row, block or position outside the table or
    pool, a layer outside the pool), each with a one-line message; nothing is written
    to the pool then.
    """
    dt = _DT.get(storage) if type(storage) is str else None
    idx = (table_rows, q_start, kv_start, context_lens)
    if (dt is None or not (_is(q, dt, 3) and _is(k_new, dt, 3) and _is(v_new, dt, 3)
                           and _is(k_pool, dt, 4) and _is(v_pool, dt, 4)
                           and _is(block_table, _I32, 3))
            or type(layer) is not int or not all(_is(a, _I32, 1) for a in idx)):
        # The uncommon case: full checks with their messages, int32 index arrays made.
        table_rows, q_start, kv_start, context_lens = prepare(
            q, k_new, v_new, k_pool, v_pool, block_table, table_rows, q_start, kv_start,
            context_lens, layer, storage)
        layer = int(layer)
    t, n_q_heads, d = q.shape
    if out is None:
        out = np.empty((t, n_q_heads, d), np.float32)
    else:
        _check_out("out", out, (t, n_q_heads, d))
    if lse is None:
        lse = np.empty((t, n_q_heads), np.float32)
    else:
        _check_out("lse", lse, (t, n_q_heads))
    n_threads = _num_threads()
    err, seq, inline, q_tile, groups, items, order, n_parts = _plan_and_run_inline(
        storage == "bfloat16", q, k_new, v_new, k_pool, v_pool, block_table, table_rows, q_start,
        kv_start, context_lens, layer, float(scale), n_threads, _INLINE_WORK, out, lse)
    if err < 0:
        prepare(q, k_new, v_new, k_pool, v_pool, block_table, table_rows, q_start, kv_start,
                context_lens, layer, storage)  # raises, naming the shape that is wrong
        raise ValueError("malformed call")  # not reached: prepare and _shapes_ok agree
    if err:
        raise ValueError(f"sequence {seq}: {P.ERRORS[err]}")
    if not inline and t:
        _run(storage, q, k_new, v_new, k_pool, v_pool, block_table, table_rows, q_start,
             kv_start, context_lens, int(layer), scale, groups, items, order, n_parts, q_tile,
             n_threads, out, lse)
    return out, lse


def _run(storage, q, k_new, v_new, k_pool, v_pool, block_table, table_rows, q_start, kv_start,
         context_lens, layer, scale, groups, items, order, n_parts, q_tile, n_threads, out, lse):
    """Run a planned call over numba's threads."""
    # Items differ in size: hand them out one at a time (dynamic scheduling; a thread
    # the OS delays does not hold up the others' share). The setting is thread-local.
    chunk0 = _set_chunksize(1)
    try:
        if storage == "float32":
            _append_attend(q, k_new, v_new, k_pool, v_pool, block_table, table_rows, q_start,
                           kv_start, context_lens, layer, np.float32(scale), groups, items, order,
                           n_parts, q_tile, n_threads, out, lse)
        else:
            _append_attend_16(storage == "bfloat16", q, k_new, v_new, k_pool, v_pool,
                              block_table, table_rows, q_start, kv_start, context_lens, layer,
                              float(scale), groups, items, order, n_parts, q_tile, n_threads,
                              out, lse)
    finally:
        _set_chunksize(chunk0)


def _num_threads():
    """numba.get_num_threads() of this thread without its Python-level checks (~3 us)."""
    if _RAW is None:
        _bind_raw()
    return _RAW[0]()


def _set_chunksize(n):
    """numba.set_parallel_chunksize without its per-call checks and lock (~6 us)."""
    if _RAW is None:
        _bind_raw()
    return _RAW[1](n)


def _bind_raw():
    """The ctypes getter/setter numba binds once its threads are up."""
    global _RAW
    numba.set_parallel_chunksize(numba.get_parallel_chunksize())  # launches the threads
    from numba.np.ufunc import parallel

    _RAW = (parallel._get_num_threads, parallel._set_parallel_chunksize)


_RAW = None


def warmup(storages=STORAGES):
    """Compile (or load from cache) every kernel variant, inline and parallel, on tiny
    shapes."""
    from .storage import to_storage

    rng = np.random.default_rng(0)
    n_threads = _num_threads()
    for storage in storages:
        num_kv_heads, g, d, bs = 1, 2, 8, 4
        pool_shape = (4, 1, bs, d)
        k_pool = to_storage(np.zeros(pool_shape, np.float32), storage)
        v_pool = to_storage(np.zeros(pool_shape, np.float32), storage)
        bt = np.arange(4, dtype=np.int32).reshape(1, 1, 4)
        q = to_storage(rng.standard_normal((2, num_kv_heads * g, d)).astype(np.float32), storage)
        kv = to_storage(rng.standard_normal((2, num_kv_heads, d)).astype(np.float32), storage)
        idx = (np.array([0], np.int32), np.array([0, 2], np.int32), np.array([0, 2], np.int32),
               np.array([5], np.int32))
        append_attend(q, kv, kv, k_pool, v_pool, bt, *idx, 0, 1.0 / math.sqrt(d), storage)
        # The same call over the threads (append_attend runs one this small inline).
        _, _, _, q_tile, groups, items, order, n_parts = P.validate_and_plan(
            bt, 4, *idx, num_kv_heads, g, d, _ROWS_PER_GROUP, bs, n_threads, _MIN_SPLIT, -1)
        _run(storage, q, kv, kv, k_pool, v_pool, bt, *idx, 0, 1.0 / math.sqrt(d), groups,
             items, order, n_parts, q_tile, n_threads, np.empty((2, g, d), np.float32),
             np.empty((2, g), np.float32))

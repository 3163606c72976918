"""Register-blocked attention tiles over one KV block, written with explicit vectors.

The tile loop (flash attention): a tile of query rows (decode: the GQA group of one
kv head; prefill: the group x up to 64/G query positions) is held in a float32
scratch; each KV block of the pool is streamed once and serves every row of the
tile: QK scores, online-softmax update, then PV into the row accumulators.

- QK: four query rows x 4 keys at a time (three rows left: 3 x 4), then two rows x 8 keys, one unreduced
  16-lane accumulator per (row, key) over head_dim (16 zmm registers), folded by one
  transposed reduction (simd.vsum16) into the 16 scores; each K vector loaded feeds all
  the pass's rows (an odd last row: 16 keys of one row). Four rows in one pass read each
  K line once where two row pairs read it twice: from DRAM the second pass adds no
  misses but fills the core's window (float32, one thread, batch 16 from DRAM: G4 D128
  ~1.07x per call, G3 D64 ~1.15x, G7 D128 ~1.06x). Large GQA groups (whole 16-key chunks of >= 4 rows on
  16-bit pools, >= 8 rows at head_dim 64 on float32; the head_dim 64 and 128 bodies):
  the chunk's K is staged as key quads (4 keys x 4 dims per vector, simd.vquad) and
  four rows x four quads accumulate against the rows' broadcast 4-dim slices
  (simd.vbcast4), folded by simd.vsum4x4: the fold, ~2 shuffles + 1 add per (row, key)
  with vsum16, costs an eighth of that. bfloat16 quads are transposed as raw bits and
  widened after (simd.vload_raw, vbf16_eo).
- QK of bfloat16 pools on bfloat16 dot products (attend_rows' dp, the head_dim 64 and
  128 bodies; simd.vdpbf16, vdpbf16ps, where the host has avx512_bf16: see simd.py):
  the query rows stay raw bfloat16 (exact products, float32 accumulation, the scores
  scaled after), K is read as stored, 32 dims a vector: the same tilings (row pairs x 8
  keys, one row x 16 keys, key quads of raw pairs from 4 rows) for half the
  multiply-add instructions and no widening or staging of K. PV stays float32.
- Softmax: a whole chunk every row sees (decode) takes one vector per row without the
  causal bookkeeping; the max's fold and rescale only when a score passes the max; the
  rows' sums of such chunks stay 16-lane vectors (lv), folded once at the end.
- PV: rows in fours (16 accumulators; then a pair, then one), 64 columns of each kept
  in registers over the chunk's keys; each V load feeds four rows' FMAs, the
  probability is broadcast from memory.
- float32 pools are read in place; a 16-bit pool's chunk is widened once into a
  per-thread float32 scratch (one vector load + decode + store per 16 elements), so
  16-bit pools move half the bytes and every query row reads float32 -- except for a
  single query row (decode at GQA group 1), which reads the 16-bit pool in place and
  widens each vector in registers (_direct): there the scratch's store and reload
  were the larger part of the widening's cost. bfloat16 (head_dim 64 and 128, two or
  more rows) is widened in even/odd dim order (one shift or mask per 16 lanes, no
  shuffle; _eo): the query rows are put in that order for the call and the
  accumulators back at its end; decode tiles of up to 8 such rows read V in place
  that way (vdirect; float16 at 4 rows: hdirect; at 8: hdirect8, all eight rows
  x 32 columns per pass). A 16-bit tile of 4k + 3 rows
  gets a zero fourth row (_pad_row).
- The next block's rows are prefetched a little at a time inside the QK/PV loops
  of the first query row(s): blocks may be scattered, so the hardware prefetcher stops at
  every block edge (16-bit at head_dim 64: 32 keys ahead; the rest one chunk, PF_KEYS). A QK tile prefetches its
  keys' lines in a burst before its loads (_prefetch_keys). Spreading them over the
  tile's column loop (a line of each key per column step) read 3-5 % faster on one
  machine (float32 G4 D128, G7 D128, one thread, B16 ctx 2048) but cost SmolLM2's
  9/3/64 bfloat16 20-40 % on a Zen 5 (one thread, B16 ctx 512, a 30-layer pool, us a
  call: spread 442, 389, and with the changes after it 476, 413; burst 335, 349, and
  with those changes 331, 341) and nothing measurable there on 32/8/128 f32 or 28/4/128
  bf16 (ctx 2048): the burst is back.
  Past an item's last key the prefetches take the first block of the item the thread
  runs next (pf_next, where the caller knows it: the inline driver, the spin pool's
  runs), which otherwise starts latency-bound (~8 us an item, one thread, f32 G4 D128):
  one thread, batch 16, from DRAM, alternating twice, us a call: ctx 128 2061, 1895 ->
  1246, 1386; 512 4927, 5964 -> 4394, 4509; 2048 17873, 18811 -> 15863, 18251.
- A block of more than CHUNK (16) keys is walked in 16-key chunks: larger blocks give
  the hardware prefetcher longer runs (measured faster at 64 keys) while the tiles, the
  staging scratch and the scores stay the size of one chunk.

- Without AVX-512 (simd.TARGET_AVX512: 16 vector registers, two a 16-lane vector) the
  16-accumulator passes spill: the key quads, the padded fourth row and the even/odd
  bfloat16 order are compiled out (see _quads for the measurements).

Requires head_dim % 16 == 0 (every real checkpoint's head_dim); scalar.py keeps a
scalar path for the rest.
"""

import numpy as np
from numba import njit, types
from numba.extending import overload

from .simd import (TARGET_AVX512, prefetch, vadd, vany_gt, vbcast4, vbf16_eo, vdpbf16, veo, vexp_nonpos, vfma,
                   vhmax, vhsum, vinterleave, vload, vload16, vload_bf16, vload_bf16_eo, vload_raw, vmul,
                   vquad, vstore, vstore4, vstore8, vsub, vsum4x4, vsum16, vzero)
from .softmax import exp_nonpos

FASTMATH = {"reassoc", "contract", "arcp", "nsz", "afn"}
_JIT = dict(nogil=True, cache=True, error_model="numpy", fastmath=FASTMATH)
# The factory's functions are closures over D: not cached themselves, they are
# compiled into (and cached with) the items.py body that calls them.
_JIT_D = dict(_JIT, cache=False)
# Keys per pass of the block loop (a block of more keys is taken in chunks of this).
CHUNK = 16
# Query rows from which a whole chunk's QK runs on key quads (see _quads), per storage
# (float32: head_dim 64 only; neither in the generic-head_dim body).
QUAD_ROWS_16 = 4
QUAD_ROWS_F32 = 8
# Query rows up to which a bfloat16 pool's V is read in place (see vdirect).
VDIRECT_MAX = 8
# How far ahead of a chunk (keys) its loops prefetch: 16-bit pools at head_dim 64 (NEAR), the rest.
# The rest read a whole block (64 keys at the default block size) ahead until stop 40; one chunk
# ahead read faster on a Zen 5 (calls alternating in one process, batch 16, ctx 2048, blocks in
# runs, 2 threads, time a call one chunk ahead / a block ahead: 32/8/128 f16 0.78-0.84, bf16
# 0.88-0.90, f32 0.94-0.97; 28/4/128 bf16 0.94, f32 0.90; 32/4/64 and 9/3/64 f32 0.92-0.95;
# 32/32/128 f32 0.96-1.00; one thread 0.78-0.98; scattered blocks 0.96-1.01). For the NEAR
# pools 16 keys ahead read 0.65-0.8x as fast as 32 (one thread) and 48 no faster.
PF_NEAR = 32
PF_KEYS = CHUNK


@njit(inline="always", **_JIT)
def _prefetch_keys(pool, pf, t, n, d, step):
    """Prefetch keys t .. t + n - 1 of the next block's rows (flat offset pf of its key 0; none when pf < 0),
    one cache line (`step` elements) at a time: a few lines inside each loop instead of a burst per block."""
    if pf >= 0:
        po = pf + t * d
        while po < pf + (t + n) * d:
            prefetch(pool, po)
            po += step


def _src(pool, scratch):
    """The array the tiles read K or V from (the pool, or the scratch of _in_place)."""


@overload(_src, inline="always", jit_options=_JIT)
def _ov_src(pool, scratch):
    if pool.dtype == types.float32:
        return lambda pool, scratch: pool
    return lambda pool, scratch: scratch


def _in_place(pool):
    """Whether the tiles read the pool's K and V in place (float32), else from a
    per-thread float32 scratch the chunk is widened into (16-bit; see "Staging" in the
    tile body)."""


@overload(_in_place, inline="always", jit_options=_JIT)
def _ov_in_place(pool):
    if pool.dtype == types.float32:
        return lambda pool: True
    return lambda pool: False


def _pad_row(pool):
    """Whether a tile of 4k + 3 query rows runs as 4k + 4 (a zero row added)."""


@overload(_pad_row, inline="always", jit_options=_JIT)
def _ov_pad_row(pool):
    # Rows go in blocks of 4 through QK (key quads) and PV; 3 leftover rows ran one at a
    # time through QK (one K load per FMA) and as a pair and a single row through PV
    # (4 accumulator chains). A fourth, zero row costs a quarter more FMAs on those and
    # was faster (one thread, bf16, ns per key in cache / from DRAM: G3 D64 20.7 / 30.3
    # as G4 18.8 / 29.6; G7 D128 50.5 / 70.2 as G8 47.7 / 64.9). float32 pools: even or
    # worse from DRAM (G3 D64 41.8 as G4 44.3), so not there. Nor without AVX-512 (see
    # _quads).
    if pool.dtype == types.float32 or not TARGET_AVX512:
        return lambda pool: False
    return lambda pool: True


def _eo(pool, bf16, n_rows):
    """Whether a bfloat16 pool is staged in even/odd order (simd.vload_bf16_eo): the
    query rows and accumulators then hold each 32 dims in that order during the call."""


@overload(_eo, inline="always", jit_options=_JIT)
def _ov_eo(pool, bf16, n_rows):
    # Staged pools only (one query row reads the pool in place, see _direct). Widening a
    # bfloat16 in order costs a shuffle-port µop and a shift per 16 elements (plus the
    # float16 decode and a select while both storages went through one load); even/odd
    # costs one integer op. Without AVX-512 in order (see _quads).
    if pool.dtype == types.float32 or not TARGET_AVX512:
        return lambda pool, bf16, n_rows: False
    return lambda pool, bf16, n_rows: bf16 and n_rows > 1


def _direct(pool, n_rows):
    """Whether the tiles read a 16-bit pool in place, widening each vector in registers
    (see _ld), instead of staging the chunk (_in_place)."""


@overload(_direct, inline="always", jit_options=_JIT)
def _ov_direct(pool, n_rows):
    # One query row (decode at GQA group 1) uses each K and V element once: staging would
    # add a store and a reload per 16 elements for nothing (measured one thread, bf16
    # 1/128 in cache: 24.0 -> 14.8 ns per key). With more rows each staged vector feeds
    # several rows' FMAs and staging is not slower (G3-G8 measured the same or better).
    # float32 pools: a constant False, and LLVM drops the branch.
    if pool.dtype == types.float32:
        return lambda pool, n_rows: False
    return lambda pool, n_rows: n_rows == 1


def _quads(pool, d, n_rows):
    """Whether a whole chunk's K is staged as key quads (simd.vbcast4) and QK folds its
    dot products with vsum4x4 instead of vsum16."""


@overload(_quads, inline="always", jit_options=_JIT)
def _ov_quads(pool, d, n_rows):
    # The fold of vsum16 costs ~2 shuffles and an add per (row, key): at GQA group 8 and
    # head_dim 64 a third of QK's vector work (half that at 128). Quads fold for an eighth
    # of that but cost the reordering (2 shuffles per 16 elements). A 16-bit pool is
    # staged (widened) anyway: quads pay from 4 rows (one thread, in cache, G4/G8 D128
    # 37.7 -> 34.4 / 55.9 -> 49.9 ns per key; G7 D128 even). A float32 pool is otherwise
    # read in place, so staging is an extra pass: it paid at G8 D64 (32.0 -> 30.2 ns per
    # key in cache, 56.7 -> 52.5 from DRAM) and lost at D128 (G8: 45.6 -> 48.6 in cache).
    # d is a constant in the specialised bodies: where quads never apply LLVM drops them.
    # Without AVX-512 (16 registers, two a vector) none of the three paid: quads, the
    # padded fourth row and the even/odd bf16 order all go, and the 16-bit bodies are the
    # smaller for it (2-vCPU Zen 3, AVX2, two threads, batch 16, ctx 2048 from DRAM, us a
    # call with all three / without, builds alternating twice: 9/3/64 bf16 3719, 2720 /
    # 1494, 1594, f16 3639, 2385 / 1474, 1615; 28/4/128 bf16 13314, 9944 / 9746, 7892;
    # 32/4/64 bf16 6002, 5481 / 4839, 4726, float32 (quads) 6636, 5773 / 4831, 4718;
    # 32/8/128 within the noise).
    if not TARGET_AVX512:
        return lambda pool, d, n_rows: False
    if pool.dtype == types.float32:
        return lambda pool, d, n_rows: d <= 64 and n_rows >= QUAD_ROWS_F32
    return lambda pool, d, n_rows: n_rows >= QUAD_ROWS_16


def dp_pool(pool, dp):
    """Whether QK runs on bfloat16 dot products (simd.vdpbf16): dp, for a 16-bit pool."""


@overload(dp_pool, inline="always", jit_options=_JIT)
def _ov_dp(pool, dp):
    # float32 pools: a constant False, and LLVM drops the dot-product loops there.
    if pool.dtype == types.float32:
        return lambda pool, dp: False
    return lambda pool, dp: dp


def _ld(pool, idx, bf16):
    """16 elements of a pool from flat index idx as float32 (16-bit: widened in registers)."""


@overload(_ld, inline="always", jit_options=_JIT)
def _ov_ld(pool, idx, bf16):
    if pool.dtype == types.float32:
        return lambda pool, idx, bf16: vload(pool, idx)
    return lambda pool, idx, bf16: vload16(pool, idx, bf16)


@njit(**_JIT)
def raw_row(qs, r, q, tok, hq):
    """qs[r]'s first d / 2 float32 words = the raw bfloat16 bits of q[tok, hq, :] (uint16
    [T, Hq, d], d a multiple of 32): a query row for the dot-product QK (attend_rows' dp)."""
    d = q.shape[2]
    src = (tok * q.shape[1] + hq) * d
    for x in range(0, d, 32):
        vstore(qs, r * qs.shape[1] + x // 2, vload_raw(q, src + x))


def make_attend_rows(D):
    """attend_rows for a compile-time head_dim D (0: read it from the arrays).

    With a constant row stride the 16 key rows of a QK tile are one base register
    plus immediate offsets and the head_dim loops unroll. The whole block loop is one
    function body on purpose: array arguments of a helper, even an inlined one, cost
    an NRT incref/decref pair per call, i.e. per block.
    """

    # Key quads only in the head_dim-specialised bodies (64 and 128): each variant of
    # them adds to the cold compile, and the generic body serves rare head_dims.
    QUADS = D != 0
    # The prefetch spread over the loops of whole chunks (the quad QK, the 4-row PV):
    # 16-bit pools at head_dim 64: PF_NEAR keys ahead; the rest: PF_KEYS. Always the L2
    # hint (simd.prefetch): prefetcht0 (into L1) was 5-10 % faster on a Zen 5 (one thread,
    # bf16 from DRAM, ns per key, into L2 a block ahead / into L1 32 keys ahead: G8 D64
    # 34.6 / 32.0, G3 D64 27.2 / 24.4) but twice as slow on a Zen 4 (one thread, batch 16,
    # ctx 2048, G3 D64 bf16: 2976-2988 us a call with prefetcht0 at either distance,
    # 1484-1908 with the L2 hint at either; two threads G3 and G8 D64, bf16 and f16,
    # 1.1-1.6x): the hint that is never far off. float32 G8 D64 (Zen 5): 49.0 a block
    # ahead, 55.3 into L1 32 keys ahead: the L1 holds too little there.
    NEAR = D == 64
    # Even/odd bfloat16 staging (_eo) only where head_dim is a constant multiple of 32.
    EO = D != 0 and D % 32 == 0
    # bfloat16 dot products (vdpbf16: 32 dims a vector) likewise.
    DP = EO

    @njit(**_JIT_D)
    def attend_rows(qs, n_rows, row_lim, k_pool, v_pool, bt_row, layer, k0, k1, s, m, l, acc,
                    kw, vw, bf16, dp, qscale, pf_next):
        """Online softmax of rows qs[:n_rows] over keys [k0, k1) of one (sequence, kv
        head); row r sees keys < row_lim[r]. Leaves the running max m, sum l and the
        unnormalised accumulator acc (float32 [rows, d]). s: float32 [rows, >= bs];
        kw, vw: float32 scratch of >= bs * d elements (used by 16-bit pools); bf16:
        whether a uint16 pool holds bfloat16 (else float16) bits. qs, row_lim, s, m, l
        and acc have a row to spare past n_rows (make_scratch's padding): a 16-bit
        pool's tile of 4k + 3 rows runs as 4k + 4 (_pad_row).

        dp (bfloat16 pools, the head_dim 64 and 128 bodies; see simd.vdpbf16): QK on
        bfloat16 dot products. qs's rows then hold the query's raw bfloat16 bits (row r's
        d values in the first d / 2 float32 words of qs[r], unscaled) and the scores are
        the dot products times qscale (float32); the key chunks are read as stored (key
        quads of raw pairs at four rows or more), not widened. PV is unchanged.

        pf_next: the flat pool offset of key 0 of the first block of the item this thread
        runs next (-1: none or unknown). The prefetches that would run past k1 take that
        block instead, so the next item does not start on a block nobody prefetched
        (one thread, f32 G4 D128 from DRAM: ~8 us an item otherwise)."""
        ks = _src(k_pool, kw)
        vs = _src(v_pool, vw)
        bs = k_pool.shape[2]
        d = k_pool.shape[3] if D == 0 else D
        nb = k_pool.shape[1]
        sw = s.shape[1]
        step = 64 // k_pool.itemsize  # elements per cache line
        if n_rows % 4 == 3 and _pad_row(k_pool):
            # A zero query row (its results are not read) completes the last block of 4.
            for x in range(0, d, 16):
                vstore(qs, n_rows * d + x, vzero())
            row_lim[n_rows] = row_lim[n_rows - 1]
            n_rows += 1
        for r in range(n_rows):
            m[r] = -np.inf
            l[r] = 0.0
            for x in range(0, d, 16):
                vstore(acc, r * d + x, vzero())
        if k1 <= k0:
            return
        # The rows' running sums of whole chunks stay 16-lane vectors (lv, at the end of
        # l: make_scratch's lane_sums), folded into l once at the end: a horizontal sum per
        # row and chunk was ~1 ns of G8 D64's ~24 per key (one thread, in cache).
        lv0 = l.shape[0] - 16 * n_rows
        for r in range(n_rows):
            vstore(l, lv0 + 16 * r, vzero())
        b_end = (k1 + bs - 1) // bs
        lim_min = k1  # the first key some row does not see, if below k1
        for r in range(n_rows):
            lim_min = min(lim_min, row_lim[r])
        b0 = k0 // bs
        direct = _direct(k_pool, n_rows)
        eo = EO and _eo(k_pool, bf16, n_rows)
        # QK on bfloat16 dot products: the query rows stay raw pairs (no even/odd order:
        # eo then only orders V and the accumulators).
        dq = DP and dp_pool(k_pool, dp)
        eo_q = eo and not dq
        in_place = _in_place(k_pool)
        near = NEAR and not in_place
        if eo_q:  # the rows' dims in the staged order (undone before returning)
            for r in range(n_rows):
                for x in range(r * d, (r + 1) * d, 32):
                    a = vload(qs, x)
                    b2 = vload(qs, x + 16)
                    vstore(qs, x, veo(a, b2, False))
                    vstore(qs, x + 16, veo(a, b2, True))
        first = ((layer * nb + bt_row[b0]) * bs) * d
        po = first
        while po < first + bs * d:  # a while loop: range() with a runtime step divides
            prefetch(k_pool, po)
            prefetch(v_pool, po)
            po += step
        # One pass of the loop body = one chunk of at most CHUNK keys of a block: a
        # block larger than that (long runs for the hardware prefetcher) is still
        # computed 16 keys at a time, so a 16-bit block's staging stays in L1.
        b = b0
        t0 = max(k0 - b0 * bs, 0)
        while b < b_end:
            blk = bt_row[b]  # one table lookup per block, not per token
            base = b * bs
            t_end = min(k1 - base, bs)
            t1 = min(t0 + CHUNK, t_end)
            n = t1 - t0
            row0 = ((layer * nb + blk) * bs + t0) * d
            # Blocks may be scattered (taken one at a time in decode, or from a fragmented
            # pool): the hardware prefetcher stops at each such block edge, so the rows of
            # the chunk PF_NEAR or PF_KEYS keys ahead (through the block table) are prefetched
            # a little at a time inside the loops (a burst of a whole block at once stalls the
            # current block's loads).
            pa = base + t0 + (PF_NEAR if near else PF_KEYS)
            if pa < k1:
                pf = ((layer * nb + bt_row[pa // bs]) * bs + pa % bs) * d
            elif pf_next >= 0 and pa - k1 < bs:
                # Past this item's keys: the next item's first block, in whole chunks (a
                # chunk's keys stay inside the block).
                pf = pf_next + ((pa - k1) // CHUNK) * CHUNK * d
            else:
                pf = -1
            quad = QUADS and n == CHUNK and _quads(k_pool, d, n_rows)
            if quad and dq:
                # bfloat16 dot products: the chunk's K as key quads of raw pairs, not widened:
                # vector j of quad q = 128-bit block j (dims 8j .. 8j + 7) of its 4 keys side
                # by side (lane 4 kk + e: key 4q + kk, dims 8j + 2e, 8j + 2e + 1); 2 d words a
                # quad. Half the stores of the widened quads, no widening.
                kb = 0
                for q4 in range(0, CHUNK, 4):
                    qd = q4 * d
                    for x in range(0, d, 32):
                        src = row0 + qd + x
                        w0 = vload_raw(k_pool, src)
                        w1 = vload_raw(k_pool, src + d)
                        w2 = vload_raw(k_pool, src + 2 * d)
                        w3 = vload_raw(k_pool, src + 3 * d)
                        vstore(kw, qd // 2 + 2 * x, vquad(w0, w1, w2, w3, 0))
                        vstore(kw, qd // 2 + 2 * x + 16, vquad(w0, w1, w2, w3, 1))
                        vstore(kw, qd // 2 + 2 * x + 32, vquad(w0, w1, w2, w3, 2))
                        vstore(kw, qd // 2 + 2 * x + 48, vquad(w0, w1, w2, w3, 3))
            elif quad:
                # Widen (16-bit) and reorder the chunk's K into key quads: vector j of quad
                # q = K[4q + kk, 4j + e] in lane 4kk + e, written as four 128-bit stores.
                kb = 0
                for q4 in range(0, CHUNK, 4):
                    qd = q4 * d
                    if eo:
                        # bfloat16: the 4 keys' raw 128-bit blocks transposed first (vquad on
                        # the bits: 8 dims of each key per block), then widened even/odd: the
                        # low halves are the quad of dims 8b + {0, 2, 4, 6}, the high halves
                        # of 8b + {1, 3, 5, 7}: the eo order's query positions x + 4b and
                        # x + 16 + 4b. Half the shuffles of widening first (8, not 16, per 4
                        # keys x 32 dims; one thread, in cache, G8 D64 22.6 -> 22.0, G7 D128
                        # 37.9 -> 36.3 ns per key).
                        for x in range(0, d, 32):
                            src = row0 + qd + x
                            w0 = vload_raw(k_pool, src)
                            w1 = vload_raw(k_pool, src + d)
                            w2 = vload_raw(k_pool, src + 2 * d)
                            w3 = vload_raw(k_pool, src + 3 * d)
                            tb = vquad(w0, w1, w2, w3, 0)
                            vstore(kw, qd + 4 * x, vbf16_eo(tb, False))
                            vstore(kw, qd + 4 * x + 64, vbf16_eo(tb, True))
                            tb = vquad(w0, w1, w2, w3, 1)
                            vstore(kw, qd + 4 * x + 16, vbf16_eo(tb, False))
                            vstore(kw, qd + 4 * x + 80, vbf16_eo(tb, True))
                            tb = vquad(w0, w1, w2, w3, 2)
                            vstore(kw, qd + 4 * x + 32, vbf16_eo(tb, False))
                            vstore(kw, qd + 4 * x + 96, vbf16_eo(tb, True))
                            tb = vquad(w0, w1, w2, w3, 3)
                            vstore(kw, qd + 4 * x + 48, vbf16_eo(tb, False))
                            vstore(kw, qd + 4 * x + 112, vbf16_eo(tb, True))
                    else:  # float32 or float16 (bfloat16 takes eo here: n_rows >= 4)
                        for x in range(0, d, 16):
                            src = row0 + qd + x
                            w0 = vload(k_pool, src)
                            w1 = vload(k_pool, src + d)
                            w2 = vload(k_pool, src + 2 * d)
                            w3 = vload(k_pool, src + 3 * d)
                            vstore(kw, qd + 4 * x, vquad(w0, w1, w2, w3, 0))
                            vstore(kw, qd + 4 * x + 16, vquad(w0, w1, w2, w3, 1))
                            vstore(kw, qd + 4 * x + 32, vquad(w0, w1, w2, w3, 2))
                            vstore(kw, qd + 4 * x + 48, vquad(w0, w1, w2, w3, 3))
            else:
                kb = row0
                if not (direct or in_place or dq):
                    # Staging: the chunk widened once into the scratch (every row of the
                    # tile then reads float32; decoding in each load would repeat the
                    # widening per query row). One branch on the storage per chunk, in this
                    # body: in a helper taking the arrays it cost NRT reference counting
                    # (atomics and a vzeroupper) per call.
                    kb = 0
                    if eo:  # bfloat16: each 32 dims even offsets first, then odd
                        for x in range(0, n * d, 32):
                            vstore(kw, x, vload_bf16_eo(k_pool, row0 + x, False))
                            vstore(kw, x + 16, vload_bf16_eo(k_pool, row0 + x, True))
                    elif bf16:
                        for x in range(0, n * d, 16):
                            vstore(kw, x, vload_bf16(k_pool, row0 + x))
                    else:  # float16: vcvtph2ps
                        for x in range(0, n * d, 16):
                            vstore(kw, x, vload(k_pool, row0 + x))

            # QK: s[r, t0 + t] = qs[r] . K[t]. Rows in pairs over 8 keys (each K load
            # feeds two FMAs; 16 accumulators), an odd last row over 16 keys. One row of
            # a 16-bit pool: over 16 keys, read in place (_direct).
            r = 0
            if quad and dq:
                # As below on raw pairs: per 8 dims (4 words), four quad loads and four
                # broadcasts of a row's 8 dims feed 16 dot products.
                while r + 4 <= n_rows:
                    qb = r * d
                    a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = vzero()
                    a8 = a9 = a10 = a11 = a12 = a13 = a14 = a15 = vzero()
                    for j in range(0, d // 2, 4):
                        if r == 0 and pf >= 0:  # 128 elements an iteration cover 16 keys
                            po = pf + 32 * j
                            while po < pf + 32 * j + 128:
                                prefetch(k_pool, po)
                                po += step
                        kv0 = vload(kw, 4 * j)
                        kv1 = vload(kw, 4 * j + 2 * d)
                        kv2 = vload(kw, 4 * j + 4 * d)
                        kv3 = vload(kw, 4 * j + 6 * d)
                        qv = vbcast4(qs, qb + j)
                        a0 = vdpbf16(a0, qv, kv0)
                        a1 = vdpbf16(a1, qv, kv1)
                        a2 = vdpbf16(a2, qv, kv2)
                        a3 = vdpbf16(a3, qv, kv3)
                        qv = vbcast4(qs, qb + d + j)
                        a4 = vdpbf16(a4, qv, kv0)
                        a5 = vdpbf16(a5, qv, kv1)
                        a6 = vdpbf16(a6, qv, kv2)
                        a7 = vdpbf16(a7, qv, kv3)
                        qv = vbcast4(qs, qb + 2 * d + j)
                        a8 = vdpbf16(a8, qv, kv0)
                        a9 = vdpbf16(a9, qv, kv1)
                        a10 = vdpbf16(a10, qv, kv2)
                        a11 = vdpbf16(a11, qv, kv3)
                        qv = vbcast4(qs, qb + 3 * d + j)
                        a12 = vdpbf16(a12, qv, kv0)
                        a13 = vdpbf16(a13, qv, kv1)
                        a14 = vdpbf16(a14, qv, kv2)
                        a15 = vdpbf16(a15, qv, kv3)
                    vstore(s, r * sw + t0, vmul(vsum4x4(a0, a1, a2, a3), qscale))
                    vstore(s, (r + 1) * sw + t0, vmul(vsum4x4(a4, a5, a6, a7), qscale))
                    vstore(s, (r + 2) * sw + t0, vmul(vsum4x4(a8, a9, a10, a11), qscale))
                    vstore(s, (r + 3) * sw + t0, vmul(vsum4x4(a12, a13, a14, a15), qscale))
                    r += 4
                while r < n_rows:
                    qb = r * d
                    a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = vzero()
                    for j in range(0, d // 2, 8):
                        qv = vbcast4(qs, qb + j)
                        a0 = vdpbf16(a0, qv, vload(kw, 4 * j))
                        a1 = vdpbf16(a1, qv, vload(kw, 4 * j + 2 * d))
                        a2 = vdpbf16(a2, qv, vload(kw, 4 * j + 4 * d))
                        a3 = vdpbf16(a3, qv, vload(kw, 4 * j + 6 * d))
                        qv = vbcast4(qs, qb + j + 4)
                        a4 = vdpbf16(a4, qv, vload(kw, 4 * j + 16))
                        a5 = vdpbf16(a5, qv, vload(kw, 4 * j + 2 * d + 16))
                        a6 = vdpbf16(a6, qv, vload(kw, 4 * j + 4 * d + 16))
                        a7 = vdpbf16(a7, qv, vload(kw, 4 * j + 6 * d + 16))
                    vstore(s, r * sw + t0,
                           vmul(vsum4x4(vadd(a0, a4), vadd(a1, a5), vadd(a2, a6), vadd(a3, a7)), qscale))
                    r += 1
            elif quad:
                # Four rows x the chunk's four quads (16 accumulators): per 4 dims, four K
                # loads and four query broadcasts feed 16 FMAs.
                while r + 4 <= n_rows:
                    qb = r * d
                    a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = vzero()
                    a8 = a9 = a10 = a11 = a12 = a13 = a14 = a15 = vzero()
                    for j in range(0, d, 4):
                        if r == 0 and pf >= 0:
                            # The next block's K at this chunk's offset, spread evenly over
                            # the first rows' loop: 64 elements an iteration cover 16 keys.
                            po = pf + 16 * j
                            while po < pf + 16 * j + 64:
                                prefetch(k_pool, po)
                                po += step
                        kv0 = vload(kw, 4 * j)
                        kv1 = vload(kw, 4 * j + 4 * d)
                        kv2 = vload(kw, 4 * j + 8 * d)
                        kv3 = vload(kw, 4 * j + 12 * d)
                        qv = vbcast4(qs, qb + j)
                        a0 = vfma(qv, kv0, a0)
                        a1 = vfma(qv, kv1, a1)
                        a2 = vfma(qv, kv2, a2)
                        a3 = vfma(qv, kv3, a3)
                        qv = vbcast4(qs, qb + d + j)
                        a4 = vfma(qv, kv0, a4)
                        a5 = vfma(qv, kv1, a5)
                        a6 = vfma(qv, kv2, a6)
                        a7 = vfma(qv, kv3, a7)
                        qv = vbcast4(qs, qb + 2 * d + j)
                        a8 = vfma(qv, kv0, a8)
                        a9 = vfma(qv, kv1, a9)
                        a10 = vfma(qv, kv2, a10)
                        a11 = vfma(qv, kv3, a11)
                        qv = vbcast4(qs, qb + 3 * d + j)
                        a12 = vfma(qv, kv0, a12)
                        a13 = vfma(qv, kv1, a13)
                        a14 = vfma(qv, kv2, a14)
                        a15 = vfma(qv, kv3, a15)
                    vstore(s, r * sw + t0, vsum4x4(a0, a1, a2, a3))
                    vstore(s, (r + 1) * sw + t0, vsum4x4(a4, a5, a6, a7))
                    vstore(s, (r + 2) * sw + t0, vsum4x4(a8, a9, a10, a11))
                    vstore(s, (r + 3) * sw + t0, vsum4x4(a12, a13, a14, a15))
                    r += 4
                # Remaining rows one at a time, even and odd dims in separate accumulators
                # (8 FMA chains).
                while r < n_rows:
                    qb = r * d
                    a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = vzero()
                    for j in range(0, d, 8):
                        qv = vbcast4(qs, qb + j)
                        a0 = vfma(qv, vload(kw, 4 * j), a0)
                        a1 = vfma(qv, vload(kw, 4 * j + 4 * d), a1)
                        a2 = vfma(qv, vload(kw, 4 * j + 8 * d), a2)
                        a3 = vfma(qv, vload(kw, 4 * j + 12 * d), a3)
                        qv = vbcast4(qs, qb + j + 4)
                        a4 = vfma(qv, vload(kw, 4 * j + 16), a4)
                        a5 = vfma(qv, vload(kw, 4 * j + 4 * d + 16), a5)
                        a6 = vfma(qv, vload(kw, 4 * j + 8 * d + 16), a6)
                        a7 = vfma(qv, vload(kw, 4 * j + 12 * d + 16), a7)
                    vstore(s, r * sw + t0, vsum4x4(vadd(a0, a4), vadd(a1, a5), vadd(a2, a6), vadd(a3, a7)))
                    r += 1
            # bfloat16 dot products on K as stored (fewer than four rows, or a partial
            # chunk): rows in pairs over 8 keys, then one row over 16 keys, as below.
            while dq and r + 2 <= n_rows:
                qb = r * d
                t = 0
                while t + 8 <= n:
                    if r == 0:
                        _prefetch_keys(k_pool, pf, t, 8, d, step)
                    a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = vzero()
                    a8 = a9 = a10 = a11 = a12 = a13 = a14 = a15 = vzero()
                    o = kb + t * d
                    for c in range(0, d, 32):
                        qv = vload(qs, qb + c // 2)
                        qw = vload(qs, qb + d + c // 2)
                        k = vload_raw(k_pool, o + c)
                        a0 = vdpbf16(a0, qv, k)
                        a8 = vdpbf16(a8, qw, k)
                        k = vload_raw(k_pool, o + d + c)
                        a1 = vdpbf16(a1, qv, k)
                        a9 = vdpbf16(a9, qw, k)
                        k = vload_raw(k_pool, o + 2 * d + c)
                        a2 = vdpbf16(a2, qv, k)
                        a10 = vdpbf16(a10, qw, k)
                        k = vload_raw(k_pool, o + 3 * d + c)
                        a3 = vdpbf16(a3, qv, k)
                        a11 = vdpbf16(a11, qw, k)
                        k = vload_raw(k_pool, o + 4 * d + c)
                        a4 = vdpbf16(a4, qv, k)
                        a12 = vdpbf16(a12, qw, k)
                        k = vload_raw(k_pool, o + 5 * d + c)
                        a5 = vdpbf16(a5, qv, k)
                        a13 = vdpbf16(a13, qw, k)
                        k = vload_raw(k_pool, o + 6 * d + c)
                        a6 = vdpbf16(a6, qv, k)
                        a14 = vdpbf16(a14, qw, k)
                        k = vload_raw(k_pool, o + 7 * d + c)
                        a7 = vdpbf16(a7, qv, k)
                        a15 = vdpbf16(a15, qw, k)
                    sv = vmul(vsum16(a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11, a12, a13, a14, a15),
                              qscale)
                    vstore8(s, r * sw + t0 + t, sv, False)
                    vstore8(s, (r + 1) * sw + t0 + t, sv, True)
                    t += 8
                while t < n:
                    a = vzero()
                    b2 = vzero()
                    o = kb + t * d
                    for c in range(0, d, 32):
                        k = vload_raw(k_pool, o + c)
                        a = vdpbf16(a, vload(qs, qb + c // 2), k)
                        b2 = vdpbf16(b2, vload(qs, qb + d + c // 2), k)
                    s[r, t0 + t] = vhsum(a) * qscale
                    s[r + 1, t0 + t] = vhsum(b2) * qscale
                    t += 1
                r += 2
            while dq and r < n_rows:
                qb = r * d
                t = 0
                while t + 16 <= n:
                    if r == 0:
                        _prefetch_keys(k_pool, pf, t, 16, d, step)
                    a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = vzero()
                    a8 = a9 = a10 = a11 = a12 = a13 = a14 = a15 = vzero()
                    o = kb + t * d
                    for c in range(0, d, 32):
                        qv = vload(qs, qb + c // 2)
                        a0 = vdpbf16(a0, qv, vload_raw(k_pool, o + c))
                        a1 = vdpbf16(a1, qv, vload_raw(k_pool, o + d + c))
                        a2 = vdpbf16(a2, qv, vload_raw(k_pool, o + 2 * d + c))
                        a3 = vdpbf16(a3, qv, vload_raw(k_pool, o + 3 * d + c))
                        a4 = vdpbf16(a4, qv, vload_raw(k_pool, o + 4 * d + c))
                        a5 = vdpbf16(a5, qv, vload_raw(k_pool, o + 5 * d + c))
                        a6 = vdpbf16(a6, qv, vload_raw(k_pool, o + 6 * d + c))
                        a7 = vdpbf16(a7, qv, vload_raw(k_pool, o + 7 * d + c))
                        a8 = vdpbf16(a8, qv, vload_raw(k_pool, o + 8 * d + c))
                        a9 = vdpbf16(a9, qv, vload_raw(k_pool, o + 9 * d + c))
                        a10 = vdpbf16(a10, qv, vload_raw(k_pool, o + 10 * d + c))
                        a11 = vdpbf16(a11, qv, vload_raw(k_pool, o + 11 * d + c))
                        a12 = vdpbf16(a12, qv, vload_raw(k_pool, o + 12 * d + c))
                        a13 = vdpbf16(a13, qv, vload_raw(k_pool, o + 13 * d + c))
                        a14 = vdpbf16(a14, qv, vload_raw(k_pool, o + 14 * d + c))
                        a15 = vdpbf16(a15, qv, vload_raw(k_pool, o + 15 * d + c))
                    vstore(s, r * sw + t0 + t, vmul(vsum16(a0, a1, a2, a3, a4, a5, a6, a7,
                                                            a8, a9, a10, a11, a12, a13, a14, a15), qscale))
                    t += 16
                while t < n:
                    a = vzero()
                    o = kb + t * d
                    for c in range(0, d, 32):
                        a = vdpbf16(a, vload(qs, qb + c // 2), vload_raw(k_pool, o + c))
                    s[r, t0 + t] = vhsum(a) * qscale
                    t += 1
                r += 1
            if direct and not dq:
                t = 0
                while t + 16 <= n:
                    _prefetch_keys(k_pool, pf, t, 16, d, step)
                    a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = vzero()
                    a8 = a9 = a10 = a11 = a12 = a13 = a14 = a15 = vzero()
                    o = kb + t * d
                    for c in range(0, d, 16):
                        qv = vload(qs, c)
                        a0 = vfma(qv, _ld(k_pool, o + c, bf16), a0)
                        a1 = vfma(qv, _ld(k_pool, o + d + c, bf16), a1)
                        a2 = vfma(qv, _ld(k_pool, o + 2 * d + c, bf16), a2)
                        a3 = vfma(qv, _ld(k_pool, o + 3 * d + c, bf16), a3)
                        a4 = vfma(qv, _ld(k_pool, o + 4 * d + c, bf16), a4)
                        a5 = vfma(qv, _ld(k_pool, o + 5 * d + c, bf16), a5)
                        a6 = vfma(qv, _ld(k_pool, o + 6 * d + c, bf16), a6)
                        a7 = vfma(qv, _ld(k_pool, o + 7 * d + c, bf16), a7)
                        a8 = vfma(qv, _ld(k_pool, o + 8 * d + c, bf16), a8)
                        a9 = vfma(qv, _ld(k_pool, o + 9 * d + c, bf16), a9)
                        a10 = vfma(qv, _ld(k_pool, o + 10 * d + c, bf16), a10)
                        a11 = vfma(qv, _ld(k_pool, o + 11 * d + c, bf16), a11)
                        a12 = vfma(qv, _ld(k_pool, o + 12 * d + c, bf16), a12)
                        a13 = vfma(qv, _ld(k_pool, o + 13 * d + c, bf16), a13)
                        a14 = vfma(qv, _ld(k_pool, o + 14 * d + c, bf16), a14)
                        a15 = vfma(qv, _ld(k_pool, o + 15 * d + c, bf16), a15)
                    vstore(s, t0 + t, vsum16(a0, a1, a2, a3, a4, a5, a6, a7,
                                             a8, a9, a10, a11, a12, a13, a14, a15))
                    t += 16
                while t < n:
                    a = vzero()
                    o = kb + t * d
                    for c in range(0, d, 16):
                        a = vfma(vload(qs, c), _ld(k_pool, o + c, bf16), a)
                    s[0, t0 + t] = vhsum(a)
                    t += 1
                r = n_rows
            # Four rows x 4 keys (K read in place or from the widened chunk): each K line is
            # read once for four rows, where row pairs read the chunk again per pair.
            while r + 4 <= n_rows:
                qb = r * d
                t = 0
                while t + 4 <= n:
                    if r == 0:
                        _prefetch_keys(k_pool, pf, t, 4, d, step)
                    a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = vzero()
                    a8 = a9 = a10 = a11 = a12 = a13 = a14 = a15 = vzero()
                    o = kb + t * d
                    for c in range(0, d, 16):
                        q0 = vload(qs, qb + c)
                        q1 = vload(qs, qb + d + c)
                        q2 = vload(qs, qb + 2 * d + c)
                        q3 = vload(qs, qb + 3 * d + c)
                        k = vload(ks, o + c)
                        a0 = vfma(q0, k, a0)
                        a4 = vfma(q1, k, a4)
                        a8 = vfma(q2, k, a8)
                        a12 = vfma(q3, k, a12)
                        k = vload(ks, o + d + c)
                        a1 = vfma(q0, k, a1)
                        a5 = vfma(q1, k, a5)
                        a9 = vfma(q2, k, a9)
                        a13 = vfma(q3, k, a13)
                        k = vload(ks, o + 2 * d + c)
                        a2 = vfma(q0, k, a2)
                        a6 = vfma(q1, k, a6)
                        a10 = vfma(q2, k, a10)
                        a14 = vfma(q3, k, a14)
                        k = vload(ks, o + 3 * d + c)
                        a3 = vfma(q0, k, a3)
                        a7 = vfma(q1, k, a7)
                        a11 = vfma(q2, k, a11)
                        a15 = vfma(q3, k, a15)
                    # Lane 4j + kk: row r + j, key t + kk.
                    sv = vsum16(a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11, a12, a13, a14, a15)
                    vstore4(s, r * sw + t0 + t, sv, 0)
                    vstore4(s, (r + 1) * sw + t0 + t, sv, 1)
                    vstore4(s, (r + 2) * sw + t0 + t, sv, 2)
                    vstore4(s, (r + 3) * sw + t0 + t, sv, 3)
                    t += 4
                while t < n:
                    a0 = a1 = a2 = a3 = vzero()
                    o = kb + t * d
                    for c in range(0, d, 16):
                        k = vload(ks, o + c)
                        a0 = vfma(vload(qs, qb + c), k, a0)
                        a1 = vfma(vload(qs, qb + d + c), k, a1)
                        a2 = vfma(vload(qs, qb + 2 * d + c), k, a2)
                        a3 = vfma(vload(qs, qb + 3 * d + c), k, a3)
                    s[r, t0 + t] = vhsum(a0)
                    s[r + 1, t0 + t] = vhsum(a1)
                    s[r + 2, t0 + t] = vhsum(a2)
                    s[r + 3, t0 + t] = vhsum(a3)
                    t += 1
                r += 4
            if r + 3 == n_rows:  # three rows left (groups 3 and 7): as above, 12 accumulators
                qb = r * d
                t = 0
                while t + 4 <= n:
                    if r == 0:
                        _prefetch_keys(k_pool, pf, t, 4, d, step)
                    a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = vzero()
                    a8 = a9 = a10 = a11 = vzero()
                    o = kb + t * d
                    for c in range(0, d, 16):
                        q0 = vload(qs, qb + c)
                        q1 = vload(qs, qb + d + c)
                        q2 = vload(qs, qb + 2 * d + c)
                        k = vload(ks, o + c)
                        a0 = vfma(q0, k, a0)
                        a4 = vfma(q1, k, a4)
                        a8 = vfma(q2, k, a8)
                        k = vload(ks, o + d + c)
                        a1 = vfma(q0, k, a1)
                        a5 = vfma(q1, k, a5)
                        a9 = vfma(q2, k, a9)
                        k = vload(ks, o + 2 * d + c)
                        a2 = vfma(q0, k, a2)
                        a6 = vfma(q1, k, a6)
                        a10 = vfma(q2, k, a10)
                        k = vload(ks, o + 3 * d + c)
                        a3 = vfma(q0, k, a3)
                        a7 = vfma(q1, k, a7)
                        a11 = vfma(q2, k, a11)
                    z = vzero()
                    sv = vsum16(a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11, z, z, z, z)
                    vstore4(s, r * sw + t0 + t, sv, 0)
                    vstore4(s, (r + 1) * sw + t0 + t, sv, 1)
                    vstore4(s, (r + 2) * sw + t0 + t, sv, 2)
                    t += 4
                while t < n:
                    a0 = a1 = a2 = vzero()
                    o = kb + t * d
                    for c in range(0, d, 16):
                        k = vload(ks, o + c)
                        a0 = vfma(vload(qs, qb + c), k, a0)
                        a1 = vfma(vload(qs, qb + d + c), k, a1)
                        a2 = vfma(vload(qs, qb + 2 * d + c), k, a2)
                    s[r, t0 + t] = vhsum(a0)
                    s[r + 1, t0 + t] = vhsum(a1)
                    s[r + 2, t0 + t] = vhsum(a2)
                    t += 1
                r += 3
            while r + 2 <= n_rows:
                qb = r * d
                t = 0
                while t + 8 <= n:
                    if r == 0:
                        _prefetch_keys(k_pool, pf, t, 8, d, step)
                    a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = vzero()
                    a8 = a9 = a10 = a11 = a12 = a13 = a14 = a15 = vzero()
                    o = kb + t * d
                    for c in range(0, d, 16):
                        qv = vload(qs, qb + c)
                        qw = vload(qs, qb + d + c)
                        k = vload(ks, o + c)
                        a0 = vfma(qv, k, a0)
                        a8 = vfma(qw, k, a8)
                        k = vload(ks, o + d + c)
                        a1 = vfma(qv, k, a1)
                        a9 = vfma(qw, k, a9)
                        k = vload(ks, o + 2 * d + c)
                        a2 = vfma(qv, k, a2)
                        a10 = vfma(qw, k, a10)
                        k = vload(ks, o + 3 * d + c)
                        a3 = vfma(qv, k, a3)
                        a11 = vfma(qw, k, a11)
                        k = vload(ks, o + 4 * d + c)
                        a4 = vfma(qv, k, a4)
                        a12 = vfma(qw, k, a12)
                        k = vload(ks, o + 5 * d + c)
                        a5 = vfma(qv, k, a5)
                        a13 = vfma(qw, k, a13)
                        k = vload(ks, o + 6 * d + c)
                        a6 = vfma(qv, k, a6)
                        a14 = vfma(qw, k, a14)
                        k = vload(ks, o + 7 * d + c)
                        a7 = vfma(qv, k, a7)
                        a15 = vfma(qw, k, a15)
                    sv = vsum16(a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11, a12, a13, a14, a15)
                    vstore8(s, r * sw + t0 + t, sv, False)
                    vstore8(s, (r + 1) * sw + t0 + t, sv, True)
                    t += 8
                while t < n:
                    a = vzero()
                    b2 = vzero()
                    o = kb + t * d
                    for c in range(0, d, 16):
                        k = vload(ks, o + c)
                        a = vfma(vload(qs, qb + c), k, a)
                        b2 = vfma(vload(qs, qb + d + c), k, b2)
                    s[r, t0 + t] = vhsum(a)
                    s[r + 1, t0 + t] = vhsum(b2)
                    t += 1
                r += 2
            while r < n_rows:
                qb = r * d
                t = 0
                while t + 16 <= n:
                    if r == 0:
                        _prefetch_keys(k_pool, pf, t, 16, d, step)
                    a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = vzero()
                    a8 = a9 = a10 = a11 = a12 = a13 = a14 = a15 = vzero()
                    o = kb + t * d
                    for c in range(0, d, 16):
                        qv = vload(qs, qb + c)
                        a0 = vfma(qv, vload(ks, o + c), a0)
                        a1 = vfma(qv, vload(ks, o + d + c), a1)
                        a2 = vfma(qv, vload(ks, o + 2 * d + c), a2)
                        a3 = vfma(qv, vload(ks, o + 3 * d + c), a3)
                        a4 = vfma(qv, vload(ks, o + 4 * d + c), a4)
                        a5 = vfma(qv, vload(ks, o + 5 * d + c), a5)
                        a6 = vfma(qv, vload(ks, o + 6 * d + c), a6)
                        a7 = vfma(qv, vload(ks, o + 7 * d + c), a7)
                        a8 = vfma(qv, vload(ks, o + 8 * d + c), a8)
                        a9 = vfma(qv, vload(ks, o + 9 * d + c), a9)
                        a10 = vfma(qv, vload(ks, o + 10 * d + c), a10)
                        a11 = vfma(qv, vload(ks, o + 11 * d + c), a11)
                        a12 = vfma(qv, vload(ks, o + 12 * d + c), a12)
                        a13 = vfma(qv, vload(ks, o + 13 * d + c), a13)
                        a14 = vfma(qv, vload(ks, o + 14 * d + c), a14)
                        a15 = vfma(qv, vload(ks, o + 15 * d + c), a15)
                    vstore(s, r * sw + t0 + t, vsum16(a0, a1, a2, a3, a4, a5, a6, a7,
                                                       a8, a9, a10, a11, a12, a13, a14, a15))
                    t += 16
                while t < n:
                    a = vzero()
                    o = kb + t * d
                    for c in range(0, d, 16):
                        a = vfma(vload(qs, qb + c), vload(ks, o + c), a)
                    s[r, t0 + t] = vhsum(a)
                    t += 1
                r += 1

            # Online softmax: scores become probabilities (0 past a row's causal
            # limit); m, l and acc are rescaled when the running max moves.
            whole = n == CHUNK and lim_min - base >= t1
            if whole:
                # A whole chunk every row sees (all of decode but the tail): one vector per
                # row, no causal bookkeeping, the max's fold and the rescale only when a
                # score exceeds the running max (measured G8 D64: ~2.5 ns of ~31 per key).
                for r in range(n_rows):
                    o = r * sw + t0
                    sv = vload(s, o)
                    mx = m[r]
                    if vany_gt(sv, mx):
                        mr = mx
                        mx = max(mr, vhmax(sv))
                        alpha = exp_nonpos(mr - mx)
                        m[r] = mx
                        l[r] *= alpha
                        vstore(l, lv0 + 16 * r, vmul(vload(l, lv0 + 16 * r), alpha))
                        for x in range(0, d, 16):
                            vstore(acc, r * d + x, vmul(vload(acc, r * d + x), alpha))
                    pv = vexp_nonpos(vsub(sv, mx))
                    vstore(s, o, pv)
                    vstore(l, lv0 + 16 * r, vadd(vload(l, lv0 + 16 * r), pv))
            for r in range(0 if whole else n_rows):
                te = max(min(t1, row_lim[r] - base), t0)
                for t in range(te, t1):
                    s[r, t] = 0.0
                if te == t0:
                    continue
                mx = m[r]
                vec = (te - t0) % 16 == 0  # whole 16-key chunks: every block but a diagonal or tail
                if vec:
                    # The horizontal max (an fmax reduction) only when a score exceeds the
                    # running max: once it has settled, a compare and a mask test per row
                    # and block (measured 0.73-0.85x the time per key at D64).
                    for t in range(t0, te, 16):
                        sv = vload(s, r * sw + t)
                        if vany_gt(sv, mx):
                            mx = max(mx, vhmax(sv))
                else:
                    for t in range(t0, te):
                        mx = max(mx, s[r, t])
                # Once the max has settled it stops moving: skip the scalar exp (a
                # long dependency chain) and the rescale. ~0 on the first block.
                alpha = np.float32(1.0) if mx == m[r] else exp_nonpos(m[r] - mx)
                psum = np.float32(0.0)
                if vec:
                    for t in range(t0, te, 16):
                        pv = vexp_nonpos(vsub(vload(s, r * sw + t), mx))
                        vstore(s, r * sw + t, pv)
                        psum += vhsum(pv)
                else:
                    for t in range(t0, te):
                        p = exp_nonpos(s[r, t] - mx)
                        s[r, t] = p
                        psum += p
                l[r] = l[r] * alpha + psum
                m[r] = mx
                if alpha != 1.0:
                    vstore(l, lv0 + 16 * r, vmul(vload(l, lv0 + 16 * r), alpha))
                    for x in range(0, d, 16):
                        vstore(acc, r * d + x, vmul(vload(acc, r * d + x), alpha))

            # PV: acc[r] += sum_t p[r, t] V[t]. Rows in pairs, 64 columns of each in
            # registers: each V load feeds two FMAs and the 8 accumulator chains keep
            # both FMA ports busy (4 chains of one row wait on the FMA latency).
            r = 0
            if direct:
                c = 0
                while c + 64 <= d:
                    x0 = vload(acc, c)
                    x1 = vload(acc, c + 16)
                    x2 = vload(acc, c + 32)
                    x3 = vload(acc, c + 48)
                    for t in range(n):
                        if c == 0:
                            _prefetch_keys(v_pool, pf, t, 1, d, step)
                        pt = s[0, t0 + t]
                        v = row0 + t * d + c
                        x0 = vfma(_ld(v_pool, v, bf16), pt, x0)
                        x1 = vfma(_ld(v_pool, v + 16, bf16), pt, x1)
                        x2 = vfma(_ld(v_pool, v + 32, bf16), pt, x2)
                        x3 = vfma(_ld(v_pool, v + 48, bf16), pt, x3)
                    vstore(acc, c, x0)
                    vstore(acc, c + 16, x1)
                    vstore(acc, c + 32, x2)
                    vstore(acc, c + 48, x3)
                    c += 64
                while c < d:
                    x0 = vload(acc, c)
                    for t in range(n):
                        if c == 0:
                            _prefetch_keys(v_pool, pf, t, 1, d, step)
                        x0 = vfma(_ld(v_pool, row0 + t * d + c, bf16), s[0, t0 + t], x0)
                    vstore(acc, c, x0)
                    c += 16
                r = n_rows
            vb = row0 if in_place else 0
            # Up to two blocks of four bfloat16 rows (decode at groups 3-4 and 7-8) read V
            # in place, widened in registers (even/odd, as staged) once per block: cheaper
            # than staging's store and reload (one thread, ns per key in cache / from
            # DRAM: G3 D64 16.3 / 24.7 -> 15.0 / 23.9, G4 D128 29.6 / 49.1 -> 25.7 / 46.9,
            # G8 D64 24.5 / 34.0 -> 24.0 / 32.4, G8 D128 44.4 / 61.6 -> 41.7 / 59.9). Larger
            # (prefill) tiles would widen each vector once per block of rows: staged.
            vdirect = eo and n_rows % 4 == 0 and n_rows <= VDIRECT_MAX
            # float16 likewise (vcvtph2ps from memory, two µops) for one block of four rows
            # (one thread, from DRAM: G3 D64 26.4 -> 24.8, G4 D128 46.2 -> 45.2 ns per key;
            # at 8 rows even or slower: G8 D64 35.8 -> 36.0).
            # Only the specialised bodies (head_dim 64, 128: whole 64-column passes).
            hdirect = QUADS and not (eo or bf16 or in_place) and n_rows == 4
            # float16 at 8 rows: the rows x 32 columns at once (16 accumulators), each V
            # vector converted once for all eight (the 4-row blocks would convert it twice):
            # one thread, in cache, G8 D64 24.6 -> 24.0, G7 D128 (as 8) 43.3 -> 41.7 ns per key;
            # from DRAM 33.9 -> 33.2, 62.5 -> 61.6. (bfloat16 the same way: from DRAM slower.)
            hdirect8 = QUADS and not (eo or bf16 or in_place) and n_rows == 8
            if not (direct or in_place or vdirect or hdirect or hdirect8):  # staging, as K's
                if eo:
                    for x in range(0, n * d, 32):
                        vstore(vw, x, vload_bf16_eo(v_pool, row0 + x, False))
                        vstore(vw, x + 16, vload_bf16_eo(v_pool, row0 + x, True))
                elif bf16:
                    for x in range(0, n * d, 16):
                        vstore(vw, x, vload_bf16(v_pool, row0 + x))
                else:
                    for x in range(0, n * d, 16):
                        vstore(vw, x, vload(v_pool, row0 + x))
            # Rows in fours (16 accumulators): each V load feeds four FMAs, so the loads
            # (V and the broadcast probabilities) stay under the FMAs and 16 chains hide
            # the FMA latency.
            if hdirect8:
                for c in range(0, d, 32):
                    x0 = vload(acc, c)
                    x1 = vload(acc, c + 16)
                    y0 = vload(acc, d + c)
                    y1 = vload(acc, d + c + 16)
                    z0 = vload(acc, 2 * d + c)
                    z1 = vload(acc, 2 * d + c + 16)
                    u0 = vload(acc, 3 * d + c)
                    u1 = vload(acc, 3 * d + c + 16)
                    x2 = vload(acc, 4 * d + c)
                    x3 = vload(acc, 4 * d + c + 16)
                    y2 = vload(acc, 5 * d + c)
                    y3 = vload(acc, 5 * d + c + 16)
                    z2 = vload(acc, 6 * d + c)
                    z3 = vload(acc, 6 * d + c + 16)
                    u2 = vload(acc, 7 * d + c)
                    u3 = vload(acc, 7 * d + c + 16)
                    for t in range(n):
                        if pf >= 0:  # the next rows' 32 dims of this pass: one line a key
                            prefetch(v_pool, pf + t * d + c)
                        v = row0 + t * d + c
                        w = vload(v_pool, v)
                        wo = vload(v_pool, v + 16)
                        p = s[0, t0 + t]
                        x0 = vfma(w, p, x0)
                        x1 = vfma(wo, p, x1)
                        p = s[1, t0 + t]
                        y0 = vfma(w, p, y0)
                        y1 = vfma(wo, p, y1)
                        p = s[2, t0 + t]
                        z0 = vfma(w, p, z0)
                        z1 = vfma(wo, p, z1)
                        p = s[3, t0 + t]
                        u0 = vfma(w, p, u0)
                        u1 = vfma(wo, p, u1)
                        p = s[4, t0 + t]
                        x2 = vfma(w, p, x2)
                        x3 = vfma(wo, p, x3)
                        p = s[5, t0 + t]
                        y2 = vfma(w, p, y2)
                        y3 = vfma(wo, p, y3)
                        p = s[6, t0 + t]
                        z2 = vfma(w, p, z2)
                        z3 = vfma(wo, p, z3)
                        p = s[7, t0 + t]
                        u2 = vfma(w, p, u2)
                        u3 = vfma(wo, p, u3)
                    vstore(acc, c, x0)
                    vstore(acc, c + 16, x1)
                    vstore(acc, d + c, y0)
                    vstore(acc, d + c + 16, y1)
                    vstore(acc, 2 * d + c, z0)
                    vstore(acc, 2 * d + c + 16, z1)
                    vstore(acc, 3 * d + c, u0)
                    vstore(acc, 3 * d + c + 16, u1)
                    vstore(acc, 4 * d + c, x2)
                    vstore(acc, 4 * d + c + 16, x3)
                    vstore(acc, 5 * d + c, y2)
                    vstore(acc, 5 * d + c + 16, y3)
                    vstore(acc, 6 * d + c, z2)
                    vstore(acc, 6 * d + c + 16, z3)
                    vstore(acc, 7 * d + c, u2)
                    vstore(acc, 7 * d + c + 16, u3)
                r = 8
            while vdirect and r + 4 <= n_rows:
                c = 0
                while c + 64 <= d:
                    o = r * d + c
                    x0 = vload(acc, o)
                    x1 = vload(acc, o + 16)
                    x2 = vload(acc, o + 32)
                    x3 = vload(acc, o + 48)
                    y0 = vload(acc, o + d)
                    y1 = vload(acc, o + d + 16)
                    y2 = vload(acc, o + d + 32)
                    y3 = vload(acc, o + d + 48)
                    z0 = vload(acc, o + 2 * d)
                    z1 = vload(acc, o + 2 * d + 16)
                    z2 = vload(acc, o + 2 * d + 32)
                    z3 = vload(acc, o + 2 * d + 48)
                    u0 = vload(acc, o + 3 * d)
                    u1 = vload(acc, o + 3 * d + 16)
                    u2 = vload(acc, o + 3 * d + 32)
                    u3 = vload(acc, o + 3 * d + 48)
                    for t in range(n):
                        if r == 0 and pf >= 0:  # V as K in the quads: 64 elements a pass
                            po = pf + t * d + c
                            while po < pf + t * d + c + 64:
                                prefetch(v_pool, po)
                                po += step
                        pt = s[r, t0 + t]
                        pu = s[r + 1, t0 + t]
                        pw = s[r + 2, t0 + t]
                        pz = s[r + 3, t0 + t]
                        v = row0 + t * d + c
                        w = vload_bf16_eo(v_pool, v, False)
                        x0 = vfma(w, pt, x0)
                        y0 = vfma(w, pu, y0)
                        z0 = vfma(w, pw, z0)
                        u0 = vfma(w, pz, u0)
                        w = vload_bf16_eo(v_pool, v, True)
                        x1 = vfma(w, pt, x1)
                        y1 = vfma(w, pu, y1)
                        z1 = vfma(w, pw, z1)
                        u1 = vfma(w, pz, u1)
                        w = vload_bf16_eo(v_pool, v + 32, False)
                        x2 = vfma(w, pt, x2)
                        y2 = vfma(w, pu, y2)
                        z2 = vfma(w, pw, z2)
                        u2 = vfma(w, pz, u2)
                        w = vload_bf16_eo(v_pool, v + 32, True)
                        x3 = vfma(w, pt, x3)
                        y3 = vfma(w, pu, y3)
                        z3 = vfma(w, pw, z3)
                        u3 = vfma(w, pz, u3)
                    vstore(acc, o, x0)
                    vstore(acc, o + 16, x1)
                    vstore(acc, o + 32, x2)
                    vstore(acc, o + 48, x3)
                    vstore(acc, o + d, y0)
                    vstore(acc, o + d + 16, y1)
                    vstore(acc, o + d + 32, y2)
                    vstore(acc, o + d + 48, y3)
                    vstore(acc, o + 2 * d, z0)
                    vstore(acc, o + 2 * d + 16, z1)
                    vstore(acc, o + 2 * d + 32, z2)
                    vstore(acc, o + 2 * d + 48, z3)
                    vstore(acc, o + 3 * d, u0)
                    vstore(acc, o + 3 * d + 16, u1)
                    vstore(acc, o + 3 * d + 32, u2)
                    vstore(acc, o + 3 * d + 48, u3)
                    c += 64
                r += 4
            while hdirect and r + 4 <= n_rows:
                c = 0
                while c + 64 <= d:
                    o = r * d + c
                    x0 = vload(acc, o)
                    x1 = vload(acc, o + 16)
                    x2 = vload(acc, o + 32)
                    x3 = vload(acc, o + 48)
                    y0 = vload(acc, o + d)
                    y1 = vload(acc, o + d + 16)
                    y2 = vload(acc, o + d + 32)
                    y3 = vload(acc, o + d + 48)
                    z0 = vload(acc, o + 2 * d)
                    z1 = vload(acc, o + 2 * d + 16)
                    z2 = vload(acc, o + 2 * d + 32)
                    z3 = vload(acc, o + 2 * d + 48)
                    u0 = vload(acc, o + 3 * d)
                    u1 = vload(acc, o + 3 * d + 16)
                    u2 = vload(acc, o + 3 * d + 32)
                    u3 = vload(acc, o + 3 * d + 48)
                    for t in range(n):
                        if r == 0 and pf >= 0:  # V as K in the quads: 64 elements a pass
                            po = pf + t * d + c
                            while po < pf + t * d + c + 64:
                                prefetch(v_pool, po)
                                po += step
                        pt = s[r, t0 + t]
                        pu = s[r + 1, t0 + t]
                        pw = s[r + 2, t0 + t]
                        pz = s[r + 3, t0 + t]
                        v = row0 + t * d + c
                        w = vload(v_pool, v)
                        x0 = vfma(w, pt, x0)
                        y0 = vfma(w, pu, y0)
                        z0 = vfma(w, pw, z0)
                        u0 = vfma(w, pz, u0)
                        w = vload(v_pool, v + 16)
                        x1 = vfma(w, pt, x1)
                        y1 = vfma(w, pu, y1)
                        z1 = vfma(w, pw, z1)
                        u1 = vfma(w, pz, u1)
                        w = vload(v_pool, v + 32)
                        x2 = vfma(w, pt, x2)
                        y2 = vfma(w, pu, y2)
                        z2 = vfma(w, pw, z2)
                        u2 = vfma(w, pz, u2)
                        w = vload(v_pool, v + 48)
                        x3 = vfma(w, pt, x3)
                        y3 = vfma(w, pu, y3)
                        z3 = vfma(w, pw, z3)
                        u3 = vfma(w, pz, u3)
                    vstore(acc, o, x0)
                    vstore(acc, o + 16, x1)
                    vstore(acc, o + 32, x2)
                    vstore(acc, o + 48, x3)
                    vstore(acc, o + d, y0)
                    vstore(acc, o + d + 16, y1)
                    vstore(acc, o + d + 32, y2)
                    vstore(acc, o + d + 48, y3)
                    vstore(acc, o + 2 * d, z0)
                    vstore(acc, o + 2 * d + 16, z1)
                    vstore(acc, o + 2 * d + 32, z2)
                    vstore(acc, o + 2 * d + 48, z3)
                    vstore(acc, o + 3 * d, u0)
                    vstore(acc, o + 3 * d + 16, u1)
                    vstore(acc, o + 3 * d + 32, u2)
                    vstore(acc, o + 3 * d + 48, u3)
                    c += 64
                r += 4
            while r + 4 <= n_rows:
                c = 0
                while c + 64 <= d:
                    o = r * d + c
                    x0 = vload(acc, o)
                    x1 = vload(acc, o + 16)
                    x2 = vload(acc, o + 32)
                    x3 = vload(acc, o + 48)
                    y0 = vload(acc, o + d)
                    y1 = vload(acc, o + d + 16)
                    y2 = vload(acc, o + d + 32)
                    y3 = vload(acc, o + d + 48)
                    z0 = vload(acc, o + 2 * d)
                    z1 = vload(acc, o + 2 * d + 16)
                    z2 = vload(acc, o + 2 * d + 32)
                    z3 = vload(acc, o + 2 * d + 48)
                    u0 = vload(acc, o + 3 * d)
                    u1 = vload(acc, o + 3 * d + 16)
                    u2 = vload(acc, o + 3 * d + 32)
                    u3 = vload(acc, o + 3 * d + 48)
                    for t in range(n):
                        if r == 0 and pf >= 0:  # V as K in the quads: 64 elements a pass
                            po = pf + t * d + c
                            while po < pf + t * d + c + 64:
                                prefetch(v_pool, po)
                                po += step
                        pt = s[r, t0 + t]
                        pu = s[r + 1, t0 + t]
                        pw = s[r + 2, t0 + t]
                        pz = s[r + 3, t0 + t]
                        v = vb + t * d + c
                        w = vload(vs, v)
                        x0 = vfma(w, pt, x0)
                        y0 = vfma(w, pu, y0)
                        z0 = vfma(w, pw, z0)
                        u0 = vfma(w, pz, u0)
                        w = vload(vs, v + 16)
                        x1 = vfma(w, pt, x1)
                        y1 = vfma(w, pu, y1)
                        z1 = vfma(w, pw, z1)
                        u1 = vfma(w, pz, u1)
                        w = vload(vs, v + 32)
                        x2 = vfma(w, pt, x2)
                        y2 = vfma(w, pu, y2)
                        z2 = vfma(w, pw, z2)
                        u2 = vfma(w, pz, u2)
                        w = vload(vs, v + 48)
                        x3 = vfma(w, pt, x3)
                        y3 = vfma(w, pu, y3)
                        z3 = vfma(w, pw, z3)
                        u3 = vfma(w, pz, u3)
                    vstore(acc, o, x0)
                    vstore(acc, o + 16, x1)
                    vstore(acc, o + 32, x2)
                    vstore(acc, o + 48, x3)
                    vstore(acc, o + d, y0)
                    vstore(acc, o + d + 16, y1)
                    vstore(acc, o + d + 32, y2)
                    vstore(acc, o + d + 48, y3)
                    vstore(acc, o + 2 * d, z0)
                    vstore(acc, o + 2 * d + 16, z1)
                    vstore(acc, o + 2 * d + 32, z2)
                    vstore(acc, o + 2 * d + 48, z3)
                    vstore(acc, o + 3 * d, u0)
                    vstore(acc, o + 3 * d + 16, u1)
                    vstore(acc, o + 3 * d + 32, u2)
                    vstore(acc, o + 3 * d + 48, u3)
                    c += 64
                while c < d:
                    o = r * d + c
                    x0 = vload(acc, o)
                    y0 = vload(acc, o + d)
                    z0 = vload(acc, o + 2 * d)
                    u0 = vload(acc, o + 3 * d)
                    for t in range(n):
                        if r == 0 and c == 0:
                            _prefetch_keys(v_pool, pf, t, 1, d, step)
                        w = vload(vs, vb + t * d + c)
                        x0 = vfma(w, s[r, t0 + t], x0)
                        y0 = vfma(w, s[r + 1, t0 + t], y0)
                        z0 = vfma(w, s[r + 2, t0 + t], z0)
                        u0 = vfma(w, s[r + 3, t0 + t], u0)
                    vstore(acc, o, x0)
                    vstore(acc, o + d, y0)
                    vstore(acc, o + 2 * d, z0)
                    vstore(acc, o + 3 * d, u0)
                    c += 16
                r += 4
            while r + 2 <= n_rows:
                c = 0
                while c + 64 <= d:
                    o = r * d + c
                    x0 = vload(acc, o)
                    x1 = vload(acc, o + 16)
                    x2 = vload(acc, o + 32)
                    x3 = vload(acc, o + 48)
                    y0 = vload(acc, o + d)
                    y1 = vload(acc, o + d + 16)
                    y2 = vload(acc, o + d + 32)
                    y3 = vload(acc, o + d + 48)
                    for t in range(n):
                        if r == 0 and c == 0:
                            _prefetch_keys(v_pool, pf, t, 1, d, step)
                        pt = s[r, t0 + t]
                        pu = s[r + 1, t0 + t]
                        v = vb + t * d + c
                        w = vload(vs, v)
                        x0 = vfma(w, pt, x0)
                        y0 = vfma(w, pu, y0)
                        w = vload(vs, v + 16)
                        x1 = vfma(w, pt, x1)
                        y1 = vfma(w, pu, y1)
                        w = vload(vs, v + 32)
                        x2 = vfma(w, pt, x2)
                        y2 = vfma(w, pu, y2)
                        w = vload(vs, v + 48)
                        x3 = vfma(w, pt, x3)
                        y3 = vfma(w, pu, y3)
                    vstore(acc, o, x0)
                    vstore(acc, o + 16, x1)
                    vstore(acc, o + 32, x2)
                    vstore(acc, o + 48, x3)
                    vstore(acc, o + d, y0)
                    vstore(acc, o + d + 16, y1)
                    vstore(acc, o + d + 32, y2)
                    vstore(acc, o + d + 48, y3)
                    c += 64
                while c < d:
                    o = r * d + c
                    x0 = vload(acc, o)
                    y0 = vload(acc, o + d)
                    for t in range(n):
                        if r == 0 and c == 0:
                            _prefetch_keys(v_pool, pf, t, 1, d, step)
                        w = vload(vs, vb + t * d + c)
                        x0 = vfma(w, s[r, t0 + t], x0)
                        y0 = vfma(w, s[r + 1, t0 + t], y0)
                    vstore(acc, o, x0)
                    vstore(acc, o + d, y0)
                    c += 16
                r += 2
            while r < n_rows:
                c = 0
                while c + 64 <= d:
                    o = r * d + c
                    x0 = vload(acc, o)
                    x1 = vload(acc, o + 16)
                    x2 = vload(acc, o + 32)
                    x3 = vload(acc, o + 48)
                    for t in range(n):
                        if r == 0 and c == 0:
                            _prefetch_keys(v_pool, pf, t, 1, d, step)
                        pt = s[r, t0 + t]
                        v = vb + t * d + c
                        x0 = vfma(vload(vs, v), pt, x0)
                        x1 = vfma(vload(vs, v + 16), pt, x1)
                        x2 = vfma(vload(vs, v + 32), pt, x2)
                        x3 = vfma(vload(vs, v + 48), pt, x3)
                    vstore(acc, o, x0)
                    vstore(acc, o + 16, x1)
                    vstore(acc, o + 32, x2)
                    vstore(acc, o + 48, x3)
                    c += 64
                while c < d:
                    o = r * d + c
                    x0 = vload(acc, o)
                    for t in range(n):
                        if r == 0 and c == 0:
                            _prefetch_keys(v_pool, pf, t, 1, d, step)
                        x0 = vfma(vload(vs, vb + t * d + c), s[r, t0 + t], x0)
                    vstore(acc, o, x0)
                    c += 16
                r += 1
            if t1 >= t_end:  # the block is done: the next one starts at its first key
                b += 1
                t0 = 0
            else:
                t0 = t1
        for r in range(n_rows):
            l[r] += vhsum(vload(l, lv0 + 16 * r))
        if eo:  # the accumulators and query rows back in dim order
            for r in range(n_rows):
                for x in range(r * d, (r + 1) * d, 32):
                    a = vload(acc, x)
                    b2 = vload(acc, x + 16)
                    vstore(acc, x, vinterleave(a, b2, False))
                    vstore(acc, x + 16, vinterleave(a, b2, True))
                    if eo_q:  # (raw query pairs were never reordered)
                        a = vload(qs, x)
                        b2 = vload(qs, x + 16)
                        vstore(qs, x, vinterleave(a, b2, False))
                        vstore(qs, x + 16, vinterleave(a, b2, True))

    return attend_rows


attend_rows_64 = make_attend_rows(64)
attend_rows_128 = make_attend_rows(128)
attend_rows_any = make_attend_rows(0)

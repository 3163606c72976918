"""CPU kernels against the pure-torch reference (DESIGN.md s4, s9).

Grid: storages x GQA ratio x block size, each case a ragged micro-batch mixing decode,
causal chunks (longer than one query tile), attend-only sequences, sequences that see
no token at all, and one long sequence that the planner splits across items.
"""

import numpy as np
import pytest
from kernel_calls import CPU_PATHS, LAYER, N_LAYERS, NUM_KV_HEADS, Call, D, assert_matches, enter_path
from numba import njit

from lamina_kernels import (STORAGES, append_attend, merge, storage_itemsize, to_storage,
                            warmup, widen)
from lamina_kernels import cpu, simd, widen16
from lamina_kernels.reference import append_attend_ref


@pytest.fixture(params=["inline", "threads"])
def kernel_path(request, monkeypatch):
    """Run append_attend on the calling thread alone, or over numba's threads (with
    split groups merged), whatever the call's size (cpu._INLINE_WORK decides otherwise)."""
    monkeypatch.setattr(cpu, "_INLINE_WORK", 1 << 62 if request.param == "inline" else -1)
    return request.param


@pytest.fixture
def storage(request):
    """A CPU_PATHS name (parametrized indirectly) -> its storage, with the dot-product flag
    set for the test (and restored after)."""
    name, old = enter_path(request.param)
    yield name
    simd.set_dpbf16(old)


MIXED = [
    (0, 1, True),      # first decode step
    (37, 1, True),     # decode
    (5, 19, True),     # causal chunk on top of a short context
    (0, 70, True),     # prefill longer than a query tile
    (40, 3, False),    # attend-only (a non-tail 'sequence' shard)
    (0, 2, False),     # attend-only on an empty shard: sees nothing
    (900, 1, True),    # long enough to be split across items
]


@pytest.mark.parametrize("storage", CPU_PATHS, indirect=True)
@pytest.mark.parametrize("g", [1, 4, 8])
@pytest.mark.parametrize("bs", [8, 16, 32])
def test_append_attend_matches_reference(storage, g, bs):
    rng = np.random.default_rng(hash((storage, g, bs)) % 2**32)
    order = rng.permutation(len(MIXED))  # ragged, in a different order per case
    call = Call(rng, storage, g, bs, [MIXED[i] for i in order])
    assert_matches(call.run(append_attend), call.run(append_attend_ref))


# Real checkpoints' (GQA group, head_dim): 32/32/128, SmolLM2 9/3/64, 32/8/128,
# Qwen2.5-7B 28/4/128, 32/4/64; head_dim 80 (phi-2) takes the generic vector path and
# 24 the scalar one. Group 1 decode reads a 16-bit pool in place (tiles._direct): both
# specialised head_dims. Groups 7 and 8 at both head_dims: whole 16-key chunks of 4+
# rows (16-bit) or 8+ rows (float32, head_dim 64) run QK on key quads (tiles._quads),
# with 4-row blocks and 1-3 leftover rows; float32 groups of 4 or more (and 16-bit partial
# chunks) run QK in 4-row x 4-key passes first, then pairs; group 5 at 80: 4-row PV blocks
# plus one row on the generic body. 16-bit tiles of 4k + 3 rows (groups 3 and 7, prefill tiles of 63
# rows) run with a zero fourth row (tiles._pad_row); bfloat16 at 64 and 128 is staged in
# even/odd dim order (tiles._eo), also on the row-pair path (group 2) and with one or
# two rows past the quads (groups 5 and 6). Where Numba's target lacks AVX-512 the quads, the padded row
# and the even/odd order are compiled out (simd.TARGET_AVX512) and the same cases run the plain tiles.
GEOMETRIES = [(1, 128), (1, 64), (3, 64), (4, 128), (7, 128), (8, 64), (7, 64), (8, 128), (5, 80),
              (2, 80), (3, 24), (2, 64), (5, 64), (6, 128)]


@pytest.mark.parametrize("storage", CPU_PATHS, indirect=True)
@pytest.mark.parametrize("g,d", GEOMETRIES)
def test_real_geometries_match_reference(storage, g, d, kernel_path):
    """Every tile path at real sizes: 16-key QK tiles and their tails, the diagonal
    block of a chunk (scalar softmax), query tiles of 64 // g positions, a split."""
    rng = np.random.default_rng(hash((storage, g, d, "geom")) % 2**32)
    order = rng.permutation(len(MIXED))
    call = Call(rng, storage, g, 16, [MIXED[i] for i in order], num_kv_heads=2, d=d)
    assert_matches(call.run(append_attend), call.run(append_attend_ref), atol=3e-5)


@pytest.mark.parametrize("storage", CPU_PATHS, indirect=True)
@pytest.mark.parametrize("g,d", [(3, 64), (1, 128), (8, 64), (7, 128)])
@pytest.mark.parametrize("bs", [8, 32, 64, 40])
def test_real_geometry_other_block_sizes(storage, g, d, bs, kernel_path):
    """Blocks smaller than one 16-key tile, and of several: a block is computed in
    16-key chunks (tiles.CHUNK), 40 ending on a partial one; splits start mid-pool."""
    rng = np.random.default_rng(hash((storage, g, d, bs, "bs")) % 2**32)
    call = Call(rng, storage, g, bs, MIXED, num_kv_heads=2, d=d)
    assert_matches(call.run(append_attend), call.run(append_attend_ref), atol=3e-5)


def test_preallocated_outputs_are_filled_and_returned():
    rng = np.random.default_rng(17)
    call = Call(rng, "float16", 4, 16, MIXED, num_kv_heads=2, d=64)
    want = call.run(append_attend)
    t = call.q.shape[0]
    out = np.full((t, 8, 64), np.nan, np.float32)
    lse = np.full((t, 8), np.nan, np.float32)
    got = call.run(lambda *a: append_attend(*a, out=out, lse=lse))
    assert got[0] is out and got[1] is lse
    assert_matches(got, want, atol=0)
    with pytest.raises(ValueError, match="out must have shape"):
        call.run(lambda *a: append_attend(*a, out=out[:-1], lse=lse))
    with pytest.raises(TypeError, match="lse must be"):
        call.run(lambda *a: append_attend(*a, out=out, lse=lse.astype(np.float64)))


@pytest.mark.parametrize("storage", CPU_PATHS, indirect=True)
@pytest.mark.parametrize("g,bs", [(3, 6), (2, 4), (5, 16)])
def test_remainder_rows_and_tokens(storage, g, bs, kernel_path):
    """GQA groups and query tiles that are not a multiple of the 4-row register tile,
    and blocks not a multiple of the 4-token tile: the 1-row and 1-token tails."""
    rng = np.random.default_rng(hash((storage, g, bs, "tails")) % 2**32)
    seqs = [(0, 1, True), (37, 1, True), (5, 7, True), (70, 3, False), (200, 1, True)]
    call = Call(rng, storage, g, bs, seqs)
    assert_matches(call.run(append_attend), call.run(append_attend_ref))


def test_one_thread_and_scratch_reuse():
    """Per-thread scratch: consecutive calls with different shapes, and one thread."""
    import numba

    rng = np.random.default_rng(21)
    calls = [Call(rng, "bfloat16", g, 8, MIXED) for g in (8, 1, 4)]
    n = numba.get_num_threads()
    try:
        for threads in (1, n):
            numba.set_num_threads(threads)
            for call in calls:
                assert_matches(call.run(append_attend), call.run(append_attend_ref))
    finally:
        numba.set_num_threads(n)


@pytest.mark.parametrize("storage", CPU_PATHS, indirect=True)
def test_single_long_sequence_uses_splits(storage, kernel_path):
    rng = np.random.default_rng(7)
    call = Call(rng, storage, 4, 16, [(3000, 1, True)], num_kv_heads=1, d=64)
    _, items, _, n_parts = cpu.P.make_plan(call.q_start, call.kv_start, call.context_lens, 1, 1,
                                           16, 2, cpu._MIN_SPLIT)
    assert len(items) >= 2 and n_parts == len(items)  # both cores get work
    if kernel_path == "threads":
        assert not cpu.P.validate_and_plan(call.block_table, call.k_pool.shape[0], call.table_rows,
                                           call.q_start, call.kv_start, call.context_lens, 1, 4,
                                           64, 64, 16, 2, cpu._MIN_SPLIT, cpu._INLINE_WORK)[2]
    assert_matches(call.run(append_attend), call.run(append_attend_ref))


def test_threaded_call_restores_the_chunk_size(monkeypatch):
    """The threaded path hands items out one at a time (chunk size 1, set inside the
    jitted call): the caller's own setting is back when the call returns."""
    import numba

    monkeypatch.setattr(cpu, "_INLINE_WORK", -1)
    rng = np.random.default_rng(8)
    call = Call(rng, "bfloat16", 4, 16, [(3000, 1, True)], num_kv_heads=1, d=64)
    old = numba.set_parallel_chunksize(3)
    try:
        call.run(append_attend)
        assert numba.get_parallel_chunksize() == 3
    finally:
        numba.set_parallel_chunksize(old)


def test_nothing_visible_anywhere():
    rng = np.random.default_rng(3)
    call = Call(rng, "float32", 2, 8, [(0, 1, False), (0, 4, False)])
    out, lse, _, _ = call.run(append_attend)
    assert np.isneginf(lse).all() and (out == 0).all()


def test_empty_batch():
    rng = np.random.default_rng(4)
    call = Call(rng, "bfloat16", 2, 8, [(3, 1, True)])
    e = np.zeros((0, NUM_KV_HEADS * 2, D), np.uint16)
    kv = np.zeros((0, NUM_KV_HEADS, D), np.uint16)
    z = np.zeros(1, np.int32)
    out, lse = append_attend(e, kv, kv, call.k_pool, call.v_pool, call.block_table,
                             np.zeros(0, np.int32), z, z, np.zeros(0, np.int32), 0, 1.0,
                             "bfloat16")
    assert out.shape == (0, 4, D) and lse.shape == (0, 4)


@pytest.mark.parametrize("n_shards", [1, 2, 3, 4])
@pytest.mark.parametrize("storage", CPU_PATHS, indirect=True)
def test_sequence_shards_merge_to_whole(storage, n_shards):
    """Split each sequence's cached tokens over several pools ('sequence' placement):
    earlier shards attend-only, the tail shard appends; the merge equals one pool."""
    rng = np.random.default_rng(n_shards)
    g, bs = 4, 8
    seqs = [(50, 1, True), (33, 6, True), (9, 1, True)]
    whole = Call(rng, storage, g, bs, seqs)
    out_w, lse_w, kp_w, vp_w = whole.run(append_attend)
    outs, lses = [], []
    for s in range(n_shards):
        tail = s == n_shards - 1
        # Uneven cut points; with 3+ shards shard 1 is empty on purpose.
        fr = {1: [0, 1], 2: [0, 0.5, 1], 3: [0, 1 / 3, 1 / 3, 1],
              4: [0, 1 / 3, 1 / 3, 0.7, 1]}[n_shards]
        lo = [int(c * fr[s]) for c, _, _ in seqs]
        hi = [int(c * fr[s + 1]) for c, _, _ in seqs]
        shard = Call(rng, storage, g, bs,
                     [(h - l, n, tail) for (l, h), (_, n, _) in zip(zip(lo, hi), seqs)])
        shard.q = whole.q
        if tail:
            shard.k_new, shard.v_new = whole.k_new, whole.v_new
        else:
            shard.k_new = shard.v_new = whole.k_new[:0]
        shard.kv_start = whole.kv_start if tail else np.zeros_like(whole.kv_start)
        # Copy this shard's token range of the whole cache into the shard's pool.
        for i in range(len(seqs)):
            for h in range(NUM_KV_HEADS):
                for p in range(lo[i], hi[i]):
                    src = LAYER, whole.block_table[i + 1, h, p // bs], p % bs
                    q = p - lo[i]
                    dst = LAYER, shard.block_table[i + 1, h, q // bs], q % bs
                    shard.k_pool[dst] = whole.k_pool[src]
                    shard.v_pool[dst] = whole.v_pool[src]
        out, lse, _, _ = shard.run(append_attend)
        outs.append(out)
        lses.append(lse)
    out_m, lse_m = merge(outs, lses)
    np.testing.assert_allclose(out_m, out_w, atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(lse_m, lse_w, atol=2e-5, rtol=1e-5)


def test_appended_rows_are_token_major_to_head_major():
    rng = np.random.default_rng(11)
    call = Call(rng, "float16", 2, 8, [(6, 5, True)])
    _, _, kp, vp = call.run(append_attend)
    for t in range(5):
        for h in range(NUM_KV_HEADS):
            pos = 6 + t
            blk = call.block_table[1, h, pos // 8]
            np.testing.assert_array_equal(kp[LAYER, blk, pos % 8], call.k_new[t, h])
            np.testing.assert_array_equal(vp[LAYER, blk, pos % 8], call.v_new[t, h])
    other = 1 - LAYER  # the other layer's rows are untouched
    np.testing.assert_array_equal(kp[other], call.k_pool[other])


@pytest.mark.parametrize("what", ["missing_block", "bad_count", "bad_slot", "wrong_dtype"])
def test_rejects_malformed_calls(what):
    rng = np.random.default_rng(5)
    call = Call(rng, "float32", 2, 8, [(10, 3, True)])
    if what == "missing_block":
        call.block_table[1, 1, 1] = -1
    elif what == "bad_count":
        call.kv_start = np.array([0, 2], np.int32)
        call.k_new = call.k_new[:2]
        call.v_new = call.v_new[:2]
    elif what == "bad_slot":
        call.table_rows = np.array([7], np.int32)
    else:
        call.q = call.q.astype(np.float64)
    with pytest.raises((ValueError, TypeError)):
        call.run(append_attend)


@njit
def _widen_all(src, code):
    """Every element through the kernels' own jitted decoder (code 2: bfloat16, else float16)."""
    dst = np.empty(src.shape, np.float32)
    for t in range(src.shape[0]):
        for k in range(src.shape[1]):
            dst[t, k] = widen16.dec(src[t, k], code == 2)
    return dst


@pytest.mark.parametrize("storage", ["float16", "bfloat16"])
def test_kernel_decoders_cover_every_bit_pattern(storage):
    bits = np.arange(1 << 16, dtype=np.uint16).reshape(256, 256)
    got = _widen_all(bits, 1 if storage == "float16" else 2)
    want = widen(bits, storage)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    ok = ~np.isnan(want)
    np.testing.assert_array_equal(got[ok].view(np.uint32), want[ok].view(np.uint32))


@njit
def _manual_f16(bits):
    out = np.empty(bits.shape, np.float32)
    for i in range(bits.shape[0]):
        out[i] = widen16.f16_to_f32(bits[i])
    return out


def test_manual_f16_decoder_covers_every_bit_pattern():
    """The bit-twiddling float16 decoder used where the CPU has no F16C."""
    bits = np.arange(1 << 16, dtype=np.uint16)
    got = _manual_f16(bits)
    want = widen(bits, "float16")
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    ok = ~np.isnan(want)
    np.testing.assert_array_equal(got[ok].view(np.uint32), want[ok].view(np.uint32))


def test_storage_helpers():
    import torch

    rng = np.random.default_rng(2)
    x = np.concatenate([rng.standard_normal(10000, dtype=np.float32) * 1e3,
                        np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 3.4e38, 1e-40,
                                  1.00390625, 1.01171875], np.float32)])
    bf = to_storage(x, "bfloat16")
    want = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    fin = ~np.isnan(x)
    np.testing.assert_array_equal(bf[fin], want[fin])  # round to nearest even
    assert np.isnan(widen(bf, "bfloat16")[~fin]).all()
    h = to_storage(x, "float16")
    with np.errstate(over="ignore"):
        want16 = x[fin].astype(np.float16).astype(np.float32)
    np.testing.assert_array_equal(widen(h, "float16")[fin], want16)
    assert storage_itemsize("float32") == 4 and storage_itemsize("bfloat16") == 2
    with pytest.raises(ValueError):
        to_storage(x, "int8")


def test_warmup_compiles_every_variant():
    warmup()  # also what an attention peer calls before announcing itself


def test_block_table_wider_than_local_heads():
    """A shard holding a kv-head range may index a table with more head rows than
    the call's local kv heads; only the first num_kv_heads rows are used."""
    rng = np.random.default_rng(12)
    call = Call(rng, "bfloat16", 4, 8, [(20, 1, True), (4, 3, True)])
    extra = np.full(call.block_table.shape[:1] + (1,) + call.block_table.shape[2:], -1, np.int32)
    call.block_table = np.ascontiguousarray(np.concatenate([call.block_table, extra], axis=1))
    assert_matches(call.run(append_attend), call.run(append_attend_ref))


@pytest.mark.parametrize("storage", CPU_PATHS, indirect=True)
@pytest.mark.parametrize("rising", [True, False])
def test_running_max_that_moves_every_block_or_never(storage, rising, kernel_path):
    """The vector softmax takes its horizontal max only when a block has a score above the
    running max: scores that rise with the position (the max moves in every block) and
    that fall (it never moves after the first) both match the reference."""
    rng = np.random.default_rng(9)
    call = Call(rng, storage, 4, 16, [(700, 1, True)], num_kv_heads=1, d=64)
    bs = call.k_pool.shape[2]
    ramp = np.linspace(0.0, 6.0, 700 + bs, dtype=np.float32)
    if not rising:
        ramp = ramp[::-1].copy()
    q = np.ones(call.q.shape, np.float32)
    k = np.tile(rng.uniform(0.5, 1.5, (1, 64)).astype(np.float32), (N_LAYERS, call.k_pool.shape[1], bs, 1))
    for b, blk in enumerate(call.block_table[call.table_rows[0], 0]):
        if blk >= 0:
            k[:, blk, :, :] *= ramp[b * bs:(b + 1) * bs, None] / 8.0
    call.q = to_storage(q, storage)
    call.k_pool = to_storage(k, storage)
    assert_matches(call.run(append_attend), call.run(append_attend_ref))


def test_read_only_and_other_typed_inputs_share_the_two_variants():
    """The driver is compiled once per storage dtype (float32, uint16): read-only inputs
    (wire frames) take the same variant as writable ones, and int64 or list index
    arguments and an unaligned q are converted by the slow path, never compiled anew."""
    from lamina_kernels import drivers

    rng = np.random.default_rng(31)
    for storage in STORAGES:
        call = Call(rng, storage, 3, 16, MIXED, num_kv_heads=2, d=64)
        want = call.run(append_attend)
        for a in (call.q, call.k_new, call.v_new, call.block_table, call.table_rows,
                  call.q_start, call.kv_start, call.context_lens):
            a.flags.writeable = False
        assert_matches(call.run(append_attend), want, atol=0)
        call.table_rows = call.table_rows.astype(np.int64)
        call.context_lens = list(call.context_lens)
        raw = np.zeros(call.q.nbytes + 1, np.uint8)[1:]  # misaligned by one byte
        q = raw.view(call.q.dtype).reshape(call.q.shape)
        q[...] = call.q
        call.q = q
        assert not q.flags.aligned
        assert_matches(call.run(append_attend), want, atol=0)
    assert len(drivers.append_attend.overloads) == len(drivers.SIGNATURES) == 2


def test_first_calls_from_several_threads_at_once(monkeypatch):
    """The first call loads the two variants and closes the dispatcher to new types; other
    threads making their first call at the same moment wait for it instead of failing."""
    from concurrent.futures import ThreadPoolExecutor

    from lamina_kernels import drivers

    rng = np.random.default_rng(32)
    call = Call(rng, "bfloat16", 3, 16, MIXED, num_kv_heads=2, d=64)
    want = call.run(append_attend)
    monkeypatch.setattr(cpu, "_COMPILED", None)
    monkeypatch.setattr(drivers.append_attend, "_can_compile", True)
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda _: call.run(append_attend), range(4)))
    for g in got:
        assert_matches(g, want, atol=0)
    assert cpu._COMPILED and not drivers.append_attend._can_compile


_DP_CASES = [(g, d) for g, d in GEOMETRIES if d in (64, 128)]


def test_dot_product_path_default_follows_the_host():
    """On by default only where the host reports avx512_bf16 and Numba compiles for it; a host
    without the feature keeps the float32-widening tiles."""
    assert simd.dpbf16_default({"avx512bf16": False}) is False
    assert simd.dpbf16_default({}) is False
    assert simd.dpbf16_default({"avx512bf16": True}) is simd.TARGET_BF16
    assert simd.dpbf16_default() is (widen16.HOST_AVX512_BF16 and simd.TARGET_BF16)


@pytest.mark.parametrize("g,d", _DP_CASES)
def test_dot_product_path_off_is_the_widening_path(g, d, kernel_path):
    """Told that the host lacks avx512_bf16, a bfloat16 call runs the float32-widening tiles:
    the same bits as with the flag cleared by hand, in the driver and on the spin pool's item
    code alike, and (where the instruction exists) not the dot products' bits."""
    rng = np.random.default_rng(hash((g, d, "dp-off")) % 2**32)
    call = Call(rng, "bfloat16", g, 16, MIXED, num_kv_heads=2, d=d)
    old = simd.set_dpbf16(simd.dpbf16_default({"avx512bf16": False}))
    try:
        fallback = call.run(append_attend)
        simd.set_dpbf16(False)
        assert_matches(call.run(append_attend), fallback, atol=0)
        simd.set_dpbf16(True)
        dp = call.run(append_attend)
    finally:
        simd.set_dpbf16(old)
    assert_matches(dp, fallback, atol=3e-6)
    assert not np.array_equal(dp[0], fallback[0])  # the flag did select another path


@njit
def _dot_bf16(a, b):
    acc = simd.vzero()
    for i in range(0, a.shape[0], 32):
        acc = simd.vdpbf16(acc, simd.vload_raw(a, i), simd.vload_raw(b, i))
    return simd.vhsum(acc)


def _bf16_pair(rng, n):
    x = to_storage(rng.standard_normal(n, dtype=np.float32), "bfloat16")
    y = to_storage(rng.standard_normal(n, dtype=np.float32), "bfloat16")
    return x, y, widen(x, "bfloat16").astype(np.float64) @ widen(y, "bfloat16").astype(np.float64)


def test_vdpbf16_is_a_float32_dot_product_of_bfloat16_rows():
    """Exact products, float32 accumulation: within float32 rounding of the float64 dot product;
    exact where every partial sum is representable (small integers)."""
    rng = np.random.default_rng(41)
    for n in (32, 64, 128, 4096):
        x, y, want = _bf16_pair(rng, n)
        assert abs(_dot_bf16(x, y) - want) <= 1e-5 * (np.abs(widen(x, "bfloat16")) @ np.abs(widen(y, "bfloat16")))
    ints = rng.integers(-8, 9, (2, 256)).astype(np.float32)
    x, y = (to_storage(v, "bfloat16") for v in ints)
    assert _dot_bf16(x, y) == float(ints[0] @ ints[1])


@pytest.mark.skipif(not simd.TARGET_BF16, reason="host (Numba's target) lacks avx512_bf16: no vdpbf16ps to test")
def test_vdpbf16_compiles_to_the_instruction_here():
    x, y, _ = _bf16_pair(np.random.default_rng(42), 64)
    _dot_bf16(x, y)
    assert "vdpbf16ps" in _dot_bf16.inspect_asm(_dot_bf16.signatures[0])


@pytest.mark.skipif(not simd.TARGET_AVX512, reason="Numba's target here lacks AVX-512: every test above runs the AVX2 tiles")
def test_tiles_compiled_for_an_avx2_target_match_reference():
    """Compiled for an AVX2-only CPU (haswell: 16 vector registers), the tiles leave out key quads, the padded
    fourth row and even/odd bfloat16 (simd.TARGET_AVX512): that variant matches the reference too."""
    import os
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent("""
        import sys
        import numpy as np
        sys.path.insert(0, sys.argv[1])
        from kernel_calls import Call, assert_matches
        from lamina_kernels import append_attend, simd
        from lamina_kernels.reference import append_attend_ref

        assert not simd.TARGET_AVX512
        seqs = [(37, 1, True), (130, 1, False), (300, 1, True), (64, 5, True), (0, 9, True)]
        n = 0
        for storage in ("float32", "float16", "bfloat16"):
            for g, d in ((3, 64), (7, 128), (8, 64), (4, 128), (1, 64)):
                rng = np.random.default_rng(g * 1000 + d)
                call = Call(rng, storage, g, 16, seqs, num_kv_heads=2, d=d)
                assert_matches(call.run(append_attend), call.run(append_attend_ref), atol=3e-5)
                n += 1
        print("ok", n)
    """)
    env = dict(os.environ, NUMBA_CPU_NAME="haswell")
    res = subprocess.run([sys.executable, "-c", code, os.path.dirname(__file__)], env=env, capture_output=True,
                         text=True, timeout=1200)
    assert res.returncode == 0 and res.stdout.split() == ["ok", "15"], res.stderr[-3000:]


def test_a_target_without_avx512_bf16_never_emits_the_instruction():
    """Compiled for a generic x86-64 (as for a CPU without avx512_bf16), vdpbf16 is float32
    FMAs (no vdpbf16ps to SIGILL on) with the same result, and the path is off by default."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent("""
        import numpy as np
        from numba import njit
        from lamina_kernels import simd, to_storage, widen

        @njit
        def dot(a, b):
            acc = simd.vzero()
            for i in range(0, a.shape[0], 32):
                acc = simd.vdpbf16(acc, simd.vload_raw(a, i), simd.vload_raw(b, i))
            return simd.vhsum(acc)

        ints = np.arange(-64, 64, dtype=np.float32).reshape(2, 64) / 4
        x, y = (to_storage(v, "bfloat16") for v in ints)
        assert dot(x, y) == float(ints[0] @ ints[1])
        assert "vdpbf16ps" not in dot.inspect_asm(dot.signatures[0])
        assert not simd.TARGET_BF16 and not simd.dpbf16_default()
        print("ok")
    """)
    env = dict(__import__("os").environ, NUMBA_CPU_NAME="x86-64")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-2000:]

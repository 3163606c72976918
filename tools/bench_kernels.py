"""Attention kernel benchmark against the machine's own limits, measured in the same run.

    python tools/bench_kernels.py [--geometry HQ/HKV/D ...] [--quick] [--json FILE]
                                  [--threads N] [--cuda]
    python tools/bench_kernels.py --inline-sweep --geometry 9/3/64 --contexts 256,512,1024,2048 --batch 1

For each geometry (query heads / kv heads / head_dim), batch, context, mode and storage
dtype it times `append_attend` and, in the same round-robin (so they see the same
background load on a shared machine), the machine's two ceilings:

- STREAM read: a parallel sum over a 512 MiB float32 array (all threads), GB/s;
- FMA peak: independent 16-lane float32 FMA chains on every thread (the kernels
  compute in float32 whatever the storage), GFLOP/s.

Each row is then bandwidth- or compute-bound, whichever ceiling gives the longer
ideal time (bytes / STREAM vs flops / FMA peak), and `frac` is that ideal time over
the measured one: the fraction of the limit the kernel reaches. On a loaded machine
a ceiling's own round can be starved (frac > 1 then means nothing), so the last two
columns redo it with the run's best STREAM and FMA peak: never flattered.

Bytes: K and V of every key read once per kv head, in the storage dtype. Flops:
4 * head_dim per (query head, visible key) (QK and PV, 2 flops per FMA).
Modes: decode (one new token per sequence, appended then attended) and prefill
(a chunk of --chunk new tokens per sequence after `context` cached ones, causal).
Each timed kernel call follows an untimed read of --flush-mb MB (default 64), so every
case comes from DRAM, as a layer's KV does in the engine.

--inline-sweep times each decode case run on the calling thread alone and over the
threads, with its plan.call_work: where they cross is lamina_kernels.cpu._INLINE_WORK.

--spin-pool times each decode case per call (median and best of --sweep-calls, round-robin)
inline, over Numba's threads, as append_attend picks today, and (in a round-robin of its own
with the inline call, away from OpenMP's spinning threads) with its items split over
the engine's spin pool (lamina_p2p/model/pool_attention.py; one worker, kept awake as
between a layer's dense ops), once per --pool-split MIN_SPLIT/ALIGN; --flush-mb N reads N MB
between calls (not timed), so the pool comes from DRAM as in the engine, where a step's
weights pass through the caches between two calls of one layer; that also evicts the code,
the interpreter's state and the page tables, which the engine's non-temporal weight stream
leaves in the caches. --layers N instead calls N copies of the pool in turn, as a step's
layers are called: with more KV than the last-level cache each call reads its own from DRAM
while the rest stays warm (the batch-1 per-call figure of issue 13 is read this way, next to
the engine's trace).

Defaults cover GQA group sizes 1, 3, 4, 7, 8 and head_dim 64 and 128; batch 16 up to
context 8192 and batch 1 up to 32768. Cases whose pool would exceed --max-kv-gb are
skipped (listed at the end). --cuda benchmarks the numba.cuda kernel instead, against
the card's device-to-device copy bandwidth (see tools/gpu_check.sh).
"""

import argparse
import functools
import json
import math
import os
import sys
import time

import numpy as np

from lamina_kernels import STORAGES
from lamina_p2p.attention.kv_pool import DEFAULT_BLOCK_SIZE as BS  # tokens per pool block, as the engine's

DEFAULT_GEOMETRIES = ("32/32/128", "9/3/64", "32/8/128", "28/4/128", "32/4/64")


def best_times(fns, reps, min_time=0.0, per_round=None, before=None):
    """Best wall time of each of several callables, timed round-robin (one call of each
    per round, after one warm call each) for at least `reps` rounds and min_time seconds
    per callable. Interleaving puts every callable under the same background load, so
    their ratios hold on a shared machine even when the absolute times drift.
    per_round: calls of each callable per round (default 1); short ones (the ceilings)
    get several, so that their best finds a moment when no other process holds a core.
    before: a callable (or None) per callable, run untimed before each of its calls.
    Each round runs them in a new order (a seeded shuffle): whichever ran right after the
    ceilings (a 512 MB read, then FMA loops on every core) in every round was measured
    10-35 % slower on a Zen 5; now no callable holds one place every round."""
    per_round = per_round or [1] * len(fns)
    before = before or [None] * len(fns)
    for fn in fns:
        fn()
    best = [math.inf] * len(fns)
    start = time.perf_counter()
    order = np.random.default_rng(0)
    n = 0
    while n < reps or time.perf_counter() - start < min_time * len(fns):
        for j in order.permutation(len(fns)):
            fn = fns[j]
            for _ in range(per_round[j]):
                if before[j] is not None:
                    before[j]()
                t0 = time.perf_counter()
                fn()
                best[j] = min(best[j], time.perf_counter() - t0)
        n += 1
    return best


def best_time(fn, reps, min_time=0.0):
    """Best wall time of `reps` calls (after one warm call); repeat until min_time spent."""
    return best_times([fn], reps, min_time)[0]


@functools.lru_cache(maxsize=None)
def _stream_array(nbytes):
    from numba import njit, prange

    @njit(parallel=True, nogil=True, fastmath=True)
    def psum(a):
        s = 0.0
        for i in prange(a.shape[0]):
            s += a[i]
        return s

    return psum, np.ones(nbytes // 4, np.float32)


def stream_read_gbps(nbytes, reps):
    """STREAM-style read: parallel sum over a float32 array of nbytes, all threads."""
    psum, a = _stream_array(nbytes)
    t = best_time(lambda: psum(a), reps)
    return a.nbytes / t / 1e9


# Iterations of the FMA-peak loop per thread: 12 chains x 16 lanes x 2 flops each.
_PEAK_ITERS = 200_000


@functools.lru_cache(maxsize=None)
def _fma_peak_fn():
    from numba import njit, prange

    from lamina_kernels.simd import vadd, vfma, vload, vstore, vzero

    @njit(parallel=True, nogil=True)
    def peak(n_threads, n, x, out):
        # 12 independent chains hide the FMA latency (4 cycles x 2 ports + slack).
        for w in prange(n_threads):
            a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = a8 = a9 = a10 = a11 = vzero()
            b = vload(x, 0)
            c = vload(x, 16)
            for _ in range(n):
                a0 = vfma(a0, b, c); a1 = vfma(a1, b, c); a2 = vfma(a2, b, c)  # noqa: E702
                a3 = vfma(a3, b, c); a4 = vfma(a4, b, c); a5 = vfma(a5, b, c)  # noqa: E702
                a6 = vfma(a6, b, c); a7 = vfma(a7, b, c); a8 = vfma(a8, b, c)  # noqa: E702
                a9 = vfma(a9, b, c); a10 = vfma(a10, b, c); a11 = vfma(a11, b, c)  # noqa: E702
            s = vadd(vadd(vadd(a0, a1), vadd(a2, a3)), vadd(vadd(a4, a5), vadd(a6, a7)))
            vstore(out, w * 16, vadd(s, vadd(vadd(a8, a9), vadd(a10, a11))))

    return peak


def fma_peak_callable(n_threads):
    """A callable running the FMA-peak loop on n_threads threads, and its flop count."""
    peak = _fma_peak_fn()
    x = np.full(32, 0.5, np.float32)
    x[16:] = 0.25  # converges to a fixed point: no overflow, no denormals
    out = np.zeros(16 * n_threads, np.float32)
    return (lambda: peak(n_threads, _PEAK_ITERS, x, out)), n_threads * _PEAK_ITERS * 12 * 16 * 2


def parse_geometry(text):
    try:
        hq, hkv, d = (int(x) for x in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"geometry {text!r}: expected HQ/HKV/D, e.g. 32/8/128")
    if min(hq, hkv, d) <= 0 or hq % hkv:
        raise argparse.ArgumentTypeError(f"geometry {text!r}: need positive sizes and HQ a multiple of HKV")
    return hq, hkv, d


def aligned_empty(shape, dtype, align=64):
    """An uninitialised C-contiguous array whose data starts on a cache line."""
    dtype = np.dtype(dtype)
    n = int(np.prod(shape)) * dtype.itemsize
    buf = np.empty(n + align, np.uint8)
    off = (-buf.ctypes.data) % align
    return buf[off:off + n].view(dtype).reshape(shape)


def huge_page_fraction(a):
    """Fraction of an array's bytes on transparent huge pages (AnonHugePages of the
    mappings it spans, /proc/self/smaps; None where that cannot be read). numpy advises
    huge pages for its allocations of >= 4 MiB before they are touched, so large pools
    get them wherever THP is in madvise or always mode."""
    lo, hi = a.ctypes.data, a.ctypes.data + a.nbytes
    huge = 0
    inside = False
    try:
        with open("/proc/self/smaps") as f:
            for line in f:
                head = line.split(None, 1)[0]
                if "-" in head and not head.endswith(":"):
                    start, end = (int(x, 16) for x in head.split("-"))
                    inside = start < hi and end > lo
                elif inside and head == "AnonHugePages:":
                    huge += int(line.split()[1]) * 1024
    except (OSError, ValueError):
        return None
    return min(1.0, huge / max(a.nbytes, 1))


def grown_block_table(batch, hkv, d, storage, bs, tokens):
    """The block table (int32 [batch, hkv, blocks]) the attention peer's pool (KVPool) gives `batch`
    sequences that each grow to `tokens` tokens one token at a time, side by side: decode's layout."""
    from lamina_p2p.attention.kv_pool import KVBudget, KVPool, PoolKey

    key = PoolKey(1, d, storage, bs)
    nbps = -(-tokens // bs)
    pool = KVPool(key, KVBudget(2 * batch * hkv * nbps * key.block_bytes()), nbps, hkv, initial_table_rows=batch)
    rows = [pool.new_table_row(hkv) for _ in range(batch)]
    for t in range(1, tokens + 1):
        for row in rows:
            if t > pool.capacity_tokens[row]:
                pool.ensure(row, t)
    return pool.table[rows, :, :nbps].copy()


def make_case(geom, storage, batch, ctx, n_new, rng, block_size=None, blocks="runs"):
    """A pool holding `batch` sequences x HKV heads of ctx cached tokens (blocks of
    block_size tokens, default BS) plus room for n_new appended ones, and the call's
    arguments. blocks "runs": each (sequence, kv head)'s blocks one ascending run, as
    the pool gives a prompt's blocks; "grown": what the pool (KVPool) gives a batch whose
    sequences grow a token at a time side by side (a long generation's KV); "scattered": a
    random permutation (a fragmented pool)."""
    from lamina_kernels import to_storage

    hq, hkv, d = geom
    bs = block_size or BS
    nbps = -(-(ctx + n_new) // bs)
    n_blocks = batch * hkv * nbps
    if blocks == "grown":
        bt = grown_block_table(batch, hkv, d, storage, bs, ctx + n_new)
        n_blocks = max(n_blocks, int(bt.max()) + 1)
    else:
        order = np.arange(n_blocks) if blocks == "runs" else rng.permutation(n_blocks)
        bt = order.astype(np.int32).reshape(batch, hkv, nbps)
    pools = []
    for _ in range(2):
        p = aligned_empty((1, n_blocks, bs, d), np.float32 if storage == "float32" else np.uint16)
        # Fill a block-chunk at a time (a whole float32 copy of a large pool is GBs).
        for b0 in range(0, n_blocks, 4096):
            b1 = min(b0 + 4096, n_blocks)
            p[:, b0:b1] = to_storage(rng.standard_normal((1, b1 - b0, bs, d), dtype=np.float32), storage)
        pools.append(p)
    t = batch * n_new
    q = to_storage(rng.standard_normal((t, hq, d), dtype=np.float32), storage)
    k_new = to_storage(rng.standard_normal((t, hkv, d), dtype=np.float32), storage)
    v_new = to_storage(rng.standard_normal((t, hkv, d), dtype=np.float32), storage)
    starts = np.arange(0, t + 1, n_new, dtype=np.int32)
    return dict(q=q, k_new=k_new, v_new=v_new, k_pool=pools[0], v_pool=pools[1], block_table=bt,
                table_rows=np.arange(batch, dtype=np.int32), q_start=starts, kv_start=starts,
                context_lens=np.full(batch, ctx, np.int32), layer=0, scale=1.0 / math.sqrt(d),
                storage=storage)


def case_cost(geom, storage, batch, ctx, n_new):
    """(bytes, flops) of one call: K/V of every key once per kv head; 4*D flops per
    (query head, visible key)."""
    hq, hkv, d = geom
    isz = 4 if storage == "float32" else 2
    keys = ctx + n_new
    kv_bytes = 2 * batch * hkv * keys * d * isz
    visible = n_new * ctx + n_new * (n_new + 1) // 2  # causal inside the chunk
    return kv_bytes, 4 * d * hq * batch * visible


def reference_error(a, out, geom):
    """Max |out - float64 torch reference| on a copy of the call (pools as before it)."""
    from lamina_kernels.reference import append_attend_ref

    b = dict(a)
    b["k_pool"], b["v_pool"] = a["k_pool"].copy(), a["v_pool"].copy()
    ref, _ = append_attend_ref(**b)
    return float(np.abs(out - ref).max())


def bench_cpu(ns):
    import numba

    from lamina_kernels import append_attend, warmup

    if ns.threads:
        numba.set_num_threads(ns.threads)
    n_threads = numba.get_num_threads()
    warmup()
    peak_fn, peak_flops = fma_peak_callable(n_threads)
    psum, stream_arr = _stream_array(512 << 20)
    stream_fn = functools.partial(psum, stream_arr)
    # Read before each kernel call: without it a case smaller than the L3 stays cached from
    # its previous call while the one timed after STREAM's read comes from DRAM.
    flush_fn = functools.partial(psum, _stream_array(ns.flush_mb << 20)[1]) if ns.flush_mb else None
    reps = 3 if ns.quick else 5
    min_time = 0.1 if ns.quick else 0.3
    rng = np.random.default_rng(0)
    rows, skipped = [], []
    plan = []
    for geom in ns.geometry:
        for mode in ns.modes:
            n_new = 1 if mode == "decode" else ns.chunk
            for batch in (ns.batch if mode == "decode" else ns.prefill_batch):
                for ctx in ns.contexts:
                    if batch > 1 and ctx > ns.max_ctx_batched:
                        continue
                    if mode == "prefill" and ctx > ns.max_ctx_prefill:
                        continue
                    plan.append((geom, mode, n_new, batch, ctx))
    for geom, mode, n_new, batch, ctx in plan:
        f32_bytes = case_cost(geom, "float32", batch, ctx, n_new)[0]
        if f32_bytes > ns.max_kv_gb * 1e9:
            skipped.append(f"{'/'.join(map(str, geom))} {mode} B={batch} ctx={ctx}: "
                           f"{f32_bytes / 1e9:.1f} GB float32 pool > --max-kv-gb")
            continue
        # Every dtype x block order of the case in one round-robin: their ratios are from the same moments.
        kinds = [(st, order) for st in ns.dtypes for order in ns.blocks]
        cases = [make_case(geom, st, batch, ctx, n_new, rng, ns.block_size, order) for st, order in kinds]
        huge = [huge_page_fraction(a["k_pool"]) for a in cases]
        # One call appends, the timed calls repeat the same append (same table rows and
        # positions): the work per call is identical.
        outs = [append_attend(**a)[0] for a in cases]
        fns = [functools.partial(append_attend, **a) for a in cases]
        # The ceilings go in the same round-robin as the kernels.
        ts = best_times(fns + [stream_fn, peak_fn], reps, min_time,
                        per_round=[1] * len(fns) + [2, 10], before=[flush_fn] * len(fns) + [None, None])
        stream = stream_arr.nbytes / ts[-2] / 1e9
        peak = peak_flops / ts[-1] / 1e9
        f32_t = {}
        for (st, order), a, out, t, h in zip(kinds, cases, outs, ts, huge):
            nbytes, flops = case_cost(geom, st, batch, ctx, n_new)
            t_bw = nbytes / (stream * 1e9)
            t_fma = flops / (peak * 1e9)
            bound = "bw" if t_bw >= t_fma else "fma"
            err = reference_error(a, out, geom) if ns.check and nbytes <= ns.check_max_mb * 1e6 else None
            if st == "float32":
                f32_t[order] = t
            rows.append(dict(
                geometry="/".join(map(str, geom)), group=geom[0] // geom[1], head_dim=geom[2],
                mode=mode, batch=batch, context=ctx, new_tokens=n_new, dtype=st,
                us=t * 1e6, kv_gbps=nbytes / t / 1e9, gflops=flops / t / 1e9,
                stream_gbps=stream, fma_peak_gflops=peak, bound=bound,
                frac_stream=t_bw / t, frac_fma=t_fma / t, frac=max(t_bw, t_fma) / t,
                tok_per_s_vs_f32=(f32_t[order] / t) if order in f32_t else None, max_abs_err=err,
                block_size=ns.block_size, blocks=order, pool_huge_page_fraction=h))
            if ns.progress:
                print(_fmt_row(rows[-1]), flush=True, file=sys.stderr)
        del cases, outs, fns
    # Under background load a ceiling's round can be starved too (then frac > 1 says
    # nothing). The run's best STREAM and FMA peak give fractions that are never
    # flattered: `frac_best` (and bound_best) use them.
    if rows:
        sb = max(r["stream_gbps"] for r in rows)
        pb = max(r["fma_peak_gflops"] for r in rows)
        for r in rows:
            t_bw = r["kv_gbps"] / sb
            t_fma = r["gflops"] / pb
            r.update(stream_best_gbps=sb, fma_peak_best_gflops=pb, frac_stream_best=t_bw,
                     frac_fma_best=t_fma, bound_best="bw" if t_bw >= t_fma else "fma",
                     frac_best=max(t_bw, t_fma))
    return rows, skipped, n_threads


def _decode_cases(ns, cpu):
    """Each decode case of the sweeps: (geometry, batch, context, storage, call arguments, out, lse,
    plan.call_work)."""
    rng = np.random.default_rng(0)
    for geom in ns.geometry:
        for batch in ns.batch:
            for ctx in ns.contexts:
                for st in ns.dtypes:
                    a = make_case(geom, st, batch, ctx, 1, rng, ns.block_size, ns.blocks[0])
                    work = int(cpu.P.call_work(a["q_start"], a["kv_start"], a["context_lens"],
                                               geom[1], geom[0] // geom[1], geom[2]))
                    yield (geom, batch, ctx, st, a, np.empty((batch, geom[0], geom[2]), np.float32),
                           np.empty((batch, geom[0]), np.float32), work)


def inline_sweep(ns):
    """Where the calling thread alone beats the threads: per-call time (best of
    --sweep-calls, warm cache) of each decode case run inline and over the threads,
    round-robin, with plan.call_work; lamina_kernels.cpu._INLINE_WORK is set from it."""
    from lamina_kernels import append_attend, cpu, warmup

    warmup(ns.dtypes)
    rows = []
    for geom, batch, ctx, st, a, out, lse, work in _decode_cases(ns, cpu):
        def call(limit, a=a, out=out, lse=lse):
            cpu._INLINE_WORK = limit
            append_attend(**a, out=out, lse=lse)

        saved = cpu._INLINE_WORK
        try:
            t_in, t_thr = best_times([functools.partial(call, 1 << 62),
                                      functools.partial(call, -1)], ns.sweep_calls)
        finally:
            cpu._INLINE_WORK = saved
        rows.append(dict(geometry="/".join(map(str, geom)), batch=batch, context=ctx,
                         dtype=st, work=work, inline_us=t_in * 1e6,
                         threads_us=t_thr * 1e6, inline_now=work <= saved))
        r = rows[-1]
        print(f"{r['geometry']:>10} B{batch:<3} ctx {ctx:6d} {st:>9} work {work:>11,d} "
              f"inline {r['inline_us']:8.1f} us  threads {r['threads_us']:8.1f} us  "
              f"({'inline' if r['inline_now'] else 'threads'} at the current threshold)",
              flush=True)
    return rows


def _split(text):
    a, _, b = text.partition("/")
    return int(a), int(b or 16)


def spin_pool_sweep(ns):
    """Per-call time of each decode case inline, over Numba's threads, as append_attend picks, and on
    the spin pool (one variant per --pool-split), round-robin; see the module docstring."""
    import numba

    from lamina_kernels import append_attend, cpu, warmup
    from lamina_p2p.model import pool_attention, spin_pool

    if ns.threads:
        numba.set_num_threads(ns.threads)
    warmup(ns.dtypes)
    threads = max(2, numba.get_num_threads())
    pool = spin_pool.SpinPool(threads - 1, spin_s=3600.0)  # awake throughout, as between dense ops
    flush = np.ones(max(ns.flush_mb, 0) << 18, np.float32)
    rows = []
    try:
        for geom, batch, ctx, st, a, out, lse, work in _decode_cases(ns, cpu):
            saved = cpu._INLINE_WORK
            # --layers: the case's pools once per layer, called in turn (the append writes each its own row)
            layers = [a] + [dict(a, k_pool=a["k_pool"].copy(), v_pool=a["v_pool"].copy())
                            for _ in range(ns.layers - 1)]
            turn = [0]

            def next_layer():
                turn[0] += 1
                return layers[turn[0] % len(layers)]

            def kernel(limit, out=out, lse=lse):
                cpu._INLINE_WORK = limit
                try:
                    append_attend(**next_layer(), out=out, lse=lse)
                finally:
                    cpu._INLINE_WORK = saved

            def pooled(split, out=out, lse=lse):
                with pool.lock:
                    pool_attention.attend(pool, **next_layer(), out=out, lse=lse, min_split=split[0],
                                          align=split[1])

            inline = functools.partial(kernel, 1 << 62)
            kernel_fns = {"inline": inline, "threads": functools.partial(kernel, -1),
                          "now": functools.partial(kernel, saved)}
            pool_fns = {"inline (pool round)": inline}
            pool_fns.update({f"pool {m}/{al}": functools.partial(pooled, (m, al)) for m, al in ns.pool_split})
            # Two round-robins: after a parallel region GNU OpenMP's threads spin for a while (its default
            # wait policy), on the CPU the spin pool's worker needs; interleaved with the threads' calls the
            # worker took ~3 % of the items (32/8/128 B1 ctx 512) instead of half. The pool's variants run
            # with the inline call only, their first tenth of calls not counted (the spinners park meanwhile).
            times = {}
            worked_before = int(pool.ctl[spin_pool.WORKED])
            for fns, skip in ((kernel_fns, 0), (pool_fns, ns.sweep_calls // 10)):
                times.update(_round_robin(fns, ns.sweep_calls, skip, flush))
            names = list(times)
            worker_units = int(pool.ctl[spin_pool.WORKED]) - worked_before  # items the pool's worker ran
            r = dict(geometry="/".join(map(str, geom)), batch=batch, context=ctx, dtype=st,
                     work=work, flush_mb=ns.flush_mb, layers=ns.layers,
                     median_us={n: float(np.median(times[n])) * 1e6 for n in names},
                     best_us={n: float(np.min(times[n])) * 1e6 for n in names},
                     worker_units=worker_units)
            rows.append(r)
            med = "  ".join(f"{n} {v:7.1f}" for n, v in r["median_us"].items())
            print(f"{r['geometry']:>10} B{batch:<3} ctx {ctx:6d} {st:>9} median us: {med}  "
                  f"(best {min(r['best_us'].values()):.1f})", flush=True)
    finally:
        pool.close()
    return rows


def _round_robin(fns, calls, skip, flush):
    """{name: [seconds per call]}: each function called once (not timed), then `calls` rounds calling each
    in turn after an untimed sum of `flush` (empty: none), the first `skip` rounds not kept."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for i in range(calls):
        for name, fn in fns.items():
            if flush.size:
                flush.sum()
            t0 = time.perf_counter()
            fn()
            if i >= skip:
                times[name].append(time.perf_counter() - t0)
    return times


def bench_cuda(ns):
    from numba import cuda

    from lamina_kernels.cuda import append_attend_cuda

    reps = 5 if ns.quick else 20
    # Device-to-device copy bandwidth: reads + writes 2 x nbytes per copy.
    n = 1 << 28
    src = cuda.device_array(n, np.float32)
    dst = cuda.device_array(n, np.float32)

    def d2d():
        dst.copy_to_device(src)
        cuda.synchronize()

    copy_gbps = 2 * src.nbytes / best_time(d2d, reps) / 1e9
    del src, dst
    rng = np.random.default_rng(0)
    rows = []
    for geom in ns.geometry:
        for storage in ns.dtypes:
            for ctx in ns.contexts:
                batch = 16
                if ctx > ns.max_ctx_batched:
                    continue
                a = make_case(geom, storage, batch, ctx, 1, rng, ns.block_size, ns.blocks[0])
                nbytes, _ = case_cost(geom, storage, batch, ctx, 1)
                host_idx = {k: a[k] for k in ("table_rows", "q_start", "kv_start", "context_lens")}
                d = {k: (cuda.to_device(v) if isinstance(v, np.ndarray) else v) for k, v in a.items()}
                d.update(host_idx)  # index arrays stay on the host: the planner reads them

                def run():
                    append_attend_cuda(**d)
                    cuda.synchronize()

                t = best_time(run, reps)
                out, _ = append_attend_cuda(**d)
                err = reference_error(a, out.copy_to_host(), geom) if ctx <= 2048 else None
                rows.append(dict(geometry="/".join(map(str, geom)), dtype=storage, context=ctx,
                                 kv_gbps=nbytes / t / 1e9, d2d_copy_gbps=copy_gbps,
                                 ratio_to_copy=nbytes / t / 1e9 / copy_gbps, max_abs_err=err,
                                 ms=t * 1e3))
                del a, d
    return rows


_HEADER = (f"{'geometry':>10} {'G':>2} {'mode':>7} {'B':>3} {'ctx':>6} {'dtype':>9} {'blocks':>9} {'us/call':>9} "
           f"{'KV GB/s':>8} {'GFLOP/s':>8} {'STREAM':>7} {'FMA pk':>7} {'bound':>5} {'frac':>5} "
           f"{'/STREAM':>7} {'/FMA':>5} {'tok/s÷f32':>9} {'err':>8} {'best-ceiling frac':>17}")


def _csv_blocks(text):
    orders = [o for o in text.split(",") if o]
    if not orders or any(o not in ("runs", "grown", "scattered") for o in orders):
        raise argparse.ArgumentTypeError("expected runs, grown, scattered, comma-separated")
    return orders


def _fmt_row(r):
    vs = f"{r['tok_per_s_vs_f32']:9.2f}" if r["tok_per_s_vs_f32"] else f"{'-':>9}"
    err = f"{r['max_abs_err']:8.1e}" if r["max_abs_err"] is not None else f"{'-':>8}"
    return (f"{r['geometry']:>10} {r['group']:>2} {r['mode']:>7} {r['batch']:>3} {r['context']:>6} "
            f"{r['dtype']:>9} {r['blocks']:>9} {r['us']:9.1f} {r['kv_gbps']:8.2f} {r['gflops']:8.1f} "
            f"{r['stream_gbps']:7.1f} {r['fma_peak_gflops']:7.0f} {r['bound']:>5} {r['frac']:5.2f} "
            f"{r['frac_stream']:7.2f} {r['frac_fma']:5.2f} {vs} {err}"
            + (f" {r['bound_best']:>5} {r['frac_best']:5.2f}" if "frac_best" in r else ""))


def _pct(fractions):
    """'a-b %' of the pools' huge-page fractions (the small pools of short cases stay on
    4 KiB pages: numpy advises only allocations of >= 4 MiB)."""
    if not fractions:
        return "unknown"
    return f"{100 * min(fractions):.0f}-{100 * max(fractions):.0f} %"


def _csv_ints(text):
    return tuple(int(x) for x in text.split(",") if x)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--geometry", action="append", type=parse_geometry,
                    help=f"HQ/HKV/D, repeatable (default: {' '.join(DEFAULT_GEOMETRIES)})")
    ap.add_argument("--contexts", type=_csv_ints, default=None,
                    help="cached tokens per sequence (default 512,2048,8192,32768; --quick 512,2048)")
    ap.add_argument("--batch", type=_csv_ints, default=(1, 16), help="decode batch sizes (default 1,16)")
    ap.add_argument("--modes", default="decode,prefill", help="decode,prefill (default both)")
    ap.add_argument("--block-size", type=int, default=BS,
                    help=f"tokens per pool block (default {BS}, the engine's default block_size)")
    ap.add_argument("--blocks", type=_csv_blocks, default=["runs"],
                    help="a sequence's blocks, comma-separated: runs (one ascending run per kv head, as "
                         "the pool allocates a prompt; the default), grown (as the pool allocates a batch's "
                         "decodes), scattered (a random permutation: a fragmented pool); several: "
                         "timed in the same round-robin")
    ap.add_argument("--chunk", type=int, default=256, help="prefill: new tokens per sequence per call")
    ap.add_argument("--prefill-batch", type=_csv_ints, default=(1,), help="prefill batch sizes (default 1)")
    ap.add_argument("--max-ctx-batched", type=int, default=8192,
                    help="largest context run at batch > 1 (default 8192)")
    ap.add_argument("--max-ctx-prefill", type=int, default=8192,
                    help="largest cached context a prefill chunk is run on (default 8192)")
    ap.add_argument("--dtypes", default=",".join(STORAGES), help="storage dtypes (default all)")
    ap.add_argument("--max-kv-gb", type=float, default=2.0, help="skip cases with a bigger float32 pool")
    ap.add_argument("--no-check", dest="check", action="store_false",
                    help="skip the comparison with the float64 torch reference")
    ap.add_argument("--check-max-mb", type=float, default=64.0,
                    help="compare with the reference only up to this many KV MB")
    ap.add_argument("--quick", action="store_true", help="fewer contexts and repeats")
    ap.add_argument("--json", metavar="FILE", help="also write the rows (and the run's header) as JSON")
    ap.add_argument("--threads", type=int, default=0, help="numba threads (default: all)")
    ap.add_argument("--progress", action="store_true", help="print each row to stderr as it is measured")
    ap.add_argument("--cuda", action="store_true", help="benchmark the numba.cuda kernel")
    ap.add_argument("--inline-sweep", action="store_true",
                    help="decode per-call time inline vs over the threads, with each case's work "
                         "(sets the threshold lamina_kernels.cpu._INLINE_WORK)")
    ap.add_argument("--sweep-calls", type=int, default=2000,
                    help="--inline-sweep, --spin-pool: calls per case")
    ap.add_argument("--spin-pool", action="store_true",
                    help="decode per-call time inline, over the threads and on the engine's spin pool")
    ap.add_argument("--pool-split", action="append", type=_split, default=None, metavar="MIN_SPLIT/ALIGN",
                    help="--spin-pool: the pooled plan's smallest item and key multiple, repeatable "
                         "(default: lamina_kernels.pooled's)")
    ap.add_argument("--layers", type=int, default=1,
                    help="--spin-pool: a copy of each case's KV pool per layer, called in "
                         "turn as the engine calls a step's layers: with more layers' KV than the last-level "
                         "cache (SmolLM2 at batch 1, ctx 512: 0.4 MB a layer) every call reads its KV from "
                         "DRAM while the code and the interpreter stay warm (the engine's case; --flush-mb "
                         "also evicts those)")
    ap.add_argument("--flush-mb", type=int, default=None,
                    help="MB read (not timed) before each kernel call, so the case comes from DRAM as "
                         "in the engine, where a step's weights and the other layers' KV pass through "
                         "the caches between two calls of one layer (default 64; --spin-pool: 0); 0: "
                         "a case smaller than the caches stays in them")
    ns = ap.parse_args()
    if ns.flush_mb is None:
        ns.flush_mb = 0 if ns.spin_pool else 64
    ns.geometry = ns.geometry or [parse_geometry(g) for g in DEFAULT_GEOMETRIES]
    ns.contexts = ns.contexts or ((512, 2048) if ns.quick else (512, 2048, 8192, 32768))
    ns.modes = tuple(m for m in ns.modes.split(",") if m)
    ns.dtypes = tuple(d for d in ns.dtypes.split(",") if d)
    if ns.block_size <= 0:
        ap.error("--block-size must be positive")
    if ns.layers < 1:
        ap.error("--layers must be at least 1")
    for m in ns.modes:
        if m not in ("decode", "prefill"):
            ap.error(f"unknown mode {m!r}")
    for d in ns.dtypes:
        if d not in STORAGES:
            ap.error(f"unknown dtype {d!r}; expected one of {STORAGES}")
    load0 = os.getloadavg()
    if ns.spin_pool:
        from lamina_kernels import pooled

        ns.pool_split = ns.pool_split or [(pooled.MIN_SPLIT, pooled.ALIGN)]
        print(f"load average {load0[0]:.2f} at start, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}")
        rows = spin_pool_sweep(ns)
        print(f"load average {os.getloadavg()[0]:.2f} at end")
        header = dict(load_average_start=load0, load_average_end=os.getloadavg(),
                      omp_wait_policy=os.environ.get("OMP_WAIT_POLICY"))
    elif ns.inline_sweep:
        print(f"load average {load0[0]:.2f} at start")
        rows = inline_sweep(ns)
        print(f"load average {os.getloadavg()[0]:.2f} at end")
        header = dict(load_average_start=load0, load_average_end=os.getloadavg())
    elif ns.cuda:
        rows = bench_cuda(ns)
        print(f"{'geometry':>10} {'dtype':>9} {'ctx':>5} {'KV GB/s':>8} {'copy GB/s':>9} {'ratio':>6} "
              f"{'ms':>8} {'err':>8}")
        for r in rows:
            err = f"{r['max_abs_err']:8.1e}" if r["max_abs_err"] is not None else f"{'-':>8}"
            print(f"{r['geometry']:>10} {r['dtype']:>9} {r['context']:>5} {r['kv_gbps']:8.1f} "
                  f"{r['d2d_copy_gbps']:9.1f} {r['ratio_to_copy']:6.2f} {r['ms']:8.3f} {err}")
        header = {}
    else:
        import numba

        from lamina_kernels.simd import dpbf16_enabled_now
        from lamina_kernels.widen16 import HOST_AVX512_BF16

        t0 = time.time()
        rows, skipped, n_threads = bench_cpu(ns)
        fr = [r["pool_huge_page_fraction"] for r in rows if r["pool_huge_page_fraction"] is not None]
        header = dict(threads=n_threads, svml=bool(numba.config.USING_SVML), block_size=ns.block_size, flush_mb=ns.flush_mb,
                      pool_huge_page_fraction_min=min(fr) if fr else None,
                      avx512_bf16_on_host=HOST_AVX512_BF16, bf16_dot_products=dpbf16_enabled_now(), load_average_start=load0, load_average_end=os.getloadavg(),
                      seconds=time.time() - t0, skipped=skipped)
        print(f"threads {n_threads}, SVML {header['svml']}, avx512_bf16 on host {HOST_AVX512_BF16} "
              f"(bf16 QK on {'vdpbf16ps' if dpbf16_enabled_now() else 'f32 FMAs'}), "
              f"load average {load0[0]:.2f} at start, {header['load_average_end'][0]:.2f} at end; "
              f"STREAM and FMA peak measured in each case's round-robin; block size {ns.block_size}; "
              f"{ns.flush_mb} MB read before each kernel call; "
              f"K pools on huge pages: {_pct(fr)}")
        print(_HEADER)
        print(f"run's best STREAM {rows[0]['stream_best_gbps']:.1f} GB/s, best FMA peak "
              f"{rows[0]['fma_peak_best_gflops']:.0f} GFLOP/s (the last two columns use them)"
              if rows else "no rows")
        for r in rows:
            print(_fmt_row(r))
        for s in skipped:
            print(f"skipped: {s}")
    if ns.json:
        with open(ns.json, "w") as f:
            json.dump(dict(header=header, rows=rows), f, indent=1)


if __name__ == "__main__":
    sys.exit(main())

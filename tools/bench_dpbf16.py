"""A/B of the bfloat16 dot-product QK (vdpbf16ps, lamina_kernels.simd.vdpbf16) against the
float32-widening tiles, in one run.

    python tools/bench_dpbf16.py [--geometry HQ/HKV/D ...] [--contexts 512,2048] [--batch 1,16]
                                 [--modes decode,prefill] [--threads 2] [--json FILE]

For each case (bfloat16 pool) the same call is timed with the path off and on, alternating
call by call (the order swapped every round: both see the same background load on a shared
machine), then the STREAM read of tools/bench_kernels.py (the run's best is the ceiling): best
and median time of each, KV GB/s of the best, the fraction of the run's best STREAM, and off/on of
the best and of the medians (> 1: the dot products are faster). --flush-mb N reads N MB
before every timed call (not timed): the pool then comes from DRAM, as in the engine where a
step's weights pass between two calls of a layer; 0 (default) times repeated calls, whose
small cases stay in the caches. The flag is the process's (simd.set_dpbf16), set before each
timed call. Also the largest |on - off| of the outputs and each one's error against the
float64 torch reference (small cases). Pools are as bench_kernels.make_case's.
"""

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_kernels import (_csv_ints, _stream_array, case_cost, make_case, parse_geometry,  # noqa: E402
                           reference_error)

GEOMETRIES = ("9/3/64", "32/8/128", "28/4/128", "32/4/64", "32/32/128", "8/8/64")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--geometry", action="append", type=parse_geometry,
                    help=f"HQ/HKV/D, repeatable (default: {' '.join(GEOMETRIES)})")
    ap.add_argument("--contexts", type=_csv_ints, default=(512, 2048))
    ap.add_argument("--batch", type=_csv_ints, default=(16, 1), help="decode batch sizes")
    ap.add_argument("--modes", default="decode", help="decode,prefill")
    ap.add_argument("--chunk", type=int, default=256, help="prefill: new tokens per call (batch 1)")
    ap.add_argument("--threads", type=int, default=0, help="numba threads (default: all)")
    ap.add_argument("--reps", type=int, default=15, help="rounds (at least)")
    ap.add_argument("--min-time", type=float, default=0.5, help="seconds of timed calls per variant (at least)")
    ap.add_argument("--flush-mb", type=int, default=0, help="MB read before every timed call (0: none)")
    ap.add_argument("--json", metavar="FILE")
    ns = ap.parse_args()
    geoms = ns.geometry or [parse_geometry(g) for g in GEOMETRIES]

    import numba

    from lamina_kernels import append_attend, simd, warmup

    if ns.threads:
        numba.set_num_threads(ns.threads)
    warmup()
    if not simd.TARGET_BF16:
        print("note: Numba's target has no avx512_bf16: 'on' runs the path on float32 FMAs")
    psum, stream_arr = _stream_array(512 << 20)
    flush = np.ones(max(ns.flush_mb, 0) << 18, np.float32)
    stream_best = [0.0]

    def timed(fn):
        if flush.size:
            flush.sum()
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    def ab(run):
        """Times of run(False) and run(True), alternating; then three STREAM reads (not
        between the calls: it would leave every other call cold)."""
        ts = {False: [], True: []}
        n = 0
        while n < ns.reps or min(sum(v) for v in ts.values()) < ns.min_time:
            for on in ((False, True) if n % 2 == 0 else (True, False)):
                ts[on].append(timed(lambda: run(on)))
            n += 1
        for _ in range(3):
            t0 = time.perf_counter()
            psum(stream_arr)
            stream_best[0] = max(stream_best[0], stream_arr.nbytes / (time.perf_counter() - t0) / 1e9)
        return ts

    rng = np.random.default_rng(0)
    rows = []
    load0 = os.getloadavg()[0]
    for mode in ns.modes.split(","):
        n_new = 1 if mode == "decode" else ns.chunk
        for geom in geoms:
            for batch in (ns.batch if mode == "decode" else (1,)):
                for ctx in ns.contexts:
                    a = make_case(geom, "bfloat16", batch, ctx, n_new, rng)
                    outs = {}

                    def run(on, a=a):
                        simd.set_dpbf16(on)
                        return append_attend(**a)

                    for on in (False, True):
                        outs[on] = run(on)[0]
                    ts = ab(run)
                    t_off, t_on = min(ts[False]), min(ts[True])
                    med_off, med_on = float(np.median(ts[False])), float(np.median(ts[True]))
                    nbytes, _ = case_cost(geom, "bfloat16", batch, ctx, n_new)
                    small = nbytes <= 64e6
                    rows.append(dict(
                        mode=mode, geometry="/".join(map(str, geom)), group=geom[0] // geom[1], batch=batch,
                        context=ctx, flush_mb=ns.flush_mb, us_off=t_off * 1e6, us_on=t_on * 1e6,
                        us_med_off=med_off * 1e6, us_med_on=med_on * 1e6, gbps_off=nbytes / t_off / 1e9,
                        gbps_on=nbytes / t_on / 1e9, off_over_on=t_off / t_on, med_off_over_on=med_off / med_on,
                        max_abs_on_minus_off=float(np.abs(outs[True] - outs[False]).max()),
                        err_off=reference_error(a, outs[False], geom) if small else None,
                        err_on=reference_error(a, outs[True], geom) if small else None))
                    r = rows[-1]
                    print(f"{mode:>7} {r['geometry']:>9} G{r['group']} B{batch:<2} ctx {ctx:5}: off {r['us_off']:9.1f} us "
                          f"(median {r['us_med_off']:9.1f}) | on {r['us_on']:9.1f} us (median {r['us_med_on']:9.1f}) | "
                          f"off/on {r['off_over_on']:.3f}", file=sys.stderr, flush=True)
                    del a, outs
    simd.set_dpbf16(simd.dpbf16_default())
    sb = stream_best[0]
    print(f"threads {numba.get_num_threads()}, target avx512_bf16 {simd.TARGET_BF16}, flush {ns.flush_mb} MB, "
          f"load average {load0:.2f} at start, {os.getloadavg()[0]:.2f} at end; run's best STREAM {sb:.1f} GB/s")
    print(f"{'mode':>7} {'geometry':>9} {'G':>2} {'B':>3} {'ctx':>5} {'us off':>9} {'us on':>9} {'GB/s off':>8} "
          f"{'GB/s on':>8} {'÷ST off':>7} {'÷ST on':>7} {'off/on':>7} {'med o/o':>7} {'|on-off|':>8} "
          f"{'err off':>8} {'err on':>8}")
    for r in rows:
        def e(x):
            return f"{x:8.1e}" if x is not None else f"{'-':>8}"
        print(f"{r['mode']:>7} {r['geometry']:>9} {r['group']:>2} {r['batch']:>3} {r['context']:>5} {r['us_off']:9.1f} "
              f"{r['us_on']:9.1f} {r['gbps_off']:8.2f} {r['gbps_on']:8.2f} {r['gbps_off'] / sb:7.2f} "
              f"{r['gbps_on'] / sb:7.2f} {r['off_over_on']:7.3f} {r['med_off_over_on']:7.3f} "
              f"{r['max_abs_on_minus_off']:8.1e} {e(r['err_off'])} {e(r['err_on'])}")
    if ns.json:
        with open(ns.json, "w") as f:
            json.dump(dict(best_stream_gbps=sb, threads=numba.get_num_threads(), rows=rows), f, indent=1)


if __name__ == "__main__":
    sys.exit(main())

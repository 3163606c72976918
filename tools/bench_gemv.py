"""The fused bfloat16 GEMV's weight-read rate per batch row count, against STREAM read in the same run.

A decode step reads every weight once; what decides batch-1 speed is how close the GEMV streams them to the
machine's read bandwidth. This runs the kernel the engine runs (`gemv_pairs.block` over every 16-output block:
the pair layout with vdpbf16ps where the CPU has AVX512-BF16, and the widened layout of `gemv.pack`) over one
packed matrix much larger than the last-level cache (default 256 MB, input width 576: SmolLM2's), so each call
reads it from DRAM, on one thread (`fused.norm_linear_f32`'s serial loop) and on two (the spin pool the engine's
dense layers use), both with the RMSNorm of the input the LM head's call does (a few microseconds).
GB/s = weight bytes / median seconds a call; STREAM = a parallel sum over 512 MB, all threads (bench_kernels).

--reuse-mb N (one thread): the matrix cut into layer-sized slices of N MB, each called twice in a row, the first
call from DRAM: how much of one layer's weights the caches keep for a second micro-batch's pass straight after
(a cluster's compute peer at M = 2 reads every layer twice a step). second ÷ first = 1: nothing kept.

    python tools/bench_gemv.py [--rows 1,2,4,8,16] [--mb 256] [--k-in 576] [--reps 5] [--reuse-mb 7] [--json [FILE]]
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import benchlib


def _median_s(fn, reps: int) -> float:
    fn()  # compile and fault in
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return benchlib.median(ts)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="1,2,4,8,16", help="batch row counts (comma-separated)")
    ap.add_argument("--mb", type=int, default=256, help="weight megabytes (keep well above the last-level cache)")
    ap.add_argument("--k-in", type=int, default=576, help="input width (even)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--reuse-mb", type=float, default=0.0,
                    help="also time layer-sized slices of this many MB twice in a row, one thread (0: off)")
    ap.add_argument("--json", nargs="?", const="-", default=None, help="print one JSON object (or write it to FILE)")
    args = ap.parse_args(argv)
    from lamina_kernels.simd import dpbf16_default
    from lamina_p2p.model import fused
    from lamina_p2p.model import spin_pool as sp
    from lamina_p2p.model.gemv import BLOCK
    from lamina_p2p.model.gemv_pairs import pack_pairs

    k_in = args.k_in
    nb = max(2, (args.mb << 20) // (k_in * BLOCK * 2))
    plain = np.full((nb, k_in, BLOCK), 0x3F80, np.int16)  # bfloat16 1.0: real data, not the zero page
    layouts = {"pairs": pack_pairs(plain), "widened": plain}
    bias = np.zeros(nb * BLOCK, np.float32)
    norm_w = np.full(k_in, 0x3F80, np.int16)
    pool = sp.shared(2)
    rows_list = [int(r) for r in args.rows.split(",")]
    results = []
    for rows in rows_list:
        x = np.full((rows, k_in), 0x3F80, np.int16)
        out = np.empty((rows, nb * BLOCK), np.float32)
        for name, wb in layouts.items():
            # One thread: the serial loop over the blocks (the LM head's call on a one-thread compute process).
            one = _median_s(lambda: fused.norm_linear_f32(x, norm_w, np.float32(1e-5), wb, bias, out, False),
                            args.reps)

            def two():
                pool.lock.acquire()
                try:
                    pool.run(sp.pool_norm_linear, x, norm_w, np.float32(1e-5), True, wb, bias, out, False)
                finally:
                    pool.lock.release()

            results.append(dict(rows=rows, layout=name, one_thread_gbps=wb.nbytes / one / 1e9,
                                two_threads_gbps=wb.nbytes / _median_s(two, args.reps) / 1e9))
    reuse = _reuse(layouts["pairs"], k_in, rows_list, args.reuse_mb, norm_w) if args.reuse_mb > 0 else []
    stream = benchlib.stream_read_gbps(512 << 20, 5)
    report = dict(weight_mb=plain.nbytes / 2**20, k_in=k_in, avx512_bf16=bool(dpbf16_default()),
                  stream_read_gbps=stream, results=results, reuse=reuse)
    print(f"weights {report['weight_mb']:.0f} MB, input width {k_in}, avx512_bf16 {report['avx512_bf16']}, "
          f"STREAM read {stream:.1f} GB/s", file=sys.stderr)
    print(f"{'rows':>5} {'layout':>8} {'1 thread GB/s':>14} {'2 threads GB/s':>15} {'÷ STREAM':>9}", file=sys.stderr)
    for r in results:
        print(f"{r['rows']:>5} {r['layout']:>8} {r['one_thread_gbps']:>14.1f} {r['two_threads_gbps']:>15.1f} "
              f"{r['two_threads_gbps'] / stream:>9.2f}", file=sys.stderr)
    if reuse:
        print(f"one thread, slices of {args.reuse_mb:g} MB each called twice in a row (first from DRAM), median us:",
              file=sys.stderr)
        print(f"{'rows':>5} {'first':>8} {'second':>8} {'second ÷ first':>15}", file=sys.stderr)
        for r in reuse:
            print(f"{r['rows']:>5} {r['first_us']:>8.0f} {r['second_us']:>8.0f} {r['second_us'] / r['first_us']:>15.2f}",
                  file=sys.stderr)
    if args.json is not None:
        benchlib.emit_json(report, args.json)
    return report


def _reuse(wb, k_in: int, rows_list: list[int], slice_mb: float, norm_w) -> list[dict]:
    """Per row count: median microseconds of the first and the second of two back-to-back calls on each
    slice of `slice_mb` MB of `wb` (the slices in order, so each first call reads its slice from DRAM)."""
    from lamina_p2p.model import fused

    per = max(1, int(slice_mb * 2**20) // wb[0].nbytes)  # 16-output blocks a slice
    slices = [wb[s:s + per] for s in range(0, wb.shape[0] - per + 1, per)]
    bias = np.zeros(per * 16, np.float32)
    out = []
    for rows in rows_list:
        x = np.full((rows, k_in), 0x3F80, np.int16)
        y = np.empty((rows, per * 16), np.float32)
        call = lambda w: fused.norm_linear_f32(x, norm_w, np.float32(1e-5), w, bias, y, False)  # noqa: E731
        call(slices[0])  # compile
        first, second = [], []
        for w in slices:
            for times in (first, second):
                t0 = time.perf_counter()
                call(w)
                times.append(time.perf_counter() - t0)
        out.append(dict(rows=rows, slice_mb=per * wb[0].nbytes / 2**20, first_us=benchlib.median(first) * 1e6,
                        second_us=benchlib.median(second) * 1e6))
    return out


if __name__ == "__main__":
    main()

"""Can one core overlap an attention tile loop's arithmetic with its DRAM stream?

The decode kernel (kernels/lamina_kernels/tiles.py) reads each KV block once and does a few FMAs per loaded vector. Its
rate from DRAM has measured close to (its in-cache time) + (its bytes at the one-thread read rate) instead of
the larger of the two: the arithmetic and the memory stream add. This tool asks whether that is the
kernel's doing or the core's, with loops that read exactly what the kernel reads -- scattered 64-key blocks
of float32 K and V at head_dim 128 (1 KiB a key), walked in 16-key chunks, K then V -- on one thread:

  read      the loads alone (a running sum)
  latency   the loads, each feeding a chain of dependent FMAs: arithmetic the core waits on, not throughput
  tile      the kernel's shape at GQA group 4: QK four query rows x four keys (16 accumulators, one
            transposed fold), PV four rows x 64 columns in registers -- throughput-bound arithmetic
  kernel    lamina_kernels.append_attend itself: from DRAM batch 16 x 8 kv heads of group 4 at --kernel-context
            (random block table); in L2 the slope between two contexts of one kv head (the call's fixed cost
            drops out)

each with software prefetch of the next block at the chunk's offset (one line per line read) with the
L2 hint (prefetcht2, the kernel's), non-temporal (prefetchnta), or none, from DRAM (a pool far above the
last-level cache) and from L2 (a pool of 512 KiB). overlap = (L2 + read from DRAM - DRAM) / min(L2, read
from DRAM): 1 when the longer of the two hides the other, 0 when they add.

    python tools/bench_tile_overlap.py [--dram-mb 256] [--reps 3] [--no-kernel] [--json [FILE]] [--plot DIR]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from numba import njit

import benchlib
from bench_kernels import best_time
from lamina_kernels.simd import (prefetch, prefetch_nta, vadd, vfma, vhsum, vload, vsplat, vstore, vstore4, vsum16,
                                 vzero)

D, BS, CHUNK = 128, 64, 16
PREFETCH = {"none": 0, "l2": 1, "nta": 2}


@njit(inline="always", nogil=True)
def _pf(a, i, mode):
    if mode == 1:
        prefetch(a, i)
    elif mode == 2:
        prefetch_nta(a, i)


@njit(inline="always", nogil=True)
def _store4(acc, o, e0, e1, e2, e3):
    vstore(acc, o, e0)
    vstore(acc, o + 16, e1)
    vstore(acc, o + 32, e2)
    vstore(acc, o + 48, e3)


@njit(nogil=True, fastmath=True, error_model="numpy")
def _walk(k, v, table, qs, s, acc, loop, mode):
    """One pass over the blocks of `table` in order; loop 0 read, 1 latency, 2 tile. Returns a checksum."""
    nb = table.shape[0]
    one = vsplat(np.float32(1.0001))
    a0 = a1 = vzero()
    for r in range(4 * D):
        acc[r] = 0.0
    for bi in range(nb):
        nxt = table[(bi + 1) % nb]
        for t0 in range(0, BS, CHUNK):
            row0 = (table[bi] * BS + t0) * D
            pf = (nxt * BS + t0) * D
            if loop != 2:
                for src in (k, v):
                    for o in range(0, CHUNK * D, 16):
                        _pf(src, pf + o, mode)
                        x = vload(src, row0 + o)
                        a0 = vadd(a0, x)
                        if loop == 1:
                            a1 = vfma(vfma(vfma(a1, x, one), x, one), x, one)
                continue
            t = 0
            while t < CHUNK:  # QK: 4 rows x 4 keys, K lines read once for the four rows
                c0 = c1 = c2 = c3 = c4 = c5 = c6 = c7 = c8 = c9 = c10 = c11 = c12 = c13 = c14 = c15 = vzero()
                o = row0 + t * D
                for c in range(0, D, 16):
                    for j in range(4):
                        _pf(k, pf + (t + j) * D + c, mode)
                    q0, q1, q2, q3 = vload(qs, c), vload(qs, D + c), vload(qs, 2 * D + c), vload(qs, 3 * D + c)
                    x = vload(k, o + c)
                    c0, c4, c8, c12 = vfma(q0, x, c0), vfma(q1, x, c4), vfma(q2, x, c8), vfma(q3, x, c12)
                    x = vload(k, o + D + c)
                    c1, c5, c9, c13 = vfma(q0, x, c1), vfma(q1, x, c5), vfma(q2, x, c9), vfma(q3, x, c13)
                    x = vload(k, o + 2 * D + c)
                    c2, c6, c10, c14 = vfma(q0, x, c2), vfma(q1, x, c6), vfma(q2, x, c10), vfma(q3, x, c14)
                    x = vload(k, o + 3 * D + c)
                    c3, c7, c11, c15 = vfma(q0, x, c3), vfma(q1, x, c7), vfma(q2, x, c11), vfma(q3, x, c15)
                sv = vsum16(c0, c1, c2, c3, c4, c5, c6, c7, c8, c9, c10, c11, c12, c13, c14, c15)
                vstore4(s, t, sv, 0)
                vstore4(s, CHUNK + t, sv, 1)
                vstore4(s, 2 * CHUNK + t, sv, 2)
                vstore4(s, 3 * CHUNK + t, sv, 3)
                t += 4
            for c in range(0, D, 64):  # PV: 4 rows x 64 columns in registers over the chunk's keys
                x0, x1, x2, x3 = vload(acc, c), vload(acc, c + 16), vload(acc, c + 32), vload(acc, c + 48)
                y0, y1, y2, y3 = vload(acc, D + c), vload(acc, D + c + 16), vload(acc, D + c + 32), vload(acc, D + c + 48)
                z0, z1, z2, z3 = (vload(acc, 2 * D + c), vload(acc, 2 * D + c + 16), vload(acc, 2 * D + c + 32),
                                  vload(acc, 2 * D + c + 48))
                u0, u1, u2, u3 = (vload(acc, 3 * D + c), vload(acc, 3 * D + c + 16), vload(acc, 3 * D + c + 32),
                                  vload(acc, 3 * D + c + 48))
                for t in range(CHUNK):
                    for x in range(0, 64, 16):
                        _pf(v, pf + t * D + c + x, mode)
                    p0, p1 = vsplat(s[t] * 1e-6), vsplat(s[CHUNK + t] * 1e-6)
                    p2, p3 = vsplat(s[2 * CHUNK + t] * 1e-6), vsplat(s[3 * CHUNK + t] * 1e-6)
                    o = row0 + t * D + c
                    w = vload(v, o)
                    x0, y0, z0, u0 = vfma(w, p0, x0), vfma(w, p1, y0), vfma(w, p2, z0), vfma(w, p3, u0)
                    w = vload(v, o + 16)
                    x1, y1, z1, u1 = vfma(w, p0, x1), vfma(w, p1, y1), vfma(w, p2, z1), vfma(w, p3, u1)
                    w = vload(v, o + 32)
                    x2, y2, z2, u2 = vfma(w, p0, x2), vfma(w, p1, y2), vfma(w, p2, z2), vfma(w, p3, u2)
                    w = vload(v, o + 48)
                    x3, y3, z3, u3 = vfma(w, p0, x3), vfma(w, p1, y3), vfma(w, p2, z3), vfma(w, p3, u3)
                _store4(acc, c, x0, x1, x2, x3)
                _store4(acc, D + c, y0, y1, y2, y3)
                _store4(acc, 2 * D + c, z0, z1, z2, z3)
                _store4(acc, 3 * D + c, u0, u1, u2, u3)
    return vhsum(vadd(a0, a1)) + acc[0]


def _ns_per_key(n_blocks: int, loop: int, mode: int, reps: int, seed: int = 0) -> float:
    rng = np.random.default_rng(seed)
    k = (rng.standard_normal(n_blocks * BS * D) * 0.01).astype(np.float32)
    v = np.ones_like(k)
    table = rng.permutation(n_blocks).astype(np.int64)
    qs, s, acc = np.ones(4 * D, np.float32), np.zeros(4 * CHUNK, np.float32), np.zeros(4 * D, np.float32)
    best = best_time(lambda: _walk(k, v, table, qs, s, acc, loop, mode), reps)  # its warm call compiles, faults in
    return best / (n_blocks * BS) * 1e9


def _kernel_s(batch: int, hkv: int, context: int, reps: int) -> float:
    """Best seconds of append_attend on one thread (sets Numba's thread count to 1), batch x hkv kv heads of
    group 4 at head_dim 128, float32, attend only (no appended rows), blocks in random order."""
    import numba

    from lamina_kernels import append_attend

    numba.set_num_threads(1)
    hq = 4 * hkv
    nb = -(-context // BS)
    rng = np.random.default_rng(0)
    k_pool = (rng.standard_normal((1, batch * hkv * nb, BS, D)) * 0.5).astype(np.float32)
    v_pool = rng.standard_normal(k_pool.shape).astype(np.float32)
    table = rng.permutation(k_pool.shape[1]).astype(np.int32).reshape(batch, hkv, nb)
    q = rng.standard_normal((batch, hq, D)).astype(np.float32)
    none = np.zeros((0, hkv, D), np.float32)
    args = (q, none, none, k_pool, v_pool, table, np.arange(batch, dtype=np.int32),
            np.arange(batch + 1, dtype=np.int32), np.zeros(batch + 1, np.int32), np.full(batch, context, np.int32),
            0, D ** -0.5, "float32")
    return best_time(lambda: append_attend(*args), reps)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dram-mb", type=int, default=256, help="K + V MiB of the DRAM pool (well above the LLC)")
    ap.add_argument("--l2-kb", type=int, default=512, help="K + V KiB of the in-cache pool")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--no-kernel", action="store_true", help="skip the append_attend row")
    ap.add_argument("--kernel-context", type=int, default=2048)
    ap.add_argument("--json", nargs="?", const="-", default=None, help="print one JSON object (or write it to FILE)")
    ap.add_argument("--plot", default=None, help="directory for tile_overlap.png")
    ns = ap.parse_args(argv)
    key_bytes = 2 * D * 4
    dram_blocks = max(2, (ns.dram_mb << 20) // (BS * key_bytes))
    l2_blocks = max(2, (ns.l2_kb << 10) // (BS * key_bytes))
    l2_reps = max(ns.reps, (dram_blocks // l2_blocks) // 8)
    rows = []
    for loop, name in enumerate(("read", "latency", "tile")):
        for pf, mode in PREFETCH.items():
            rows.append({"loop": name, "prefetch": pf, "dram_ns_per_key": _ns_per_key(dram_blocks, loop, mode, ns.reps),
                         "l2_ns_per_key": _ns_per_key(l2_blocks, loop, mode, l2_reps)})
    read_dram = min(r["dram_ns_per_key"] for r in rows if r["loop"] == "read")
    for r in rows:
        if r["loop"] != "read":
            hidden = r["l2_ns_per_key"] + read_dram - r["dram_ns_per_key"]
            r["overlap"] = max(0.0, hidden) / min(r["l2_ns_per_key"], read_dram)
    if not ns.no_kernel:
        # In cache: the slope between two contexts of one kv head (the call's fixed cost drops out).
        c2 = max(2 * BS, (ns.l2_kb << 10) // key_bytes // BS * BS)
        c1 = max(BS, c2 // 4 // BS * BS)
        reps = max(50, 20 * l2_reps)
        hot = (_kernel_s(1, 1, c2, reps) - _kernel_s(1, 1, c1, reps)) / (c2 - c1) * 1e9
        cold = _kernel_s(16, 8, ns.kernel_context, ns.reps) / (16 * 8 * ns.kernel_context) * 1e9
        rows.append({"loop": "kernel", "prefetch": "l2", "dram_ns_per_key": cold, "l2_ns_per_key": hot,
                     "overlap": max(0.0, hot + read_dram - cold) / min(hot, read_dram)})
    res = {"head_dim": D, "block_size": BS, "bytes_per_key": key_bytes, "dram_mb": ns.dram_mb, "l2_kb": ns.l2_kb,
           "read_dram_ns_per_key": read_dram, "read_dram_gbps": key_bytes / read_dram, "rows": rows}
    if ns.json:
        benchlib.emit_json(res, ns.json)
    if ns.plot:
        _plot(Path(ns.plot) / "tile_overlap.png", rows)
    if ns.json != "-":
        print(f"one thread, float32 K + V at head_dim {D} ({key_bytes} B a key), 64-key blocks in random order; "
              f"best plain read from DRAM {read_dram:.1f} ns a key ({key_bytes / read_dram:.1f} GB/s)")
        print(f"{'loop':>8} {'prefetch':>8} {'DRAM ns/key':>12} {'L2 ns/key':>10} {'overlap':>8}")
        for r in rows:
            ov = f"{r['overlap']:8.2f}" if "overlap" in r else f"{'-':>8}"
            print(f"{r['loop']:>8} {r['prefetch']:>8} {r['dram_ns_per_key']:12.1f} {r['l2_ns_per_key']:10.1f} {ov}")
    return res


def _plot(path: Path, rows: list[dict]) -> None:
    """Grouped bars: ns a key from DRAM and from L2 per (loop, prefetch)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(9, 4.5))
    ax.bar(x - 0.2, [r["dram_ns_per_key"] for r in rows], 0.4, label="from DRAM")
    ax.bar(x + 0.2, [r["l2_ns_per_key"] for r in rows], 0.4, label="from L2")
    ax.set_xticks(x, [f"{r['loop']}\n{r['prefetch']}" for r in rows], fontsize=8)
    ax.set_ylabel("ns a key (K + V)")
    ax.set_title("one thread: tile-loop arithmetic against its DRAM stream")
    ax.grid(axis="y", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()

"""The compute side's CPU time per attend on the stream data path, with the caches flushed (issue 11).

In the pipeline each layer's attend is sent after the dense thread streamed a layer's weights through
the caches, and its reply is read after the next micro-batch's dense work did the same: the Python
between the syscalls then runs at 2-5x its warm cost. This times exactly that, and only the compute
side: a real StreamLink to a real KernelThread in another process (which answers at once with
out/lse of the right shapes), a buffer of one layer's weight bytes copied before the send and again
before the receive (the reply is there by then), and the thread's CPU time (time.thread_time) around
`send_attend` and around `receive`, so that other work on the machine enters the figures far less
than it enters wall time. Medians and 10th percentiles in microseconds.

    python tools/bench_link_cpu.py [--batch 1 16] [--reps 300] [--json [FILE]]

SmolLM2-135M's shapes (9 query / 3 KV heads, head_dim 64, bf16 as uint16 bits) unless --heads/--head-dim.
Pinned: this process on CPU 0, the peer on CPU 1 (where there are two).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

import numpy as np

import benchlib

SMOLLM2_LAYER_BYTES = 7_077_888  # one decoder layer's projection weights in bf16


def _peer(batch: int, num_heads: int, head_dim: int, cpu: int | None) -> None:
    """The other process: a kernel thread that answers every attend with zeros of the reply's shapes."""
    import zmq

    from lamina_p2p.net.kernel_thread import KernelThread

    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    out = np.zeros((batch, num_heads, head_dim), np.float32)
    lse = np.zeros((batch, num_heads), np.float32)
    kt = KernelThread(zmq.Context(), "tcp://127.0.0.1", lambda msg, arrived: ({}, [out.copy(), lse.copy()]),
                      busy_poll_us=2000)
    kt.start()
    print(kt.stream_endpoint, flush=True)
    sys.stdin.read()  # until the parent closes it
    kt.stop()


def measure(batch: int, num_heads: int, num_kv_heads: int, head_dim: int, layer_bytes: int, reps: int) -> dict:
    from lamina_p2p.net.datapath import StreamLink

    cpus = sorted(os.sched_getaffinity(0))
    two = len(cpus) >= 2
    peer = subprocess.Popen([sys.executable, __file__, "--_peer", str(batch), str(num_heads), str(head_dim),
                             str(cpus[1] if two else -1)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        endpoint = peer.stdout.readline().strip()
        if two:
            os.sched_setaffinity(0, {cpus[0]})
        link = StreamLink(endpoint, busy_poll_us=2000)
        weights = np.ones(max(layer_bytes, 1), np.uint8)
        streamed = np.empty_like(weights)
        meta = np.zeros((batch, 4), np.int64)
        q = np.zeros((batch, num_heads, head_dim), np.uint16)
        kv = np.zeros((batch, num_kv_heads, head_dim), np.uint16)
        send, receive = [], []
        for i in range(reps + 20):
            np.copyto(streamed, weights)  # the dense work before the send
            t0 = time.thread_time()
            rid = link.send_attend("layer-path-owner", 3, 0, num_kv_heads, meta, q, kv, kv, timeout_s=10)
            t1 = time.thread_time()
            np.copyto(streamed, weights)  # the other micro-batch's dense work: the reply arrives meanwhile
            t2 = time.thread_time()
            link.receive(rid, time.monotonic() + 10)
            t3 = time.thread_time()
            if i >= 20:  # (first calls: imports, allocations)
                send.append((t1 - t0) * 1e6)
                receive.append((t3 - t2) * 1e6)
        link.close()
    finally:
        peer.stdin.close()
        peer.wait(30)

    def stats(xs: list[float]) -> dict:
        return {"median_us": round(statistics.median(xs), 1), "p10_us": round(sorted(xs)[len(xs) // 10], 1)}

    return {"batch": batch, "send": stats(send), "receive": stats(receive), "layer_weight_bytes": layer_bytes}


def main(argv=None) -> dict:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--_peer":
        b, h, d, cpu = (int(x) for x in sys.argv[2:6])
        _peer(b, h, d, cpu if cpu >= 0 else None)
        return {}
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--heads", default="9/3", help="query/KV heads (default SmolLM2's 9/3)")
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--layer-bytes", type=int, default=SMOLLM2_LAYER_BYTES,
                    help="bytes streamed through the caches before each send and each receive")
    ap.add_argument("--reps", type=int, default=300)
    ap.add_argument("--json", nargs="?", const="-", default=None, help="write the results here (- or bare: stdout)")
    args = ap.parse_args(argv)
    num_heads, num_kv_heads = (int(x) for x in args.heads.split("/"))
    rows = [measure(b, num_heads, num_kv_heads, args.head_dim, args.layer_bytes, args.reps) for b in args.batch]
    out = sys.stderr if args.json == "-" else sys.stdout
    print("compute side, thread CPU time per attend, caches flushed before each (us)", file=out)
    print(f"{'batch':>5} {'send med':>9} {'p10':>7} {'receive med':>12} {'p10':>7}", file=out)
    for r in rows:
        print(f"{r['batch']:>5} {r['send']['median_us']:>9} {r['send']['p10_us']:>7} "
              f"{r['receive']['median_us']:>12} {r['receive']['p10_us']:>7}", file=out)
    result = {"heads": args.heads, "head_dim": args.head_dim, "rows": rows}
    if args.json:
        benchlib.emit_json(result, args.json)
    return result


if __name__ == "__main__":
    main()

"""A decode step's attend and reply over a Unix stream socket: the cost of a write, by the size of its pieces.

Two processes, one per CPU (CPUs 0 and 1 where there are two), ping-pong messages of a batch-16 SmolLM2
attend (31 312 bytes) and its reply (37 496 bytes) through net/stream.py's `send_buffers` with
`UNIX_PIECE_BYTES` set to each size compared, both reading by busy-polling (as with --busy-poll-us). Between
messages each side reads --flush-mb MB (a layer's weights on the compute side, its KV on the peer), as in a
step. Sizes are interleaved round by round (the host moves: a run of slow writes lasts hundreds of messages).
Reported per size: median and p90 microseconds of one message's write on each side, and the round trip.

    python tools/bench_unix_send.py [--pieces 1048576,32768,16384,8192] [--messages 1500] [--rounds 3]
                                    [--flush-mb 7] [--json [FILE]]
"""

from __future__ import annotations

import argparse
import os
import select
import socket
import sys
import time

import numpy as np
import benchlib

REQUEST, REPLY = 31_312, 37_496


def _read(sock: socket.socket, n: int, buf: bytearray, poll) -> None:
    got, view = 0, memoryview(buf)
    while got < n:
        while not poll.poll(0):  # busy-poll, as the data path's both sides do
            pass
        try:
            n_read = sock.recv_into(view[got:n])
        except BlockingIOError:
            continue
        if n_read == 0:
            raise ConnectionError("the other side closed the socket")
        got += n_read


def _side(sock, cpu, first: bool, send_n: int, recv_n: int, messages: int, flush_mb: float) -> np.ndarray:
    """One side's loop; the seconds of each of its writes (and, for the first sender, each round trip)."""
    from lamina_p2p.net import stream

    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    out, buf = memoryview(bytes(send_n)), bytearray(recv_n)
    work = np.ones(max(int(flush_mb * 2**18), 1), np.float32)
    poll = select.poll()
    poll.register(sock, select.POLLIN)
    times = np.empty((messages, 2))
    for i in range(messages):
        if not first:
            _read(sock, recv_n, buf, poll)
        work.sum()  # the dense pass (compute) or the kernel's KV stream (peer) between two messages
        t0 = time.perf_counter()
        stream.send_buffers(sock, [out], 10.0)
        t1 = time.perf_counter()
        if first:
            _read(sock, recv_n, buf, poll)
        times[i] = t1 - t0, time.perf_counter() - t0
    return times


def exchange(piece: int, messages: int, flush_mb: float) -> dict:
    from lamina_p2p.net import stream

    stream.UNIX_PIECE_BYTES = piece  # (the child inherits it)
    cpus = sorted(os.sched_getaffinity(0))
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    stream.tune(a), stream.tune(b)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            a.close()
            t = _side(b, cpus[1] if len(cpus) > 1 else None, False, REPLY, REQUEST, messages, flush_mb)
            os.write(w, np.ascontiguousarray(t[:, 0]).tobytes())
            code = 0
        finally:
            os._exit(code)  # (closing the socket: the parent's read then fails instead of waiting)
    b.close(), os.close(w)  # (the child's end only: a read then ends when the child does)
    try:
        t = _side(a, cpus[0] if len(cpus) > 1 else None, True, REQUEST, REPLY, messages, flush_mb)
        raw = b""
        while len(raw) < messages * 8:
            chunk = os.read(r, messages * 8 - len(raw))
            if not chunk:
                raise RuntimeError("the peer process ended without its times")
            raw += chunk
        os.waitpid(pid, 0)
    finally:
        os.sched_setaffinity(0, set(cpus))
        a.close(), os.close(r)
    return {"compute_write_s": t[:, 0], "peer_write_s": np.frombuffer(raw, np.float64), "round_trip_s": t[:, 1]}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pieces", default="1048576,32768,16384,8192", help="piece sizes in bytes (comma-separated)")
    ap.add_argument("--messages", type=int, default=1500, help="round trips per size and round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--flush-mb", type=float, default=7.0, help="MB each side reads between two messages")
    ap.add_argument("--json", nargs="?", const="-", default=None, help="print one JSON object (or write it to FILE)")
    args = ap.parse_args(argv)
    pieces = [int(p) for p in args.pieces.split(",")]
    got = {p: {"compute_write_s": [], "peer_write_s": [], "round_trip_s": []} for p in pieces}
    for rnd in range(args.rounds):
        for p in pieces[rnd % len(pieces):] + pieces[:rnd % len(pieces)]:
            for k, v in exchange(p, args.messages, args.flush_mb).items():
                got[p][k].extend(v[args.messages // 10:].tolist())  # the first tenth: warming up
    rows = []
    for p in pieces:
        row = {"piece_bytes": p}
        for k, v in got[p].items():
            us = np.array(v) * 1e6
            row[k.replace("_s", "_us")] = {"median": float(np.median(us)), "p90": float(np.percentile(us, 90))}
        rows.append(row)
    print(f"request {REQUEST} B, reply {REPLY} B, {args.flush_mb:g} MB read on each side between messages, "
          f"{args.rounds} rounds x {args.messages} round trips a size", file=sys.stderr)
    print(f"{'piece B':>9} {'compute write us':>17} {'p90':>6} {'peer write us':>14} {'p90':>6} {'round trip us':>14}",
          file=sys.stderr)
    for r in rows:
        c, pw, rt = r["compute_write_us"], r["peer_write_us"], r["round_trip_us"]
        print(f"{r['piece_bytes']:>9} {c['median']:>17.1f} {c['p90']:>6.1f} {pw['median']:>14.1f} {pw['p90']:>6.1f} "
              f"{rt['median']:>14.1f}", file=sys.stderr)
    report = {"request_bytes": REQUEST, "reply_bytes": REPLY, "flush_mb": args.flush_mb, "rows": rows}
    if args.json is not None:
        benchlib.emit_json(report, args.json)
    return report


if __name__ == "__main__":
    main()

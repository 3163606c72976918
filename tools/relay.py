"""A TCP relay that emulates a network link: one-way delay and a rate, in both directions.

These kernels have no `netem` qdisc, so delay is added in user space (DESIGN.md s10). Every
chunk read from one side is held until

    deliver_at = link_free_at + delay,   link_free_at = max(now, link_free_at) + bytes / rate

and then written to the other side: chunks are pipelined (many in flight, like a real link),
order is kept, and each direction has its own pacer shared by all connections through the relay.

Why threads and not asyncio: the event loop's timers (epoll / libuv) have millisecond resolution,
so an asyncio relay cannot hold a chunk for 0.2 ms; time.sleep (clock_nanosleep) can, to within
~0.1 ms. Each direction of each connection is a reader thread and a writer thread; socket calls
release the GIL. Run it as its own process (`serve`) so it never competes with a peer's GIL.

    python tools/relay.py serve --target 127.0.0.1:5555 [--port 0] --delay-ms 1 --rate-gbit 1
        prints "READY <port>"; then reads commands on stdin: "delay <ms>", "rate <gbit|0>", "quit"
    python tools/relay.py check [--delay-ms 1] [--json]
        ping-pong through the relay against the same echo direct: added RTT must be ~2 x delay
"""

from __future__ import annotations

import argparse
import json
import queue
import socket
import sys
import threading
import time

CHUNK = 64 << 10


class Pacer:
    """One direction of the link: serialisation at `rate` then `delay` of propagation."""

    def __init__(self, relay: "Relay"):
        self.relay = relay
        self.free_at = 0.0
        self.lock = threading.Lock()

    def deliver_at(self, nbytes: int) -> float:
        now = time.perf_counter()
        rate = self.relay.rate_bps
        with self.lock:
            if rate:
                self.free_at = max(now, self.free_at) + nbytes * 8 / rate
                sent = self.free_at
            else:
                sent = now
        return sent + self.relay.delay_s


class Relay:
    def __init__(self, target: tuple[str, int], delay_s: float = 0.0, rate_bps: float | None = None,
                 listen: tuple[str, int] = ("127.0.0.1", 0), max_queued: int = 512):
        self.target = target
        self.delay_s = delay_s
        self.rate_bps = rate_bps
        self.max_queued = max_queued
        self.up, self.down = Pacer(self), Pacer(self)
        self.sock = socket.create_server(listen)
        self.port = self.sock.getsockname()[1]
        self.bytes = 0
        # Seconds each chunk left after its deliver_at (the sleep's wake-up and the scheduling of the
        # writer thread on a busy host): the delay the emulator adds beyond the link's.
        self.late: list[float] = []
        self._closed = threading.Event()
        self._conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True, name="relay-accept").start()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            for s in (client, server):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                self._conns.append(s)
            self._pipe(client, server, self.up)
            self._pipe(server, client, self.down)

    def _pipe(self, src: socket.socket, dst: socket.socket, pacer: Pacer) -> None:
        q: queue.Queue = queue.Queue(self.max_queued)  # bounded: a slow link pushes back on the sender

        def read():
            try:
                while True:
                    data = src.recv(CHUNK)
                    if not data:
                        break
                    q.put((pacer.deliver_at(len(data)), data))
            except OSError:
                pass
            q.put((0.0, None))

        def write():
            try:
                while True:
                    when, data = q.get()
                    if data is None:
                        dst.shutdown(socket.SHUT_WR)
                        return
                    wait = when - time.perf_counter()
                    if wait > 0:
                        time.sleep(wait)
                    if len(self.late) < 1 << 20:
                        self.late.append(time.perf_counter() - when)
                    dst.sendall(data)
                    self.bytes += len(data)
            except OSError:
                pass

        threading.Thread(target=read, daemon=True, name="relay-read").start()
        threading.Thread(target=write, daemon=True, name="relay-write").start()

    def close(self) -> None:
        self._closed.set()
        self.sock.close()
        for s in self._conns:
            try:
                s.close()
            except OSError:
                pass


# -- the self check: ping-pong against an echo, direct and through the relay -----------------------
def _echo_server() -> tuple[socket.socket, int]:
    srv = socket.create_server(("127.0.0.1", 0))

    def serve():
        while True:
            try:
                c, _ = srv.accept()
            except OSError:
                return
            c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

            def echo(c=c):
                try:
                    while data := c.recv(CHUNK):
                        c.sendall(data)
                except OSError:
                    pass
                c.close()

            threading.Thread(target=echo, daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    return srv, srv.getsockname()[1]


def _rtt(port: int, n: int, size: int = 64) -> float:
    """Median seconds for a `size`-byte ping to come back."""
    s = socket.create_connection(("127.0.0.1", port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    msg = b"x" * size
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        s.sendall(msg)
        got = 0
        while got < size:
            got += len(s.recv(CHUNK))
        times.append(time.perf_counter() - t0)
    s.close()
    times.sort()
    return times[len(times) // 2]


def _throughput(port: int, nbytes: int) -> float:
    """Bytes/s one way: send nbytes through the echo and read them back concurrently."""
    s = socket.create_connection(("127.0.0.1", port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buf = b"\0" * CHUNK
    t0 = time.perf_counter()

    def send():
        left = nbytes
        while left > 0:
            s.sendall(buf[:min(left, CHUNK)])
            left -= CHUNK

    th = threading.Thread(target=send)
    th.start()
    got = 0
    while got < nbytes:
        got += len(s.recv(1 << 20))
    dt = time.perf_counter() - t0
    th.join()
    s.close()
    return nbytes / dt


def check(delays_ms=(0.0, 0.2, 1.0, 5.0), rate_gbit: float | None = 1.0, n: int = 50,
          throughput_bytes: int = 32 << 20) -> dict:
    """Ping-pong through the relay at each delay: the added round trip should be ~2 x delay."""
    srv, port = _echo_server()
    base = _rtt(port, n)
    rows = []
    relay = Relay(("127.0.0.1", port), rate_bps=rate_gbit * 1e9 if rate_gbit else None)
    try:
        for d in delays_ms:
            relay.delay_s = d / 1e3
            rtt = _rtt(relay.port, n)
            rows.append({"delay_ms": d, "rtt_ms": rtt * 1e3, "added_ms": (rtt - base) * 1e3,
                         "expected_added_ms": 2 * d})
        relay.delay_s = 0.0
        tput = _throughput(relay.port, throughput_bytes) if throughput_bytes else None
    finally:
        relay.close()
        srv.close()
    return {"direct_rtt_ms": base * 1e3, "rate_gbit": rate_gbit, "rows": rows,
            "throughput_gbit": tput * 8 / 1e9 if tput else None}


def serve(args) -> None:
    host, port = args.target.rsplit(":", 1)
    relay = Relay((host, int(port)), args.delay_ms / 1e3, args.rate_gbit * 1e9 if args.rate_gbit else None,
                  listen=("127.0.0.1", args.port))
    print(f"READY {relay.port}", flush=True)
    for line in sys.stdin:  # commands; EOF (the parent went away) ends the relay too
        cmd, *rest = line.split()
        if cmd == "delay":
            relay.delay_s = float(rest[0]) / 1e3
        elif cmd == "rate":
            relay.rate_bps = float(rest[0]) * 1e9 or None
        elif cmd == "late":  # the chunks' lateness since the last "late": count, median and p90 in ms
            late, relay.late = sorted(relay.late), []
            rest = [str(len(late))] + [f"{late[int(f * (len(late) - 1))] * 1e3:.3f}" if late else "nan"
                                       for f in (0.5, 0.9)]
        elif cmd == "quit":
            break
        print(f"OK {cmd} {' '.join(rest)}", flush=True)
    relay.close()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--target", required=True, help="host:port the relay forwards to")
    s.add_argument("--port", type=int, default=0, help="listen port on 127.0.0.1 (0: any)")
    s.add_argument("--delay-ms", type=float, default=0.0, help="one-way delay")
    s.add_argument("--rate-gbit", type=float, default=1.0, help="per-direction rate, 0 = unlimited")
    c = sub.add_parser("check")
    c.add_argument("--delay-ms", type=float, nargs="+", default=[0.0, 0.2, 1.0, 5.0])
    c.add_argument("--rate-gbit", type=float, default=1.0)
    c.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if args.cmd == "serve":
        serve(args)
        return
    res = check(args.delay_ms, args.rate_gbit or None)
    if args.json:
        print(json.dumps(res, indent=2))
        return
    print(f"direct RTT {res['direct_rtt_ms']:.3f} ms; through the relay ({args.rate_gbit} Gbit/s):")
    for r in res["rows"]:
        print(f"  delay {r['delay_ms']:>5.2f} ms: RTT {r['rtt_ms']:7.3f} ms, added {r['added_ms']:7.3f} ms "
              f"(expected {r['expected_added_ms']:.2f})")
    if res["throughput_gbit"]:
        print(f"  bulk throughput through the relay: {res['throughput_gbit']:.2f} Gbit/s")


if __name__ == "__main__":
    main()

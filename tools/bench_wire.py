"""Wire benchmark: the project's message path against raw pyzmq on the same socket types.

Both sides are an echo over TCP loopback, DEALER -> ROUTER -> DEALER, in one uvloop process:
  raw      bare pyzmq: [small header, payload] sent with copy=False, echoed frames as received
  lamina   encode + RpcClient.call -> RpcServer handler -> reply with the same tensor (zero-copy)
Throughput is payload bytes echoed per second (one direction) with `depth` calls in flight;
round trips/s is for a 64-byte tensor with one call in flight. Ratios are what to read: both run
in the same process, on the same machine, in the same run.

    python tools/bench_wire.py [--json [out.json]] [--quick]    (bare --json: the JSON on stdout, table on stderr)
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time

import numpy as np
import uvloop
import zmq
import zmq.asyncio

from lamina_p2p.net.rpc import RpcClient, RpcServer

SIZES = [64 << 10, 256 << 10, 1 << 20, 4 << 20, 16 << 20]


async def _bounded(n: int, depth: int, one) -> float:
    """Run one() n times with at most depth in flight; return elapsed seconds."""
    sem = asyncio.Semaphore(depth)

    async def slot():
        async with sem:
            await one()

    t0 = time.perf_counter()
    await asyncio.gather(*(slot() for _ in range(n)))
    return time.perf_counter() - t0


async def bench_raw(ctx, payload: np.ndarray, n: int, depth: int) -> float:
    router = ctx.socket(zmq.ROUTER)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    dealer = ctx.socket(zmq.DEALER)
    dealer.connect(f"tcp://127.0.0.1:{port}")

    async def echo():
        while True:
            frames = await router.recv_multipart(copy=False)
            await router.send_multipart(frames, copy=False)

    waiting: dict[int, asyncio.Future] = {}

    async def receive():
        while True:
            frames = await dealer.recv_multipart(copy=False)
            waiting.pop(int.from_bytes(frames[0].bytes, "little")).set_result(frames)

    ids = iter(range(1 << 62))
    view = memoryview(payload.reshape(-1)).cast("B")

    async def one():
        rid = next(ids)
        fut = waiting[rid] = asyncio.get_running_loop().create_future()
        await dealer.send_multipart([rid.to_bytes(8, "little"), view], copy=False)
        await fut

    tasks = [asyncio.create_task(echo()), asyncio.create_task(receive())]
    try:
        await _bounded(max(2, depth), depth, one)  # warm-up: connection up, buffers allocated
        return await _bounded(n, depth, one)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        dealer.close(0)
        router.close(0)


async def bench_lamina(ctx, payload: np.ndarray, n: int, depth: int) -> float:
    server = RpcServer(ctx, "tcp://127.0.0.1:0")

    async def echo(msg):
        return {}, msg.tensors

    server.register("echo", echo)
    await server.start()
    client = RpcClient(ctx, server.bound_address)

    async def one():
        await client.call("echo", None, [payload], timeout_s=60)

    try:
        await _bounded(max(2, depth), depth, one)
        return await _bounded(n, depth, one)
    finally:
        await client.close()
        await server.close()


async def main(args) -> dict:
    ctx = zmq.asyncio.Context()
    rows = []
    sizes = SIZES[:3] if args.quick else SIZES
    for size in sizes:
        payload = np.random.default_rng(0).integers(0, 255, size, dtype=np.uint8)
        n = max(20, (64 << 20) // size) if not args.quick else 20
        row = {"bytes": size, "n": n, "depth": args.depth}
        for name, fn in (("raw", bench_raw), ("lamina", bench_lamina)):
            dt = await fn(ctx, payload, n, args.depth)
            row[f"{name}_GBps"] = size * n / dt / 1e9
        row["ratio"] = row["lamina_GBps"] / row["raw_GBps"]
        rows.append(row)
    n_small = 500 if args.quick else 3000
    rtts = []
    for nbytes in (64, 4096):  # 64 B: pure per-message cost; 4 KiB: about one decode token's q/k/v
        small = np.zeros(nbytes // 4, np.float32)
        rtt = {"bytes": small.nbytes, "n": n_small, "depth": 1}
        for name, fn in (("raw", bench_raw), ("lamina", bench_lamina)):
            rtt[f"{name}_rtps"] = n_small / await fn(ctx, small, n_small, 1)
        rtt["ratio"] = rtt["lamina_rtps"] / rtt["raw_rtps"]
        rtts.append(rtt)
    ctx.destroy(0)
    return {"throughput": rows, "round_trips": rtts[0], "round_trips_by_size": rtts}


def report(res: dict, file=None) -> None:
    print(f"{'size':>10} {'raw GB/s':>10} {'lamina GB/s':>12} {'ratio':>7}", file=file)
    for r in res["throughput"]:
        print(f"{r['bytes'] >> 10:>8}Ki {r['raw_GBps']:>10.2f} {r['lamina_GBps']:>12.2f} {r['ratio']:>7.2f}",
              file=file)
    for r in res["round_trips_by_size"]:
        print(f"{r['bytes']:>6} B round trips/s, 1 in flight: raw {r['raw_rtps']:.0f}  lamina "
              f"{r['lamina_rtps']:.0f}  ratio {r['ratio']:.2f}", file=file)
    mib = [r for r in res["throughput"] if r["bytes"] == 1 << 20]
    if mib:
        v = mib[0]["ratio"]
        print(f"target: lamina >= 0.8x raw pyzmq bytes/s at 1 MiB: {v:.2f} [{'met' if v >= 0.8 else 'MISSED'}]",
              file=file)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", nargs="?", const="-", default=None,
                    help="write results to this file (no file: print the JSON object on stdout)")
    ap.add_argument("--depth", type=int, default=4, help="calls in flight for the throughput rows")
    ap.add_argument("--quick", action="store_true", help="small sizes and counts (smoke test)")
    args = ap.parse_args()
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        res = runner.run(main(args))
    report(res, file=sys.stderr if args.json == "-" else sys.stdout)
    if args.json == "-":
        print(json.dumps(res, indent=2))
    elif args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)

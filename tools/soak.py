"""Soak test: N streaming clients for T seconds against a local cluster whose attention peers are
killed (SIGKILL) and restarted at random intervals.

    python tools/soak.py --duration 300 --clients 8 --attention-peers 3 [--kv-replicas 2] [--json OUT]

Prints requests completed, failed and lost (a request that got neither its tokens nor an error:
must be 0), latency percentiles (time to first token, end to end), the kills and restarts done,
and the peak RSS of every peer process. Loopback only; everything it starts, it stops.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import signal
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

from lamina_p2p.launch import PeerProcess, start_peer, stop_all

FAST = ["--heartbeat", "0.2", "--dead-after", "2.0"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except FileNotFoundError:
        pass
    return 0.0


class Cluster:
    def __init__(self, model: str, n_attention: int, kv_memory: str, replicas: int, threads: int):
        self.kv_memory, self.threads = kv_memory, threads
        self.attention: list[PeerProcess] = []
        self.names: dict[int, str] = {}  # pid -> label for the RSS table
        self.peak_rss: dict[str, float] = {}
        self.started = 0
        for _ in range(n_attention):
            self.add_attention()
        self.port = free_port()
        self.compute = start_peer(["start", "--role", "compute", "--model", model, "--listen", "tcp://127.0.0.1:0",
                                   "--join", self.attention[0].address, "--http", f"127.0.0.1:{self.port}",
                                   "--threads", str(threads), "--kv-replicas", str(replicas),
                                   "--peer-wait-timeout", "120", *FAST])
        self.names[self.compute.proc.pid] = "compute"
        self.url = f"http://127.0.0.1:{self.port}"

    def seed(self) -> str | None:
        alive = [p for p in self.attention if p.proc.poll() is None]
        return alive[0].address if alive else None

    def add_attention(self) -> None:
        args = ["start", "--role", "attention", "--listen", "tcp://127.0.0.1:0", "--kv-memory", self.kv_memory,
                "--threads", str(self.threads), *FAST]
        seed = self.seed()
        if seed:
            args += ["--join", seed]
        peer = start_peer(args)
        self.started += 1
        self.names[peer.proc.pid] = f"attention#{self.started}"
        self.attention.append(peer)

    def sample_rss(self) -> None:
        for p in [*self.attention, self.compute]:
            if p.proc.poll() is None:
                label = self.names[p.proc.pid]
                self.peak_rss[label] = max(self.peak_rss.get(label, 0.0), rss_mb(p.proc.pid))

    def stop(self) -> None:
        stop_all([self.compute, *self.attention])


async def client_loop(url: str, model: str, stop_at: float, rng: random.Random, stats: dict) -> None:
    import aiohttp

    async with aiohttp.ClientSession() as session:
        while time.monotonic() < stop_at:
            prompt = [rng.randrange(5, 500) for _ in range(rng.randrange(4, 64))]
            max_tokens = rng.randrange(8, 96)
            body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "stream": True,
                    "temperature": 0, "ignore_eos": True}
            rid = stats["submitted"]
            stats["submitted"] += 1
            stats["open"].add(rid)
            t0, first, tokens = time.monotonic(), None, 0
            try:
                async with session.post(f"{url}/v1/completions", json=body,
                                        timeout=aiohttp.ClientTimeout(total=600)) as resp:
                    if resp.status != 200:
                        raise RuntimeError(f"HTTP {resp.status}: {(await resp.text())[:200]}")
                    finish = None
                    async for raw in resp.content:
                        line = raw.decode().strip()
                        if not line.startswith("data: ") or line == "data: [DONE]":
                            continue
                        choice = json.loads(line[6:])["choices"][0]
                        if choice.get("text"):
                            first = first or time.monotonic()
                            tokens += 1
                        finish = choice.get("finish_reason") or finish
                    if finish not in ("length", "stop"):
                        raise RuntimeError(f"stream ended with finish_reason {finish!r}")
                stats["completed"] += 1
                stats["ttft"].append((first or time.monotonic()) - t0)
                stats["e2e"].append(time.monotonic() - t0)
            except Exception as e:  # noqa: BLE001 - every failure is counted and shown
                stats["failed"] += 1
                stats["errors"].append(f"{type(e).__name__}: {e}"[:200])
            # A request still open when the grace period ends (cancelled here) stays in "open": lost.
            stats["open"].discard(rid)


async def chaos_loop(cluster: Cluster, stop_at: float, rng: random.Random, lo: float, hi: float, log: list) -> None:
    loop = asyncio.get_running_loop()
    while True:
        wait = rng.uniform(lo, hi)
        if time.monotonic() + wait > stop_at - 5:
            return
        await asyncio.sleep(wait)
        alive = [p for p in cluster.attention if p.proc.poll() is None]
        if len(alive) > 1:
            victim = rng.choice(alive)
            victim.proc.send_signal(signal.SIGKILL)
            # Reap it first: until then poll() says it runs, and it could be handed out as a seed.
            await loop.run_in_executor(None, victim.proc.wait)
            log.append((round(time.monotonic(), 1), "kill", cluster.names[victim.proc.pid]))
        await loop.run_in_executor(None, cluster.add_attention)
        log.append((round(time.monotonic(), 1), "start", cluster.names[cluster.attention[-1].proc.pid]))


async def rss_loop(cluster: Cluster, stop_at: float) -> None:
    while time.monotonic() < stop_at:
        cluster.sample_rss()
        await asyncio.sleep(1.0)


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q / 100 * len(values)))]


async def soak(args) -> dict:
    model = args.model
    if model is None:
        from lamina_p2p.model.presets import write_preset

        model = str(write_preset("tiny", Path(tempfile.mkdtemp(prefix="lamina-soak-")) / "tiny"))
    name = Path(model).resolve().name
    loop = asyncio.get_running_loop()
    cluster = await loop.run_in_executor(None, lambda: Cluster(model, args.attention_peers, args.kv_memory,
                                                               args.kv_replicas, args.threads))
    rng = random.Random(args.seed)
    stats = {"submitted": 0, "completed": 0, "failed": 0, "open": set(), "ttft": [], "e2e": [], "errors": []}
    events: list = []
    t0 = time.monotonic()
    stop_at = t0 + args.duration
    try:
        clients = [asyncio.create_task(client_loop(cluster.url, name, stop_at, random.Random(rng.random()), stats))
                   for _ in range(args.clients)]
        side = [asyncio.create_task(chaos_loop(cluster, stop_at, rng, args.kill_min, args.kill_max, events)),
                asyncio.create_task(rss_loop(cluster, stop_at + args.grace))]
        # Requests in flight at the end get a grace period; whatever is still open after it is lost.
        done, pending = await asyncio.wait(clients, timeout=args.duration + args.grace)
        for t in pending:
            t.cancel()
        for t in side:
            t.cancel()
        await asyncio.gather(*pending, *side, return_exceptions=True)
    finally:
        await loop.run_in_executor(None, cluster.stop)
    elapsed = time.monotonic() - t0
    return {
        "duration_s": round(elapsed, 1), "clients": args.clients, "attention_peers": args.attention_peers,
        "kv_replicas": args.kv_replicas, "submitted": stats["submitted"], "completed": stats["completed"],
        "failed": stats["failed"], "lost": len(stats["open"]),
        "kills": sum(1 for e in events if e[1] == "kill"), "restarts": sum(1 for e in events if e[1] == "start"),
        "ttft_s": {f"p{q}": round(pct(stats["ttft"], q), 3) for q in (50, 90, 99)},
        "e2e_s": {f"p{q}": round(pct(stats["e2e"], q), 3) for q in (50, 90, 99)},
        "e2e_mean_s": round(statistics.fmean(stats["e2e"]), 3) if stats["e2e"] else None,
        "peak_rss_mb": {k: round(v, 1) for k, v in sorted(cluster.peak_rss.items())},
        "errors": stats["errors"][:10], "events": events,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="Model directory (default: the tiny preset in a temp dir).")
    ap.add_argument("--duration", type=float, default=300.0)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--attention-peers", type=int, default=3)
    ap.add_argument("--kv-replicas", type=int, default=1)
    ap.add_argument("--kv-memory", default="64MiB")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--kill-min", type=float, default=15.0, help="Seconds between kills: lower bound.")
    ap.add_argument("--kill-max", type=float, default=45.0)
    ap.add_argument("--grace", type=float, default=60.0, help="Seconds in-flight requests get after the end.")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="Write the result here.")
    args = ap.parse_args()
    from lamina_p2p.runtime import run_async

    result = run_async(soak(args))
    print(f"{result['duration_s']} s, {args.clients} clients, {args.attention_peers} attention peers, "
          f"kv replicas {args.kv_replicas}: {result['kills']} kills, {result['restarts']} restarts")
    print(f"requests: submitted {result['submitted']}  completed {result['completed']}  "
          f"failed {result['failed']}  lost {result['lost']}")
    print(f"time to first token s: {result['ttft_s']}")
    print(f"end to end s:          {result['e2e_s']}")
    print("peak RSS MiB:", "  ".join(f"{k} {v}" for k, v in result["peak_rss_mb"].items()))
    for e in result["errors"]:
        print("  error:", e)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0 if result["lost"] == 0 and result["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())

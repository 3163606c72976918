"""`lamina-node status` and `lamina-node cluster up`."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

from lamina_p2p.config import ClusterSpec, PeerSpec
from lamina_p2p.launch import LaunchError, PeerProcess, start_peer, stop_all


async def query_status(address: str, timeout: float, security=None) -> dict:
    import zmq.asyncio

    from lamina_p2p.net.membership import fetch_status

    if security is None and os.environ.get("LAMINA_SECRET"):
        # `cluster up` hands its peers $LAMINA_SECRET through the environment: ask them with it too.
        from lamina_p2p.net.security import load_security

        security = load_security(os.environ["LAMINA_SECRET"])
    ctx = zmq.asyncio.Context()
    try:
        return await fetch_status(ctx, address, timeout, security)
    finally:
        ctx.destroy(linger=0)


def _gib(n) -> str:
    return f"{(n or 0) / 2**30:.2f}"


def format_table(status: dict) -> str:
    rows = [("ID", "ROLE", "STATE", "ADDRESS", "DEVICE", "KV USED GiB", "KV FREE GiB", "LOAD", "LAST SEEN s")]
    for p in sorted(status.get("peers", []), key=lambda p: (p.get("role", ""), p.get("address", ""))):
        total, free = p.get("kv_total_bytes", 0), p.get("kv_free_bytes", 0)
        seen = p.get("age")
        rows.append((str(p.get("id", ""))[:12] + ("*" if p.get("id") == status.get("id") else ""),
                     p.get("role", ""), p.get("state", ""), p.get("address", ""), p.get("device", ""),
                     _gib(total - free) if p.get("role") == "attention" else "-",
                     _gib(free) if p.get("role") == "attention" else "-",
                     f"{p.get('load', 0):.2f}", "-" if seen is None else f"{seen:.1f}"))
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def peer_args(spec: PeerSpec, cluster: ClusterSpec, seed: str | None) -> list[str]:
    args = ["start", "--role", spec.role, "--listen", spec.listen, "--cluster", cluster.name,
            "--heartbeat", str(cluster.heartbeat_interval), "--dead-after", str(cluster.dead_after)]
    if seed:
        args += ["--join", seed]
    if spec.threads:
        args += ["--threads", str(spec.threads)]
    if spec.cpus:
        args += ["--cpus", str(spec.cpus)]
    if spec.role == "attention":
        args += ["--kv-memory", spec.kv_memory, "--device", spec.device]
    else:
        args += ["--model", spec.model, "--placement", spec.placement, "--micro-batches", str(spec.micro_batches)]
        if spec.http:
            args += ["--http", spec.http]
    return args + list(spec.extra)


def start_cluster(spec: ClusterSpec) -> list[PeerProcess]:
    """Attention peers first (a compute peer needs one to join), each later peer joining the first."""
    ordered = [p for p in spec.peers if p.role == "attention"] + [p for p in spec.peers if p.role == "compute"]
    procs: list[PeerProcess] = []
    try:
        for p in ordered:
            procs.append(start_peer(peer_args(p, spec, procs[0].address if procs else None)))
    except BaseException:
        stop_all(procs)
        raise
    return procs


def run_cluster(spec: ClusterSpec) -> int:
    from lamina_p2p.runtime import run_async

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        procs = start_cluster(spec)
    except LaunchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    try:
        # Wait until the first peer's view holds every peer, then show it.
        deadline = time.monotonic() + 30
        table = {}
        while time.monotonic() < deadline and not stop.is_set():
            table = run_async(query_status(procs[0].address, 5.0))
            alive = [p for p in table.get("peers", []) if p.get("state") == "alive"]
            if len(alive) >= len(procs):
                break
            stop.wait(0.2)
        print(format_table(table), flush=True)
        print(f"cluster {spec.name!r} up: {len(procs)} peers; Ctrl-C stops it", flush=True)
        while not stop.is_set():
            if any(p.proc.poll() is not None for p in procs):
                dead = [p for p in procs if p.proc.poll() is not None]
                print(f"peer {' '.join(dead[0].args)} exited with {dead[0].proc.returncode}; stopping", file=sys.stderr)
                return 1
            stop.wait(0.5)
        return 0
    finally:
        stop_all(procs)

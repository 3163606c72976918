"""Where a compute process's attention runs, and the launcher of local peer processes.

`open_transport` gives `generate`, `serve` and the Python façade their attention: in this process
(`LocalTransport`), on K attention peer processes started here for the run, or on a cluster joined
by address; `open_compute_transport` is the same for a compute peer, which may also join by LAN
discovery. The launcher (`start_peer`, `start_attention_peers`, `stop_all`; also `cluster up` and the
tests) runs `lamina-node start` as child processes: a peer prints one line `READY <address> <id>` on
stdout once its kernels are compiled and it has joined, and the launcher waits for that line (with a
deadline) instead of guessing with sleeps. The engine (`compute/`) never starts processes: it gets a
transport from here.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

from lamina_p2p.options import ComputeOptions, EngineOptions

READY_PREFIX = "READY "
# Seconds a starting engine waits, past the peers it expects, for the registrations already under way with the
# others membership named (Transport.wait_for_peers' settle_s): one round trip each, normally.
STARTUP_SETTLE_S = 2.0


class LaunchError(RuntimeError):
    pass


@dataclass
class PeerProcess:
    proc: subprocess.Popen
    args: list[str]
    address: str | None = None
    peer_id: str | None = None
    output: list[str] = field(default_factory=list)
    terminated: bool = False

    def terminate(self) -> None:
        """SIGTERM, once: a second one can land after the peer's shutdown has put the default handler
        back, and would kill it mid-shutdown (exit -15 instead of 0)."""
        if not self.terminated and self.proc.poll() is None:
            self.terminated = True
            self.proc.send_signal(signal.SIGTERM)

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM (once) and wait up to timeout_s for a clean exit, then SIGKILL."""
        self.terminate()
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def node_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "lamina_p2p", *args]


def start_peer(args: list[str], timeout: float = 600.0, env: dict | None = None) -> PeerProcess:
    """Start `lamina-node <args>` and wait until it prints its READY line."""
    proc = subprocess.Popen(node_command(*args), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **(env or {})}, start_new_session=True)
    peer = PeerProcess(proc, args)
    ready = threading.Event()

    def pump() -> None:
        # Keep draining stdout for the peer's whole life so it never blocks on a full pipe.
        for line in proc.stdout:
            line = line.rstrip("\n")
            if line.startswith(READY_PREFIX) and not ready.is_set():
                parts = line.split()
                peer.address, peer.peer_id = parts[1], parts[2]
                ready.set()
            else:
                peer.output.append(line)
                del peer.output[:-200]
                if os.environ.get("LAMINA_PEER_LOGS"):
                    print(f"[peer {proc.pid}] {line}", file=sys.stderr)
        ready.set()

    threading.Thread(target=pump, daemon=True).start()
    deadline = time.monotonic() + timeout
    while not ready.wait(0.1):
        if time.monotonic() > deadline:
            peer.kill()
            raise LaunchError(f"peer {' '.join(args)} not ready after {timeout:.0f} s:\n" + "\n".join(peer.output[-20:]))
    if peer.address is None:
        proc.wait()
        raise LaunchError(f"peer {' '.join(args)} exited with {proc.returncode}:\n" + "\n".join(peer.output[-20:]))
    return peer


def start_attention_peers(count: int, kv_memory: str, threads: int | None = None, cluster: str = "lamina",
                          extra: list[str] | None = None, cpus: list[str] | None = None) -> list[PeerProcess]:
    """K attention peers on loopback, the later ones joining the first; peer i pinned to cpus[i % len]."""
    peers: list[PeerProcess] = []
    try:
        for i in range(count):
            args = ["start", "--role", "attention", "--listen", "tcp://127.0.0.1:0", "--kv-memory", kv_memory,
                    "--cluster", cluster]
            if threads:
                args += ["--threads", str(threads)]
            if cpus:
                args += ["--cpus", cpus[i % len(cpus)]]
            if peers:
                args += ["--join", peers[0].address]
            peers.append(start_peer(args + list(extra or [])))
    except BaseException:
        stop_all(peers)
        raise
    return peers


def stop_all(peers: list[PeerProcess]) -> None:
    for p in peers:
        p.terminate()
    for p in peers:
        p.stop()


@contextlib.asynccontextmanager
async def open_transport(opts: EngineOptions):
    """In-process attention, K freshly started local peers, or an existing cluster; yields the transport."""
    if opts.join or opts.attention_peers > 0:
        async with _open_cluster_transport(opts) as transport:
            yield transport
        return
    from lamina_p2p.compute.local import LocalTransport

    transport = LocalTransport(opts.kv_bytes, threads=opts.attention_threads)
    try:
        await asyncio.get_running_loop().run_in_executor(None, _warm_kernels)
        yield transport
    finally:
        transport.close()


def _warm_kernels() -> None:
    import lamina_kernels

    lamina_kernels.warmup()


@contextlib.asynccontextmanager
async def _open_cluster_transport(opts: EngineOptions):
    """Join opts.join, or start opts.attention_peers local peers and join them."""
    from lamina_p2p.compute.remote import join_cluster

    peers = []
    loop = asyncio.get_running_loop()
    security = opts.security  # net.security.Security from --secret
    try:
        if opts.join:
            seeds, expect = list(opts.join), 1
        else:
            kv = f"{opts.kv_bytes}"
            extra = (security.cli_args() if security is not None else []) + \
                (["--busy-poll-us", str(opts.busy_poll_us)] if opts.busy_poll_us else [])
            starting = loop.run_in_executor(None, lambda: start_attention_peers(
                opts.attention_peers, kv, opts.attention_threads, opts.cluster, extra=extra,
                cpus=opts.attention_cpus))
            try:
                peers = await asyncio.shield(starting)
            except asyncio.CancelledError:
                # Stopped (SIGTERM) while the peers start: let them come up so the finally stops them.
                with contextlib.suppress(Exception):
                    peers = await starting
                raise
            seeds, expect = [peers[0].address], len(peers)
        async with join_cluster(seeds, cluster=opts.cluster, security=security,
                                busy_poll_us=opts.busy_poll_us) as transport:
            # The engine binds (registers) right after this; wait for membership to show the peers first.
            await transport.membership.wait_for(
                lambda m: len(m.peers(role="attention")) >= expect, timeout=60.0)
            transport.expected_peers = expect
            yield transport
    finally:
        if peers:
            await loop.run_in_executor(None, stop_all, peers)


@contextlib.asynccontextmanager
async def open_compute_transport(opts: ComputeOptions):
    """A compute peer's attention: join a cluster (start --role compute), or what `generate` does (serve)."""
    if (opts.join or opts.discover) and opts.attention_peers == 0:
        from lamina_p2p.compute.remote import join_cluster

        async with join_cluster(opts.join, listen=opts.listen, cluster=opts.cluster,
                                heartbeat_interval=opts.heartbeat_interval_s, dead_after=opts.dead_after_s,
                                advertise=opts.advertise, discover=opts.discover, discover_port=opts.discover_port,
                                discover_broadcast=opts.discover_broadcast, security=opts.security,
                                insecure_listen=opts.insecure_listen, busy_poll_us=opts.busy_poll_us) as transport:
            await transport.membership.wait_for(lambda m: bool(m.peers(role="attention")), timeout=60.0)
            yield transport
        return
    async with open_transport(opts) as transport:
        yield transport

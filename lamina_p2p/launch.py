"""Starting and stopping peers as local processes (generate/serve with K peers, `cluster up`, tests).

A peer started with `--ready-fd`-free stdout prints one line `READY <address> <id>`
once its kernels are compiled and it has joined; the launcher waits for that
line (with a deadline) instead of guessing with sleeps.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

READY_PREFIX = "READY "


class LaunchError(RuntimeError):
    pass


@dataclass
class PeerProcess:
    proc: subprocess.Popen
    args: list[str]
    address: str | None = None
    peer_id: str | None = None
    output: list[str] = field(default_factory=list)

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
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
        if p.proc.poll() is None:
            p.proc.send_signal(signal.SIGTERM)
    for p in peers:
        p.stop()

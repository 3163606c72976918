"""LAN discovery (`--discover`): a UDP beacon, in the manner of CZMQ's zbeacon.

Every peer broadcasts a small msgpack datagram {"c": cluster, "v": protocol version, "e": its
RpcServer endpoint} to one UDP port and listens on that port. Several peers on one host share the
port (SO_REUSEPORT; broadcasts reach every socket bound to it). A beacon of our cluster and version
hands its endpoint to `on_peer`, which adds it as a seed: membership does the rest. Datagrams are
untrusted input, like any wire message: small, typed, or dropped.
"""
from __future__ import annotations

import asyncio
import logging
import socket
import time
from typing import Any, Callable

import msgpack

from .wire import PROTOCOL_VERSION

log = logging.getLogger(__name__)

DEFAULT_PORT = 47474
MAX_DATAGRAM = 512


class Beacon(asyncio.DatagramProtocol):
    def __init__(
        self,
        cluster: str,
        endpoint: str,
        on_peer: Callable[[str], Any],
        port: int = DEFAULT_PORT,
        interval: float = 1.0,
        broadcast: str = "255.255.255.255",
        bind_host: str = "",
    ):
        self.cluster = cluster
        self.endpoint = endpoint
        self.on_peer = on_peer
        self.port = port
        self.interval = interval
        self.broadcast = broadcast
        self.bind_host = bind_host
        self.seen: dict[str, float] = {}  # endpoint -> monotonic time last heard
        self._transport: asyncio.DatagramTransport | None = None
        self._task: asyncio.Task | None = None
        self._payload = msgpack.packb({"c": cluster, "v": PROTOCOL_VERSION, "e": endpoint})
        self._warned: set = set()

    async def start(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if hasattr(socket, "SO_REUSEPORT"):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
            sock.bind((self.bind_host, self.port))
        except OSError:
            sock.close()
            raise
        loop = asyncio.get_running_loop()
        self._transport, _ = await loop.create_datagram_endpoint(lambda: self, sock=sock)
        self._task = asyncio.create_task(self._announce(), name="beacon")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._transport is not None:
            self._transport.close()
            self._transport = None

    async def _announce(self) -> None:
        while True:
            if self._transport is not None:
                try:
                    self._transport.sendto(self._payload, (self.broadcast, self.port))
                except OSError as e:  # no route for broadcast right now; try again next time
                    log.debug("beacon send failed: %s", e)
            await asyncio.sleep(self.interval)

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        if len(data) > MAX_DATAGRAM:
            return
        try:
            d = msgpack.unpackb(data, raw=False, max_ext_len=0)
        except Exception:
            return  # not ours: other software may use the port
        if not isinstance(d, dict):
            return
        cluster, version, endpoint = d.get("c"), d.get("v"), d.get("e")
        if not (isinstance(cluster, str) and isinstance(endpoint, str) and endpoint.startswith("tcp://")):
            return
        if cluster != self.cluster or version != PROTOCOL_VERSION:
            if endpoint not in self._warned:
                self._warned.add(endpoint)
                log.info("beacon: ignoring %s (cluster %r version %r)", endpoint, cluster, version)
            return
        # A peer bound to a wildcard announces an address nobody can dial: use the sender's IP.
        host, _, port = endpoint[len("tcp://"):].rpartition(":")
        if host in ("*", "0.0.0.0"):
            endpoint = f"tcp://{addr[0]}:{port}"
        if endpoint == self.endpoint:
            return
        now = time.monotonic()
        last = self.seen.get(endpoint)
        self.seen[endpoint] = now
        # Report a peer when first heard, and again after a silence (it may have restarted).
        if last is None or now - last > 3 * self.interval:
            try:
                self.on_peer(endpoint)
            except Exception:
                log.exception("beacon callback failed for %s", endpoint)

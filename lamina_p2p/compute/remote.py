"""Attention over the wire: the compute side's view of the cluster's attention peers.

The transport joins the cluster as a compute peer (its own ROUTER for gossip) and
registers the model geometry with every attention peer that becomes alive: that is
the control path, on the event loop. The register reply names the peer's data path
(net/datapath.py); per-layer attends go there over one link per peer owned by the
engine's dense thread (`send`/`receive`): on this host a plain Unix-domain stream socket
when the cluster runs in plain text (net/stream.py), else a ZeroMQ DEALER (ipc:// on
this host, tcp:// otherwise; CURVE when the cluster has keys).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from dataclasses import dataclass

import numpy as np
import zmq
import zmq.asyncio

from lamina_p2p.attention.kv_pool import DEFAULT_BLOCK_SIZE  # block_size() before any peer has registered
from lamina_p2p.attention.service import AttendRequest
from lamina_p2p.compute.errors import AttentionPeerError, classify
from lamina_p2p.model.config import geometry_kv_bytes_per_token
from lamina_p2p.net.address import advertise_address
from lamina_p2p.net.beacon import Beacon
from lamina_p2p.net.datapath import DataLink, StreamLink, host_id
from lamina_p2p.net.membership import Membership, PeerInfo
from lamina_p2p.net.rpc import RpcClient, RpcClosed, RpcError, RpcServer, RpcTimeout
from lamina_p2p.net.wire import PROTOCOL_VERSION

log = logging.getLogger("lamina.compute")

STREAM_MAX_REQUEST_BYTES = 1 << 20  # larger attends (prefill) go over ZeroMQ even where a stream is offered
STREAM_PROBE_TIMEOUT_S = 3.0  # how long register waits to see a peer's TCP stream accept a connection


async def _reachable(endpoint: str, timeout_s: float) -> bool:
    """Whether a "tcp://host:port" stream endpoint accepts a connection within `timeout_s` (then closed)."""
    from lamina_p2p.net.stream import tcp_host_port

    try:
        host, port = tcp_host_port(endpoint)
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout_s)
    except (OSError, ValueError, asyncio.TimeoutError):
        return False
    writer.close()
    return True


@dataclass
class _Ticket:
    """One attend in flight on the data path."""

    peer: str
    link: DataLink
    rid: int
    deadline: float  # time.monotonic()
    layer: int
    tokens: int
    trace: bool


class ClusterTransport:
    def __init__(self, ctx: zmq.asyncio.Context, server: RpcServer, membership: Membership,
                 request_timeout: float = 30.0):
        self.zmq_context = ctx
        self.server = server
        self.membership = membership
        self.request_timeout = request_timeout
        # Attention peers free an owner's KV once its membership entry is dead, so own as our peer id.
        self.owner_id = membership.me.id
        self.owner: str | None = None
        self.expected_peers = 1
        self.tracer = None
        self.failed: set[str] = set()  # peers that died or stopped answering; ids are per process
        self.geometry: dict | None = None
        self._clients: dict[str, RpcClient] = {}
        self._registered: dict[str, asyncio.Task] = {}
        self._info: dict[str, dict] = {}  # peer -> its register reply (block size, data endpoints)
        self._links: dict[tuple[str, str], DataLink] = {}  # the dense thread's data sockets: (peer, "stream"/"zmq")
        self._closed_bytes = [0, 0]  # sent, received by links now closed
        self._closing = False  # set by close(): the dense thread stops waiting on replies
        self._host = host_id()
        # Per-layer attends over the peer's stream socket where it offers one on this host (False: ZeroMQ only).
        self.use_stream = True
        # The stream links' busy-poll window in microseconds (0: off; net/busypoll.py).
        self.busy_poll_us = 0
        membership.subscribe(self._on_event)

    # -- membership -------------------------------------------------------------
    def bind(self, owner: str, geometry: dict) -> None:
        self.owner, self.geometry = owner, geometry
        for p in self.membership.peers(role="attention"):
            self._ensure_registered(p)

    def _on_event(self, event: str, peer: PeerInfo) -> None:
        if peer.role != "attention":
            return
        if event == "joined" and self.geometry is not None:
            self._ensure_registered(peer)
        elif event == "died":
            # Closing its client fails the calls in flight to it at once (RpcClosed), so a step
            # waiting on a dead peer ends within the failure-detection bound, not a request timeout.
            self.failed.add(peer.id)
            task = self._registered.pop(peer.id, None)
            if task is not None:
                task.cancel()
            client = self._clients.pop(peer.id, None)
            if client is not None:
                asyncio.ensure_future(client.close())

    def _ensure_registered(self, peer: PeerInfo) -> None:
        if peer.id in self._registered:
            return
        self._clients.setdefault(peer.id, RpcClient(self.zmq_context, peer.address, security=self.membership.security))
        self._registered[peer.id] = asyncio.ensure_future(self._register(peer))

    async def _register(self, peer: PeerInfo) -> None:
        msg = await self._clients[peer.id].call("register", {"owner": self.owner, **self.geometry},
                                                timeout_s=self.request_timeout)
        info = msg.fields
        bs, data = info.get("block_size"), info.get("data")
        if not isinstance(bs, int) or bs <= 0 or not isinstance(data, str) or not data.startswith("tcp://"):
            raise RpcError(f"register reply from {peer.id} lacks block_size or a data endpoint: {info}")
        ipc = info.get("data_ipc")
        # ipc:// only where both ends agree they share a host (and its filesystem).
        info["endpoint"] = ipc if isinstance(ipc, str) and info.get("host") == self._host and \
            ipc.startswith("ipc://") and os.path.exists(ipc.removeprefix("ipc://")) else data
        info["stream"] = self._stream_endpoint(info)
        if info["stream"] is not None and info["stream"].startswith("tcp://") and \
                not await _reachable(info["stream"], STREAM_PROBE_TIMEOUT_S):
            # A firewall that lets the ZeroMQ data port through but not this one: found here, on the event
            # loop, not as a connect timeout on the dense thread at the first attend.
            log.warning("stream data path of %s at %s unreachable: using ZeroMQ", peer.id, info["stream"])
            info["stream"] = None
        self._info[peer.id] = info

    def _stream_endpoint(self, info: dict) -> str | None:
        """The peer's stream data path (net/stream.py) this side may use: its Unix socket on this host,
        else its TCP stream; None where it offers neither or either side runs CURVE (the stream has none)."""
        if self.membership.security is not None:
            return None
        path, tcp = info.get("data_stream"), info.get("data_stream_tcp")
        if isinstance(path, str) and path.startswith("unix://") and info.get("host") == self._host and \
                os.path.exists(path.removeprefix("unix://")):
            return path
        return tcp if isinstance(tcp, str) and tcp.startswith("tcp://") else None

    def peers(self) -> dict[str, float]:
        """Attention peers registered and alive, weighted by advertised KV capacity."""
        out = {}
        for p in self.membership.peers(role="attention"):
            task = self._registered.get(p.id)
            if p.id in self.failed or not p.ready:  # not ready: starting up, or draining to leave
                continue
            if task is not None and task.done() and not task.cancelled() and task.exception() is None:
                out[p.id] = float(max(p.kv_total_bytes, 1))
        return out

    def leaving(self) -> set[str]:
        """Registered peers that announced they are leaving (SIGTERM): their shards must move."""
        return {p.id for p in self.membership.peers(role="attention") if not p.ready and p.id in self._registered}

    def block_size(self) -> int:
        """The largest KV block size the usable peers reported when we registered."""
        usable = self.peers()
        return max((self._info[p]["block_size"] for p in usable if p in self._info), default=DEFAULT_BLOCK_SIZE)

    def block_sizes(self) -> dict[str, int]:
        """peer -> KV block size in tokens, from its register reply."""
        return {p: info["block_size"] for p, info in self._info.items()}

    def mark_failed(self, peer: str) -> None:
        """Stop using a peer that failed a request, before gossip declares it dead."""
        self.failed.add(peer)
        client = self._clients.pop(peer, None)
        self._registered.pop(peer, None)
        if client is not None:
            asyncio.ensure_future(client.close())

    def kv_capacity(self) -> dict[str, tuple[int, int]]:
        """peer -> (total, free) KV bytes, as last advertised by gossip."""
        usable = self.peers()
        return {p.id: (p.kv_total_bytes, p.kv_free_bytes) for p in self.membership.peers(role="attention")
                if p.id in usable}

    def block_bytes_per_token(self) -> float:
        return geometry_kv_bytes_per_token(self.geometry)

    async def wait_for_peers(self, count: int, timeout: float, settle_s: float = 0.0) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while len(self.peers()) < count:
            pending = [t for t in self._registered.values() if not t.done()]
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TimeoutError(f"only {len(self.peers())} of {count} attention peers ready after {timeout:g} s")
            if pending:
                await asyncio.wait(pending, timeout=min(remaining, 0.5))
            else:
                await asyncio.sleep(min(remaining, self.membership.heartbeat_interval))
        # A joining engine expects one peer, but the seed's gossip may have named more, whose registrations are
        # in flight: without this the first requests all went to whichever answered first, for their lifetime.
        pending = [t for t in self._registered.values() if not t.done()]
        if settle_s > 0 and pending:
            await asyncio.wait(pending, timeout=min(settle_s, max(deadline - loop.time(), 0.0)))

    # -- data path: the engine's dense thread -----------------------------------------
    def _link(self, peer: str, nbytes: int) -> DataLink:
        """The link for a request of `nbytes`: the stream socket where the peer offers one and the
        request is small (per-layer decode), else ZeroMQ (prefill's megabytes: its I/O threads
        move big messages faster than the dense thread's own reads and writes would)."""
        if self._closing:
            raise AttentionPeerError(peer, "the transport is closing", "failed")
        info = self._info.get(peer)
        if peer in self.failed or info is None:
            self._close_link(peer)
            raise AttentionPeerError(peer, "not connected", "failed")
        kind = "stream" if info.get("stream") and self.use_stream and nbytes <= STREAM_MAX_REQUEST_BYTES else "zmq"
        link = self._links.get((peer, kind))
        if link is None:
            if kind == "stream":
                try:
                    link = StreamLink(info["stream"], busy_poll_us=self.busy_poll_us)
                except OSError as e:  # gone meanwhile (the peer restarted): ZeroMQ still works or fails cleanly
                    log.warning("stream data path to %s unusable (%s): using ZeroMQ", peer, e)
                    info["stream"] = None
                    return self._link(peer, nbytes)
            else:
                link = DataLink(self.zmq_context, info["endpoint"], security=self.membership.security)
            self._links[(peer, kind)] = link
        return link

    def _close_link(self, peer: str) -> None:
        for kind in ("stream", "zmq"):
            link = self._links.pop((peer, kind), None)
            if link is not None:
                link.close()
                self._closed_bytes[0] += link.bytes_sent
                self._closed_bytes[1] += link.bytes_received

    def warm_up(self) -> None:
        """Nothing here: this side's data path is Python (framing, ZeroMQ, sockets); the attention peers
        compile their kernels when they start (attention/peer.py)."""

    def send(self, peer: str, req: AttendRequest) -> _Ticket:
        """Start one attend on `peer`'s data link (dense thread only); returns the ticket for `receive`.

        req: q [Tq, Hq, D], k/v [Tkv, Hkv, D] in the registered storage, sent without a copy (not
        to be written until received). Never waits on the peer's work; ZeroMQ takes the message at
        once unless its queue is full (then up to request_timeout s). Raises AttentionPeerError
        (kind "failed") when the peer is unknown, failed, or the send cannot be queued."""
        link = self._link(peer, req.q.nbytes + req.k.nbytes + req.v.nbytes)
        meta = req.meta if req.meta is not None else \
            np.stack([req.seq_ids, req.context_lens, req.n_q, req.num_new_tokens], axis=1).astype(np.int64)
        tracing = req.trace and self.tracer is not None
        try:
            rid = link.send_attend(req.owner, req.layer, req.h0, req.h1, meta, req.q, req.k, req.v,
                                   timeout_s=self.request_timeout, trace=tracing)
        except (RpcTimeout, RpcClosed) as e:
            raise AttentionPeerError(peer, str(e), "failed") from None
        return _Ticket(peer, link, rid, time.monotonic() + self.request_timeout, req.layer,
                       len(req.q), tracing)

    def receive(self, ticket: _Ticket) -> tuple[np.ndarray, np.ndarray]:
        """Wait for a ticket's reply (dense thread only): (out float32 [Tq, Hq, D], lse float32 [Tq, Hq]),
        read-only views of the received frames.

        Waits up to the request's deadline (request_timeout s after send), less when membership
        declares the peer dead or the transport closes (checked every 50 ms). Raises
        AttentionPeerError: kind "failed" (timeout, dead peer, closed), "busy" (the peer's queue
        was full: retry later), or what the peer's error text classifies as (kv_full, lost, error)."""
        peer = ticket.peer
        try:
            msg = ticket.link.receive(ticket.rid, ticket.deadline, alive=lambda: peer not in self.failed and not self._closing)
        except (RpcTimeout, RpcClosed) as e:
            raise AttentionPeerError(peer, str(e), "failed") from None
        except RpcError as e:
            raise AttentionPeerError(peer, str(e), "busy" if e.code == "busy" else classify(str(e))) from None
        if len(msg.tensors) != 2:
            raise AttentionPeerError(peer, f"attend reply has {len(msg.tensors)} tensors, expected 2")
        if ticket.trace and all(isinstance(msg.fields.get(k), float) for k in ("tq", "tk0", "tk1")):
            f, row = msg.fields, f"attention {peer[:8]}"
            self.tracer.add(row, "queue", f"L{ticket.layer}", f["tq"], f["tk0"])
            self.tracer.add(row, "kernel", f"L{ticket.layer}", f["tk0"], f["tk1"], {"tokens": ticket.tokens})
        return msg.tensors[0], msg.tensors[1]

    async def free(self, peer: str, seq_ids: list[int]) -> None:
        client = self._clients.get(peer)
        if client is not None:
            await client.call("free", {"owner": self.owner, "seq_ids": list(seq_ids)}, timeout_s=self.request_timeout)

    async def close(self) -> None:
        # A step still running on the dense thread ends at its next receive (alive() is false now);
        # closing a link waits for that thread to leave it (ZeroMQ sockets are not thread-safe).
        self._closing = True
        for task in self._registered.values():
            task.cancel()
        if self.owner is not None:
            await asyncio.gather(*(c.call("drop", {"owner": self.owner}, timeout_s=2.0) for c in self._clients.values()),
                                 return_exceptions=True)
        await asyncio.gather(*(c.close() for c in self._clients.values()), return_exceptions=True)
        self._clients.clear()
        # The engine (the links' owner) has stopped by now; sockets of a shadow context must be
        # closed before the context is destroyed, or destroying it waits on them.
        for peer in {p for p, _ in self._links}:
            self._close_link(peer)

    def address(self) -> str | None:
        return self.server.bound_address

    def wire_bytes(self) -> tuple[int, int]:
        links = list(self._links.values())
        sent = self._closed_bytes[0] + sum(c.bytes_sent for c in self._clients.values()) + \
            sum(x.bytes_sent for x in links)
        received = self._closed_bytes[1] + sum(c.bytes_received for c in self._clients.values()) + \
            sum(x.bytes_received for x in links)
        return sent, received


@contextlib.asynccontextmanager
async def join_cluster(seeds: list[str], listen: str = "tcp://127.0.0.1:0", cluster: str = "lamina",
                       peer_id: str | None = None, heartbeat_interval: float = 0.5, dead_after: float = 5.0,
                       advertise: str | None = None, discover: bool = False, discover_port: int = 47474,
                       discover_broadcast: str = "255.255.255.255", security=None, insecure_listen: bool = False,
                       busy_poll_us: int = 0):
    """Join as a compute peer; yields the ClusterTransport (`busy_poll_us`: its stream links' busy-poll
    window, ClusterTransport.busy_poll_us)."""
    ctx = zmq.asyncio.Context()
    from lamina_p2p.net.security import check_listen

    check_listen(listen, security, insecure_listen)
    server = RpcServer(ctx, listen, security=security)
    await server.start()
    address = advertise_address(server.bound_address, advertise, list(seeds))
    me = PeerInfo(id=peer_id or os.urandom(8).hex(), role="compute", address=address, device="cpu",
                  kv_total_bytes=0, kv_free_bytes=0, load=0.0, version=PROTOCOL_VERSION, cluster=cluster,
                  heartbeat=0, ready=True)
    membership = Membership(server, ctx, me, list(seeds), heartbeat_interval=heartbeat_interval,
                            suspect_after=min(2.0, dead_after / 2), dead_after=dead_after, security=security)
    transport = ClusterTransport(ctx, server, membership)
    transport.busy_poll_us = busy_poll_us
    await membership.start()
    beacon = None
    if discover:
        beacon = Beacon(cluster, address, membership.add_seed, port=discover_port, broadcast=discover_broadcast)
        await beacon.start()
    try:
        yield transport
    finally:
        if beacon is not None:
            await beacon.stop()
        await transport.close()
        await membership.stop()
        await server.close()
        ctx.destroy(linger=0)

"""The attention peer process: a ROUTER for control requests, membership, and a kernel thread.

Ops served on the control ROUTER (besides membership's gossip/status):
  register {owner, num_layers, num_heads, num_kv_heads, head_dim, storage, max_positions}
           -> {block_size, block_bytes, kv_total_bytes, kv_free_bytes,
               data: tcp endpoint of the data path, data_ipc: its ipc:// endpoint (or None),
               data_stream: its unix:// stream endpoint (plain text only, else None),
               data_stream_tcp: its tcp:// stream endpoint for other hosts (plain text only, else None), host}
  attend   {owner, layer, h0, h1} + tensors [meta int64 [n, 4] = (seq id, context_len, n_q, num_new_tokens), q, k, v]
           (on the data path in the fixed binary header of net/wire.py, reply likewise)
           -> tensors [out f32 [T, Hq, D], lse f32 [T, Hq]]
  free     {owner, seq_ids}
  drop     {owner}            (a compute peer leaving)
  stats    -> the pool's counters
The data path (net/kernel_thread.py) serves the same `attend` on the kernel thread's own
sockets, with no event loop in between: that is what compute peers use per layer.
Anything that touches the pool runs on the kernel thread, so heartbeats are
answered on the event loop while it works.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass

import numpy as np
import zmq
import zmq.asyncio

from lamina_p2p.attention import limits
from lamina_p2p.attention.kv_pool import DEFAULT_BLOCK_SIZE
from lamina_p2p.attention.rehearsal import KernelRehearsal
from lamina_p2p.attention.service import AttendRequest, AttentionService
from lamina_p2p.net.address import advertise_address
from lamina_p2p.net.beacon import Beacon
from lamina_p2p.net.datapath import host_id
from lamina_p2p.net.kernel_thread import KernelThread
from lamina_p2p.net.membership import Membership, PeerInfo
from lamina_p2p.net.rpc import RpcServer
from lamina_p2p.net.wire import PROTOCOL_VERSION, Message
from lamina_p2p.trace import now

log = logging.getLogger("lamina.attention")


@dataclass
class AttentionPeerConfig:
    listen: str = "tcp://127.0.0.1:0"
    join: tuple[str, ...] = ()
    kv_bytes: int = 4 << 30
    device: str = "cpu"
    threads: int | None = None
    cluster: str = "lamina"
    block_size: int = DEFAULT_BLOCK_SIZE
    heartbeat_interval: float = 0.5
    suspect_after: float = 2.0
    dead_after: float = 5.0
    owner_timeout: float = 60.0  # free the KV of a compute peer that has been dead this long
    drain_timeout: float = 30.0  # on SIGTERM: how long compute peers get to move their shards off
    advertise: str | None = None  # address others dial; default: the bound one
    data_port: int = 0  # the data path's TCP port (0: the system chooses)
    data_advertise: str | None = None  # the data path's address others dial (then no ipc://); default: advertise's host
    # The TCP stream data path (plain text only, net/stream.py): its port (0: any free one; None: off) and
    # the address others dial (default: advertise's host and that port; not offered with data_advertise alone).
    data_stream_port: int | None = 0
    data_stream_advertise: str | None = None
    discover: bool = False  # UDP beacon on the LAN
    discover_port: int = 47474
    discover_broadcast: str = "255.255.255.255"
    security: object = None  # net.security.Security: CURVE on every connection; None = plain text
    insecure_listen: bool = False  # plain text beyond loopback only when this is set
    busy_poll_us: int = 0  # the kernel thread's busy-poll window on its stream socket (0: off; net/busypoll.py)


class AttentionPeer:
    def __init__(self, config: AttentionPeerConfig):
        from lamina_p2p.net.security import check_listen

        check_listen(config.listen, config.security, config.insecure_listen)
        self.config = config
        if config.device == "cuda":
            _check_cuda()
        self.service = AttentionService(config.kv_bytes, config.block_size, config.device)
        self.kernel: KernelThread | None = None  # the kernel thread, started by run()
        self.data_stream_endpoint: str | None = None  # the TCP stream data path as advertised, set by run()
        self.busy_s = 0.0  # kernel time, for the advertised load
        self.in_flight = 0
        self.attend_calls = 0
        self._last_layout: tuple[str, int, int, int] | None = None  # (owner, q heads, kv heads, head_dim) of the last attend
        self._rehearsal = KernelRehearsal()
        self._unrehearsable: set[tuple] = set()  # layouts whose rehearsal failed once: not tried again

    def _warm(self) -> None:
        """Compile every kernel variant, then run the exact request path once, before announcing."""
        import lamina_kernels

        if self.config.device == "cpu":
            lamina_kernels.warmup()
        for storage in lamina_kernels.STORAGES:
            dtype = lamina_kernels.storage_dtype(storage)
            owner = f"warmup-{storage}"
            self.service.register(owner, 1, 2, 1, 8, storage, 64)
            q, kv = np.zeros((1, 2, 8), dtype), np.zeros((1, 1, 8), dtype)
            for arr in (q, kv):
                arr.flags.writeable = False  # frames from the wire are read-only
            ids = np.array([1], np.int64)
            one = np.array([1], np.int64)
            self.service.attend(AttendRequest(owner, 0, ids, np.zeros(1, np.int64), one, one, 0, 1, q, kv, kv))
            # ... and a decode step of it: the shard-table work of a known shard (attention/shard_rows.py)
            self.service.attend(AttendRequest(owner, 0, ids, one, one, one, 0, 1, q, kv, kv))
            self.service.drop_owner(owner)

    def _start_kernel_thread(self) -> None:
        from lamina_p2p.runtime import set_threads

        # Numba's thread count is per calling thread: set it on the thread that runs the kernels.
        set_threads(numba_threads=self.config.threads)
        self._warm()

    async def run(self, stop: asyncio.Event, on_ready=None) -> None:
        loop = asyncio.get_running_loop()
        ctx = zmq.asyncio.Context()
        listen = self.config.listen
        tcp_host = listen.rsplit(":", 1)[0] if listen.startswith("tcp://") else "tcp://127.0.0.1"
        self.kernel = KernelThread(ctx, tcp_host, self._attend_data, security=self.config.security,
                                   on_start=self._start_kernel_thread, tcp_port=self.config.data_port,
                                   ipc=self.config.data_advertise is None, busy_poll_us=self.config.busy_poll_us,
                                   stream_tcp_port=self.config.data_stream_port, rehearse=self._rehearse_kernel)
        server = None
        try:
            await loop.run_in_executor(None, self.kernel.start)
            server = RpcServer(ctx, self.config.listen, security=self.config.security)
            for op, handler in (("register", self._register), ("attend", self._attend), ("free", self._free),
                                ("drop", self._drop), ("stats", self._stats)):
                server.register(op, handler)
            await server.start()
            await self._serve(ctx, server, stop, on_ready)
        finally:
            if server is not None:
                await server.close()
            self.kernel.stop()
            ctx.destroy(linger=0)

    async def _serve(self, ctx, server: RpcServer, stop: asyncio.Event, on_ready) -> None:
        address = advertise_address(server.bound_address, self.config.advertise, list(self.config.join))
        # Compute peers dial the data path at the advertised host, on the kernel thread's port.
        self.data_endpoint = self.config.data_advertise or \
            address.rsplit(":", 1)[0] + ":" + self.kernel.tcp_endpoint.rsplit(":", 1)[1]
        # Behind NAT or a relay (data_advertise) the stream's port is not reachable as bound unless told.
        tcp_stream = self.kernel.stream_tcp_endpoint
        self.data_stream_endpoint = self.config.data_stream_advertise if tcp_stream else None
        if tcp_stream and self.data_stream_endpoint is None and self.config.data_advertise is None:
            self.data_stream_endpoint = address.rsplit(":", 1)[0] + ":" + tcp_stream.rsplit(":", 1)[1]
        me = PeerInfo(id=os.urandom(8).hex(), role="attention", address=address,
                      device=self.config.device, kv_total_bytes=self.service.budget.total,
                      kv_free_bytes=self.service.budget.free, load=0.0, version=PROTOCOL_VERSION,
                      cluster=self.config.cluster, heartbeat=0, ready=True)
        self.membership = Membership(server, ctx, me, list(self.config.join),
                                     heartbeat_interval=self.config.heartbeat_interval,
                                     suspect_after=self.config.suspect_after, dead_after=self.config.dead_after,
                                     security=self.config.security)
        await self.membership.start()
        beacon = None
        if self.config.discover:
            beacon = Beacon(self.config.cluster, address, self.membership.add_seed, port=self.config.discover_port,
                            broadcast=self.config.discover_broadcast)
            await beacon.start()
        log.info("attention peer %s ready on %s", me.id, address)
        if on_ready is not None:
            on_ready(address, me.id)
        reporter = asyncio.create_task(self._report())
        try:
            await stop.wait()
            await self._drain()
        finally:
            reporter.cancel()
            if beacon is not None:
                await beacon.stop()
            await self.membership.stop()

    async def _drain(self) -> None:
        """Hand the shards back before exiting: say we are leaving (ready=False in gossip), so compute
        peers re-place their sequences elsewhere and free them here; wait for that, bounded."""
        self.membership.update_self(ready=False)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.drain_timeout
        while loop.time() < deadline:
            alive = {p.id for p in self.membership.peers(role="compute")}
            held = self.service.sequences_by_owner()
            if not any(n for owner, n in held.items() if owner in alive):
                return  # the KV of dead owners is nobody's loss
            await asyncio.sleep(self.config.heartbeat_interval)
        log.warning("drain timed out after %g s with sequences still held", self.config.drain_timeout)

    async def _report(self) -> None:
        """Advertise free KV and load; free the KV of compute peers that are gone."""
        last_busy, last_t = 0.0, time.monotonic()
        gone_since: dict[str, float] = {}
        while True:
            await asyncio.sleep(self.config.heartbeat_interval)
            now = time.monotonic()
            load = (self.busy_s - last_busy) / max(now - last_t, 1e-6)
            last_busy, last_t = self.busy_s, now
            self.membership.update_self(kv_free_bytes=self.service.budget.free, load=round(load, 3))
            alive = {p.id for p in self.membership.peers(role="compute")}
            for owner in self.service.owner_ids():
                if owner in alive:
                    gone_since.pop(owner, None)
                elif now - gone_since.setdefault(owner, now) > self.config.owner_timeout:
                    freed = self.service.drop_owner(owner)
                    gone_since.pop(owner, None)
                    log.warning("compute peer %s is gone: freed its %d sequences", owner, freed)

    async def _in_worker(self, fn, *args):
        """Run fn on the kernel thread, between two attends (the pool has one writer)."""
        return await asyncio.wrap_future(self.kernel.submit(fn, *args))

    async def _register(self, msg: Message):
        f = msg.fields
        keys = ("num_layers", "num_heads", "num_kv_heads", "head_dim", "storage", "max_positions")
        missing = [k for k in ("owner", *keys) if k not in f]
        if missing:
            raise ValueError(f"register: missing fields {missing}")
        limits.check_register(f, self.service)
        info = await self._in_worker(lambda: self.service.register(str(f["owner"]), **{k: f[k] for k in keys}))
        return {**info, "data": self.data_endpoint, "data_ipc": self.kernel.ipc_endpoint,
                "data_stream": self.kernel.stream_endpoint, "data_stream_tcp": self.data_stream_endpoint,
                "host": host_id()}, []

    async def _attend(self, msg: Message):
        # The control path's attend (tools, tests, old clients): the same work, on the kernel thread.
        return await self._in_worker(self._attend_data, msg, now())

    def _attend_data(self, msg: Message, arrived: float):
        """An attend message, checked, run: (reply fields, [out, lse]). On the kernel thread; raises to refuse."""
        f = msg.fields
        if len(msg.tensors) != 4:
            raise ValueError("attend: expected 4 tensors (meta, q, k, v)")
        meta, q, k, v = msg.tensors
        if meta.dtype != np.int64 or meta.ndim != 2 or meta.shape[1] != 4:
            raise ValueError("attend: meta must be int64 [n, 4]")
        limits.check_attend(meta, self.service)
        q, k, v = (a if a.flags.aligned else a.copy() for a in (q, k, v))
        req = AttendRequest(str(f.get("owner")), _int(f, "layer"), meta[:, 0], meta[:, 1], meta[:, 2], meta[:, 3],
                            _int(f, "h0"), _int(f, "h1"), q, k, v, meta=meta)
        self.in_flight += 1
        self.attend_calls += 1
        try:
            out, lse, t0, t1 = self._timed_attend(req)
        finally:
            self.in_flight -= 1
        self._last_layout = (req.owner, q.shape[1], k.shape[1], q.shape[2])
        # Times on the shared monotonic clock, for the caller's trace (DESIGN: spans on both sides).
        return ({"tq": arrived, "tk0": t0, "tk1": t1} if f.get("trace") is True else {}), [out, lse]

    def _rehearse_kernel(self) -> None:
        """Busy-poll's rehearsal of the kernel (attention/rehearsal.py) for the last attend's layout; on the
        kernel thread, never raises (a layout it cannot rehearse is not tried again)."""
        layout = self._last_layout
        if layout is None or self.config.device != "cpu" or layout in self._unrehearsable:
            return
        owner, num_heads, num_kv_heads, head_dim = layout
        try:
            self._rehearsal.run(self.service.storage_of(owner), num_heads, num_kv_heads, head_dim)
        except Exception as e:
            self._unrehearsable.add(layout)
            log.debug("kernel rehearsal of %s skipped: %r", layout, e)

    def _timed_attend(self, req: AttendRequest):
        t0 = now()
        try:
            out, lse = self.service.attend(req)
        finally:
            t1 = now()
            self.busy_s += t1 - t0
        return out, lse, t0, t1

    async def _free(self, msg: Message):
        ids = msg.fields.get("seq_ids", [])
        limits.check_free(ids)
        if not isinstance(ids, list) or not all(isinstance(i, int) for i in ids):
            raise ValueError("free: seq_ids must be a list of ints")
        freed = await self._in_worker(self.service.free, str(msg.fields.get("owner")), ids)
        return {"freed": freed}, []

    async def _drop(self, msg: Message):
        freed = await self._in_worker(self.service.drop_owner, str(msg.fields.get("owner")))
        return {"freed": freed}, []

    async def _stats(self, msg: Message):
        return {**self.service.stats(), "attend_calls": self.attend_calls, "busy_s": round(self.busy_s, 3),
                "data_path_requests": self.kernel.requests, "data_path_errors": self.kernel.errors,
                "busy_poll_us": round(self.kernel.busy_poll_s * 1e6),
                **({f"busy_poll_{k}": getattr(self.kernel.busy_poll, k) for k in ("windows", "caught", "backoffs", "host_gaps")}
                   if self.kernel.busy_poll else {}),
                **({"busy_poll_rehearsals": self.kernel.rehearsals, "kernel_rehearsals": self._rehearsal.runs}
                   if self.kernel.busy_poll else {})}, []


def _check_cuda() -> None:
    """Fail at start-up, with a reason, where no CUDA device (or simulator) is usable."""
    try:
        from numba import cuda

        if not cuda.is_available():
            raise ValueError("--device cuda: no CUDA device is available (numba.cuda.is_available() is False)")
    except ImportError as e:
        raise ValueError(f"--device cuda needs numba-cuda: {e}") from None


def _int(fields: dict, key: str) -> int:
    value = fields.get(key)
    if not isinstance(value, int):
        raise ValueError(f"field {key!r} must be an int, got {type(value).__name__}")
    return value

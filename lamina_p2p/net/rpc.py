"""Async request/reply over ZeroMQ: one ROUTER per peer serves, one DEALER per remote peer calls.

Many requests are in flight on one socket at once; replies carry the request's id and are matched
to their caller by a single receiver task. Every request carries a deadline (unix seconds), so a
server can drop work nobody waits for and a caller never waits forever.

Frames on the wire, DEALER -> ROUTER:  [header, tensor...]     (ZeroMQ adds the routing id)
                    ROUTER -> DEALER:  [routing id, header, tensor...]
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import time
from typing import Any, Awaitable, Callable, Sequence

import zmq
import zmq.asyncio

from .wire import DEFAULT_LIMITS, Limits, Message, WireError, decode, encode

log = logging.getLogger(__name__)

Handler = Callable[[Message], Awaitable[tuple[dict, list]]]


# Error reply codes, so a caller can tell kinds of failure apart without parsing the reason.
BAD_MESSAGE, UNKNOWN_OP, DEADLINE, HANDLER_FAILED = "bad_message", "unknown_op", "deadline", "handler"
BUSY = "busy"


class RpcError(Exception):
    """The remote peer answered with an error; str(e) is its reason, .code its kind."""

    def __init__(self, reason: str, code: str | None = None):
        super().__init__(reason)
        self.code = code


class RpcTimeout(RpcError, TimeoutError):
    """No reply arrived before the call's deadline."""


class RpcClosed(RpcError):
    """The client was closed while the call was pending."""


def _apply_security(sock: zmq.Socket, security: Any, server: bool) -> None:
    """CURVE keys (`--secret`): a server socket becomes a CURVE server with the cluster key pair, a
    client authenticates with its key pair and checks the server's public key. None: plain text."""
    from .security import apply

    apply(sock, security, server)


def _apply_limits(sock: zmq.Socket, limits: Limits) -> None:
    # libzmq drops the connection of a peer that sends a frame bigger than this, before buffering
    # it: the decoder's size checks come after the whole message is in memory.
    sock.setsockopt(zmq.MAXMSGSIZE, max(limits.max_frame_bytes, limits.max_header_bytes))


_HANDSHAKE_FAILED = (zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                     | zmq.EVENT_HANDSHAKE_FAILED_AUTH)


def _nbytes(frames: Sequence) -> int:
    return sum(f.nbytes if isinstance(f, memoryview) else len(f) for f in frames)


def _error_frames(rid: int, code: str, reason: str) -> list:
    return encode("error", rid, {"code": code, "reason": reason})


class RpcServer:
    def __init__(
        self,
        ctx: zmq.asyncio.Context,
        bind: str,
        limits: Limits = DEFAULT_LIMITS,
        security: Any = None,
    ):
        self._ctx = ctx
        self._bind = bind
        self._limits = limits
        self._security = security
        self._handlers: dict[str, Handler] = {}
        self._tasks: set[asyncio.Task] = set()
        self._recv_task: asyncio.Task | None = None
        self._sock: zmq.asyncio.Socket | None = None
        self.bound_address: str | None = None
        # counters for metrics
        self.bytes_received = 0
        self.bytes_sent = 0
        self.requests = 0
        self.errors = 0
        self.handshake_failures = 0  # connections refused: wrong/no key, garbage instead of ZMTP
        self._monitor_task: asyncio.Task | None = None
        self._zap = False

    def register(self, op: str, handler: Handler) -> None:
        if op in ("reply", "error"):
            raise ValueError(f"{op!r} is reserved for responses")
        self._handlers[op] = handler

    async def start(self) -> None:
        sock = self._ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        try:
            _apply_limits(sock, self._limits)
            _apply_security(sock, self._security, server=True)
            if self._security is not None:
                # The ZAP handler must listen before the socket binds: libzmq lets every CURVE
                # client in when no handler answers.
                from .security import acquire_zap

                acquire_zap(self._ctx, self._security)
                self._zap = True
            monitor = sock.get_monitor_socket(_HANDSHAKE_FAILED)
            sock.bind(self._bind)
        except BaseException:
            sock.close(linger=0)  # a failed bind (port in use) must not leak the socket
            self._release_zap()
            raise
        # LAST_ENDPOINT resolves a port-0 / wildcard bind to the port actually taken.
        self.bound_address = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self._sock = sock
        self._monitor_task = asyncio.create_task(self._watch(monitor), name=f"rpc-monitor {self.bound_address}")
        self._recv_task = asyncio.create_task(self._serve(), name=f"rpc-server {self.bound_address}")

    def _release_zap(self) -> None:
        if self._zap:
            from .security import release_zap

            self._zap = False
            release_zap(self._ctx)

    async def _watch(self, monitor: zmq.asyncio.Socket) -> None:
        """Count (and log, a few times) connections whose handshake failed."""
        from zmq.utils.monitor import parse_monitor_message

        try:
            while True:
                event = parse_monitor_message(await monitor.recv_multipart())
                self.handshake_failures += 1
                if self.handshake_failures <= 5 or self.handshake_failures % 100 == 0:
                    log.warning("rpc server %s: handshake failed (%s; wrong or missing key, or not ZeroMQ): "
                                "%d so far", self.bound_address, _event_name(event), self.handshake_failures)
        finally:
            monitor.close(linger=0)

    async def close(self) -> None:
        tasks = [t for t in (self._recv_task, self._monitor_task, *self._tasks) if t is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.clear()
        if self._sock is not None:
            try:
                self._sock.disable_monitor()
            except zmq.ZMQError:
                pass
            self._sock.close(linger=0)
            self._sock = None
        self._release_zap()

    async def _serve(self) -> None:
        assert self._sock is not None
        while True:
            frames = await self._sock.recv_multipart(copy=False)
            self.bytes_received += _nbytes(frames[1:])  # payload only, as the client counts it
            try:
                self._dispatch(frames)
            except Exception:  # a bug here must not stop the server answering everyone else
                log.exception("rpc server: dispatch failed")

    def _dispatch(self, frames: list) -> None:
        routing = frames[0].bytes
        self.requests += 1
        try:
            msg = decode(frames[1:], self._limits)
        except WireError as e:
            self._reject(routing, e.rid if e.rid is not None else -1, BAD_MESSAGE, f"bad message: {e}")
            return
        if len(self._tasks) >= self._limits.max_in_flight:
            self._reject(routing, msg.rid, BUSY, f"{msg.op}: {len(self._tasks)} requests in flight, try later")
            return
        handler = self._handlers.get(msg.op)
        if handler is None:
            self._reject(routing, msg.rid, UNKNOWN_OP, f"unknown op {msg.op!r}")
            return
        if msg.deadline is not None and msg.deadline <= time.time():
            self._reject(routing, msg.rid, DEADLINE, f"{msg.op}: deadline exceeded before start")
            return
        task = asyncio.create_task(self._run(routing, msg, handler))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _reject(self, routing: bytes, rid: int, code: str, reason: str) -> None:
        log.warning("rpc server %s: %s", self.bound_address, reason)
        self.errors += 1
        task = asyncio.create_task(self._send(routing, _error_frames(rid, code, reason)))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, routing: bytes, msg: Message, handler: Handler) -> None:
        try:
            if msg.deadline is None:
                fields, tensors = await handler(msg)
            else:
                # Stop work the caller has given up on; time.time() because the deadline is wall
                # clock (it crosses machines), loop.time() because that is what asyncio schedules by.
                when = asyncio.get_running_loop().time() + (msg.deadline - time.time())
                async with asyncio.timeout_at(when):
                    fields, tensors = await handler(msg)
            frames = encode("reply", msg.rid, fields, tensors)
        except asyncio.CancelledError:
            raise  # the server is closing
        except TimeoutError:
            self.errors += 1
            log.warning("rpc server %s: %s id=%d: deadline exceeded", self.bound_address, msg.op, msg.rid)
            frames = _error_frames(msg.rid, DEADLINE, f"{msg.op}: deadline exceeded")
        except Exception as e:
            self.errors += 1
            log.warning("rpc server %s: %s id=%d failed: %r", self.bound_address, msg.op, msg.rid, e)
            frames = _error_frames(msg.rid, HANDLER_FAILED, f"{msg.op} failed: {type(e).__name__}: {e}")
        await self._send(routing, frames)

    async def _send(self, routing: bytes, frames: list) -> None:
        if self._sock is None:
            return
        # ROUTER never blocks: a reply to a peer that has gone away is dropped by ZeroMQ.
        await self._sock.send_multipart([routing, *frames], copy=False)
        self.bytes_sent += _nbytes(frames)


def _event_name(event: dict) -> str:
    code = event.get("event")
    for name in ("HANDSHAKE_FAILED_AUTH", "HANDSHAKE_FAILED_PROTOCOL", "HANDSHAKE_FAILED_NO_DETAIL"):
        if code == getattr(zmq, f"EVENT_{name}"):
            return f"{name.lower()} {event.get('value')}"
    return str(code)


class RpcClient:
    def __init__(
        self,
        ctx: zmq.asyncio.Context,
        address: str,
        limits: Limits = DEFAULT_LIMITS,
        security: Any = None,
    ):
        self.address = address
        self._limits = limits
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        # IMMEDIATE: queue only on a finished connection, so calls to a peer that is not up wait
        # (and time out) here instead of piling up and reaching it stale when it starts.
        sock.setsockopt(zmq.IMMEDIATE, 1)
        _apply_limits(sock, limits)
        _apply_security(sock, security, server=False)
        sock.connect(address)
        self._sock = sock
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future] = {}
        self._recv_task: asyncio.Task | None = None
        self._closed = False
        # counters for metrics
        self.bytes_sent = 0
        self.bytes_received = 0
        self.calls = 0
        self.timeouts = 0

    async def call(
        self, op: str, fields: dict | None = None, tensors: Sequence = (), timeout_s: float = 10.0
    ) -> Message:
        """One request/reply on the event loop: returns the reply Message (its tensors are read-only
        numpy views of the received frames; bf16 as uint16 bits, `Message.torch(i)` converts).

        op: the handler's name on the server; fields: a msgpack-able dict; tensors: numpy arrays or
        CPU torch tensors (sent without a copy when large: do not write into them until this returns);
        timeout_s: seconds for the whole call, also sent as the server's deadline. Raises RpcTimeout
        past it, RpcClosed when the client is (or gets) closed, RpcError(reason, code) for an error
        reply (code "busy", "deadline", "bad_message", "unknown_op", "handler"), WireError for a
        tensor the wire cannot carry."""
        if self._closed:
            raise RpcClosed(f"client for {self.address} is closed")
        if self._recv_task is None:  # created here because __init__ may run outside a loop
            self._recv_task = asyncio.create_task(self._receive(), name=f"rpc-client {self.address}")
        rid = next(self._ids)
        frames = encode(op, rid, fields, tensors, deadline=time.time() + timeout_s)
        fut = asyncio.get_running_loop().create_future()
        self._pending[rid] = fut
        self.calls += 1
        try:
            async with asyncio.timeout(timeout_s):
                await self._send(frames)
                msg = await fut
        except TimeoutError:
            self.timeouts += 1
            raise RpcTimeout(f"{op} to {self.address}: no reply within {timeout_s:g} s") from None
        except asyncio.CancelledError:
            # close() closes the socket, and pyzmq cancels a send still waiting on it: report that
            # as the close it is, unless it is this task that is being cancelled.
            task = asyncio.current_task()
            if self._closed and task is not None and not task.cancelling():
                raise RpcClosed(f"client for {self.address} closed") from None
            raise
        finally:
            self._pending.pop(rid, None)
        if msg.op == "error":
            reason, code = str(msg.fields.get("reason", "unknown error")), msg.fields.get("code")
            # The server gives up at the same deadline and may say so a moment before our own
            # timer fires: that is still a timeout to the caller.
            raise (RpcTimeout if code == DEADLINE else RpcError)(reason, code)
        return msg

    async def _send(self, frames: list) -> None:
        while True:
            try:
                await self._sock.send_multipart(frames, copy=False)
                break
            except zmq.Again:
                # pyzmq can see the socket writable and then get EAGAIN from libzmq (pyzmq #925;
                # seen here with IMMEDIATE while a connection to a dead port comes and goes).
                # Wait for writability again; the caller's timeout bounds the loop.
                await self._sock.poll(flags=zmq.POLLOUT)
                await asyncio.sleep(0.001)  # never spin if poll and send keep disagreeing
        self.bytes_sent += _nbytes(frames)

    async def _receive(self) -> None:
        try:
            while True:
                frames = await self._sock.recv_multipart(copy=False)
                self.bytes_received += _nbytes(frames)
                try:
                    msg = decode(frames, self._limits)
                except WireError as e:
                    log.warning("rpc client %s: bad reply: %s", self.address, e)
                    fut = self._pending.get(e.rid) if e.rid is not None else None
                    if fut is not None and not fut.done():
                        fut.set_exception(RpcError(f"bad reply: {e}"))
                    continue
                fut = self._pending.get(msg.rid)
                if fut is not None and not fut.done():
                    fut.set_result(msg)
                # else: a late reply to a call that already timed out; nothing waits for it.
        except asyncio.CancelledError:
            raise
        except Exception as e:  # the socket failed: nobody can be answered any more
            log.warning("rpc client %s: receiver stopped: %r", self.address, e)
            self._fail_pending(RpcClosed(f"receiver for {self.address} stopped: {e!r}"))

    def _fail_pending(self, exc: Exception) -> None:
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(exc)
        self._pending.clear()

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._fail_pending(RpcClosed(f"client for {self.address} closed"))
        if self._recv_task is not None:
            self._recv_task.cancel()
            await asyncio.gather(self._recv_task, return_exceptions=True)
        self._sock.close(linger=0)

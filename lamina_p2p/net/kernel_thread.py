"""The attention peer's side of the data path: the kernel thread and the sockets it owns.

DESIGN.md section 5; the compute side's links are in net/datapath.py. `KernelThread` owns a
ROUTER bound to a TCP port (and, on one host, an ipc:// path) and, when the peer runs in plain
text, stream listeners (net/stream.py: Unix-domain, and TCP for other hosts). It receives attends
from all of them, runs them and
replies itself, never blocking on a slow reader. Control-path work that touches the KV pool
(register, free, drop) is handed to the same thread with `submit`, so the pool has one writer. A
malformed message gets an error reply and a log line, never a crash.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import queue
import shutil
import tempfile
import threading
import time
from typing import Any, Callable

import numpy as np
import zmq

from . import busypoll, stream
from .datapath import blocking_view, frames_nbytes
from .rpc import BAD_MESSAGE, BUSY, DEADLINE, HANDLER_FAILED, UNKNOWN_OP
from .wire import (DEFAULT_LIMITS, MAGIC, Limits, Message, WireError, decode, encode, encode_attend_reply,
                   frame_view)

log = logging.getLogger(__name__)
# pyzmq's poll flags are enum.IntFlag: `events & zmq.POLLOUT` runs enum's Python code, ~1 us a
# test warm (0.04 with a plain int), several after the KV streamed through the caches, and the
# loop tests every ready socket's events for every request it serves.
_POLLOUT = int(zmq.POLLOUT)
_READABLE = int(zmq.POLLIN | zmq.POLLERR)

# Replies a stream caller has not read yet wait in the kernel thread's memory (as ZeroMQ's queue would
# hold them) so the thread never blocks on a slow reader; past this a connection is dropped.
STREAM_MAX_PENDING_BYTES = 1 << 30

DataHandler = Callable[[Message, float], tuple[dict, list]]  # (message, arrival time) -> reply


class KernelThread:
    """The attention peer's worker: serves `attend` on its own sockets and runs submitted jobs in order.

    `tcp_bind` is the host part to bind ("tcp://127.0.0.1"); `tcp_port` its port (0: the system
    chooses; a fixed one for firewalls and relays). `ipc` also binds an ipc:// path for peers on this host.
    `handler(msg, arrived)` runs an attend and returns (reply fields, reply tensors); it raises to
    send an error reply. `on_start` runs first on the thread (thread counts, warm-up). With `ipc`
    and no `security` it also listens on a Unix-domain stream socket (`stream_endpoint`,
    "unix://PATH", net/stream.py) and serves the same messages there.
    `busy_poll_us`: after replying on a stream connection, poll every socket without blocking for
    this many microseconds before blocking again, rehearsing the last request once (0: never;
    net/busypoll.py), and calling `rehearse` (the handler's own rehearsal) after it. `stream_tcp_port`:
    with no `security`, also listen for stream connections on TCP at `tcp_bind`'s host and this port
    (0: any free one; None: no TCP stream), for compute peers on other hosts (`stream_tcp_endpoint`).
    """

    def __init__(self, ctx: zmq.Context, tcp_bind: str, handler: DataHandler, security: Any = None,
                 limits: Limits = DEFAULT_LIMITS, on_start: Callable[[], None] | None = None, ipc: bool = True,
                 tcp_port: int = 0, busy_poll_us: int = 0, stream_tcp_port: int | None = None,
                 rehearse: Callable[[], None] | None = None):
        self._ctx = ctx
        self._busy_poll_s = busypoll.busy_poll_s(busy_poll_us)
        self.busy_poll_s = 0.0  # the window in use: set once bound (only where a stream listener exists)
        self.busy_poll: busypoll.BusyPoll | None = None  # the thread's, once running
        self._last_stream_attend: tuple[int, list | None] = (-1, None)  # (stream fd, request frames)
        self.rehearsals = 0  # busy-poll rehearsals run (net/busypoll.py)
        self._rehearse_handler = rehearse
        self._tcp_bind = tcp_bind
        self._tcp_port = tcp_port
        self._handler = handler
        self._security = security
        self._limits = limits
        self._on_start = on_start
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        self._stopping = False
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._ipc_dir = tempfile.mkdtemp(prefix="lamina-data-") if ipc and hasattr(zmq, "IPC_PATH_MAX_LEN") else None
        self._zap = False
        self.tcp_endpoint: str | None = None
        self.ipc_endpoint: str | None = None
        self.stream_endpoint: str | None = None
        self.stream_tcp_endpoint: str | None = None
        self._stream_tcp_port = stream_tcp_port
        self._listeners: dict[int, Any] = {}  # fd -> stream listener (Unix, TCP; plain text only); connections by fd:
        self._streams: dict[int, tuple[Any, stream.FrameReader]] = {}
        self._pending: dict[int, list[memoryview]] = {}  # fd -> reply bytes the socket has not taken yet
        # counters, read by other threads for stats
        self.requests = 0
        self.errors = 0
        self.bytes_received = 0
        self.bytes_sent = 0
        self._thread = threading.Thread(target=self._run, name="kernel", daemon=True)

    def start(self, timeout: float = 600.0) -> None:
        """Start the thread; returns once its sockets are bound and `on_start` has run (or raises its error)."""
        if self._security is not None:
            from .security import acquire_zap

            acquire_zap(self._ctx, self._security)  # before binding: an unanswered ZAP lets everyone in
            self._zap = True
        self._thread.start()
        if not self._ready.wait(timeout):
            raise TimeoutError("kernel thread did not start")
        if self._error is not None:
            raise self._error

    def submit(self, fn: Callable, *args) -> concurrent.futures.Future:
        """Run fn(*args) on the kernel thread, between attends; await with asyncio.wrap_future."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        if self._stopping:
            fut.set_exception(RuntimeError("kernel thread stopped"))
            return fut
        self._jobs.put((fn, args, fut))
        try:
            os.write(self._wake_w, b"x")
        except OSError:  # stopped meanwhile
            if not fut.done():
                fut.set_exception(RuntimeError("kernel thread stopped"))
        return fut

    def stop(self) -> None:
        if self._stopping:
            return
        self._stopping = True
        os.write(self._wake_w, b"x")
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout=30)
        if self._zap:
            from .security import release_zap

            self._zap = False
            release_zap(self._ctx)
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass
        if self._ipc_dir is not None:
            shutil.rmtree(self._ipc_dir, ignore_errors=True)

    # -- the thread -------------------------------------------------------------
    def _bind(self) -> zmq.Socket:
        sock = blocking_view(self._ctx).socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        try:
            sock.setsockopt(zmq.MAXMSGSIZE, max(self._limits.max_frame_bytes, self._limits.max_header_bytes))
            from .security import apply

            apply(sock, self._security, server=True)
            sock.bind(f"{self._tcp_bind}:{self._tcp_port}")
            self.tcp_endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
            if self._ipc_dir is not None:
                path = os.path.join(self._ipc_dir, "attend")
                if len(path) < zmq.IPC_PATH_MAX_LEN:
                    sock.bind(f"ipc://{path}")
                    self.ipc_endpoint = f"ipc://{path}"
                # CURVE-secured clusters keep ZeroMQ: the stream carries no encryption or authentication.
                if self._security is None and len(path) < zmq.IPC_PATH_MAX_LEN:
                    path = os.path.join(self._ipc_dir, "stream")
                    self._add_listener(stream.listen(path))
                    self.stream_endpoint = stream.SCHEME + path
            if self._security is None and self._stream_tcp_port is not None:
                host = self._tcp_bind.removeprefix("tcp://")
                listener = self._add_listener(stream.listen_tcp(host, self._stream_tcp_port))
                port = listener.getsockname()[1]
                self.stream_tcp_endpoint = f"{stream.TCP_SCHEME}{host}:{port}"
        except BaseException:
            sock.close(linger=0)
            for listener in self._listeners.values():
                listener.close()
            raise
        return sock

    def _add_listener(self, listener):
        self._listeners[listener.fileno()] = listener
        return listener

    def _run(self) -> None:
        try:
            sock = self._bind()
            self.busy_poll_s = self._busy_poll_s if self._listeners else 0.0
            if self._on_start is not None:
                self._on_start()
        except BaseException as e:
            self._error = e
            self._ready.set()
            return
        self._ready.set()
        poller = zmq.Poller()
        self._router, self._poller = sock, poller  # used on this thread only
        poller.register(sock, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        for listen_fd in self._listeners:
            poller.register(listen_fd, zmq.POLLIN)
        spin = self.busy_poll = busypoll.BusyPoll(self.busy_poll_s)
        rehearse = False
        try:
            while not self._stopping:
                if spin.spinning():
                    # Busy-poll: the next request of a stream caller usually follows within the window;
                    # catching it here saves this thread's wake-up. poll(0) releases the GIL on each
                    # call, so the control path's event loop still runs (heartbeats, register).
                    ready = dict(poller.poll(0))
                    if not ready:
                        if rehearse:
                            rehearse = False
                            self._rehearse()
                        continue
                    spin.caught_one()
                    spin.stop()
                else:
                    ready = dict(poller.poll())
                # Jobs run between attends: a submitted free/register waits for one batch of kernels at most.
                if self._wake_r in ready:
                    try:
                        os.read(self._wake_r, 4096)
                    except BlockingIOError:
                        pass
                    self._run_jobs()
                for listen_fd in self._listeners:
                    if listen_fd in ready:
                        self._accept(self._listeners[listen_fd])
                for fd, events in ready.items():
                    if events & _POLLOUT and fd in self._pending:
                        self._flush(fd)
                streams = [fd for fd, events in ready.items() if fd in self._streams and events & _READABLE]
                if sock in ready or streams:
                    self._serve_waiting(sock if sock in ready else None, streams)
                    if streams:  # only after a stream reply: ZeroMQ needs its I/O thread's CPU
                        spin.start()
                        rehearse = True
        finally:
            sock.close(linger=0)
            for fd in list(self._streams):
                self._drop_stream(fd)
            for listener in self._listeners.values():
                listener.close()
            self._run_jobs(cancel=True)

    def _rehearse(self) -> None:
        """Busy-poll's rehearsal (net/busypoll.py): the last stream attend's parse and decode again, with no
        effect but on the caches."""
        fd, request = self._last_stream_attend
        if fd in self._streams and request is not None:
            self._streams[fd][1].rehearse(request)
            if self._rehearse_handler is not None:
                try:
                    self._rehearse_handler()
                except Exception:  # a bug there must not stop the thread; rehearsal is only for speed
                    log.exception("data path: the handler's rehearsal failed; not rehearsing it again")
                    self._rehearse_handler = None
            self.rehearsals += 1

    def _run_jobs(self, cancel: bool = False) -> None:
        while True:
            try:
                fn, args, fut = self._jobs.get_nowait()
            except queue.Empty:
                return
            if cancel or not fut.set_running_or_notify_cancel():
                if not fut.done():
                    fut.set_exception(RuntimeError("kernel thread stopped"))
                continue
            try:
                fut.set_result(fn(*args))
            except BaseException as e:
                fut.set_exception(e)

    def _accept(self, listener) -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # out of file descriptors, ...: refuse this one, keep serving
                log.warning("data path: accepting a stream connection failed: %s", e)
                return
            stream.tune(conn)
            self._streams[conn.fileno()] = (conn, stream.FrameReader(conn, self._limits))
            self._poller.register(conn.fileno(), zmq.POLLIN)

    def _flush(self, fd: int, more: list[memoryview] = ()) -> None:
        """Write a stream's waiting reply bytes (and `more` after them) as far as the socket takes them."""
        conn, _ = self._streams[fd]
        had = fd in self._pending
        try:
            left = stream.write_some(conn, self._pending.pop(fd, []) + list(more))
        except OSError as e:
            log.warning("data path: a stream caller went away (%s)", e)
            return self._drop_stream(fd)
        if left:
            if sum(b.nbytes for b in left) > STREAM_MAX_PENDING_BYTES:
                log.warning("data path: a stream caller is not reading its replies: closing it")
                return self._drop_stream(fd)
            self._pending[fd] = left
        if bool(left) != had:
            self._poller.modify(fd, zmq.POLLIN | zmq.POLLOUT if left else zmq.POLLIN)

    def _drop_stream(self, fd: int) -> None:
        self._pending.pop(fd, None)
        conn, _ = self._streams.pop(fd, (None, None))
        if conn is not None:
            self._poller.unregister(fd)
            conn.close()

    def _serve_waiting(self, sock: zmq.Socket | None, streams: list[int]) -> None:
        """Take every request waiting (past max_in_flight they are refused as busy), then run them in order.

        `sock`: the ROUTER when the poll found it readable, else None (a stream request alone does not
        try it: a receive that finds nothing costs ~10 us in the pipeline, not 1). A request is
        (where to reply, frames, arrival time); where to reply is the ROUTER's routing id (bytes) or a
        stream connection's fd."""
        batch: list[tuple[bytes | int, list, float]] = []
        while sock is not None:
            try:
                frames = sock.recv_multipart(flags=zmq.NOBLOCK, copy=False)
            except zmq.Again:
                break
            batch.append((frames[0].bytes, frames[1:], time.monotonic()))
        for fd in streams:
            conn, reader = self._streams[fd]
            messages = reader.read()
            arrived = time.monotonic()
            batch.extend((fd, frames, arrived) for frames in messages)
        for n, (to, frames, arrived) in enumerate(batch):
            try:
                self._serve_one(to, frames, arrived, busy=n >= self._limits.max_in_flight)
            except Exception:  # a bug here must not stop the thread answering everyone else
                log.exception("data path: serving a request failed")
        for fd in streams:  # after the whole messages that came before: a broken or closed stream ends
            conn, reader = self._streams.get(fd, (None, None))
            if reader is not None and reader.error is not None:  # cannot resynchronise: answer once, close
                self._error_reply(fd, -1, BAD_MESSAGE, f"bad message: {reader.error}")
            if reader is not None and (reader.error is not None or reader.closed):
                self._drop_stream(fd)

    def _serve_one(self, to: bytes | int, frames: list, arrived: float, busy: bool) -> None:
        self.requests += 1
        nbytes = frames_nbytes(frames)
        self.bytes_received += nbytes
        try:
            msg = decode(frames, self._limits)
        except WireError as e:
            return self._error_reply(to, e.rid if e.rid is not None else -1, BAD_MESSAGE, f"bad message: {e}")
        if msg.op != "attend":
            return self._error_reply(to, msg.rid, UNKNOWN_OP, f"unknown op {msg.op!r} on the data path")
        if busy:
            return self._error_reply(to, msg.rid, BUSY, "attend: too many requests waiting, try later")
        if msg.deadline is not None and msg.deadline <= time.time():
            return self._error_reply(to, msg.rid, DEADLINE, "attend: deadline exceeded before start")
        framed = isinstance(to, int)  # a stream's reply goes out framed (net/stream.py)
        try:
            fields, tensors = self._handler(msg, arrived)
            reply = self._encode_reply(msg.rid, fields, tensors, frame_view(frames[0])[0] == MAGIC, framed)
        except Exception as e:
            log.warning("data path: attend id=%d failed: %r", msg.rid, e)
            return self._error_reply(to, msg.rid, HANDLER_FAILED, f"attend failed: {type(e).__name__}: {e}")
        if framed and self.busy_poll_s:  # kept for rehearsal while busy-polling: a decode step's, not a prefill chunk's
            self._last_stream_attend = (to, frames) if nbytes <= busypoll.REHEARSAL_MAX_BYTES else (-1, None)
        self._send(to, reply, framed)

    @staticmethod
    def _encode_reply(rid: int, fields: dict, tensors: list, binary: bool, framed: bool) -> list:
        """A binary attend gets the binary reply when it fits that format (out, lse and trace times).
        `framed`: as a stream sends it (stream.pack), in one struct pack where it can (stream.pack_attend_reply)."""
        frames = None
        if binary and len(tensors) == 2 and fields.keys() <= {"tq", "tk0", "tk1"}:
            out, lse = tensors
            times = (fields["tq"], fields["tk0"], fields["tk1"]) if len(fields) == 3 else None
            if framed and (bufs := stream.pack_attend_reply(rid, out, lse, times)) is not None:
                return bufs
            if isinstance(out, np.ndarray) and isinstance(lse, np.ndarray) and out.dtype == lse.dtype == np.float32 \
                    and out.ndim == 3 and lse.shape == out.shape[:2]:
                frames = encode_attend_reply(rid, out, lse, times)
        if frames is None:
            frames = encode("reply", rid, fields, tensors)
        return stream.pack(frames) if framed else frames

    def _error_reply(self, to: bytes | int, rid: int, code: str, reason: str) -> None:
        self.errors += 1
        if self.errors <= 5 or self.errors % 100 == 0:
            log.warning("data path %s: %s (%d errors so far)", self.tcp_endpoint, reason, self.errors)
        self._send(to, encode("error", rid, {"code": code, "reason": reason}))

    def _send(self, to: bytes | int, frames: list, framed: bool = False) -> None:
        """Send a message's frames (`framed`: already as a stream sends them) to a ROUTER caller or a stream."""
        if isinstance(to, int):  # a stream connection
            if to in self._streams:  # (else closed meanwhile)
                bufs = frames if framed else stream.pack(frames)
                self.bytes_sent += sum(b.nbytes for b in bufs)
                self._flush(to, bufs)  # never waits: what the socket does not take now waits for POLLOUT
            return
        try:
            # ROUTER drops a message to a peer that has gone away instead of blocking.
            self._router.send_multipart([to, *frames], copy=False, flags=zmq.NOBLOCK)
            self.bytes_sent += frames_nbytes(frames)
        except zmq.Again:
            log.warning("data path: reply dropped (the caller's queue is full)")

"""The data path: per-layer attend requests on sockets owned by the threads that do the work.

DESIGN.md section 5. The control path (gossip, register, free, stats) runs on each
peer's asyncio event loop (net/rpc.py). Per-layer attends do not: a round trip
through asyncio futures and executor hand-offs costs hundreds of microseconds, and
there is one per layer per micro-batch. Here

- `KernelThread` is the attention peer's kernel thread. It owns a ROUTER bound to
  a TCP port (and, on one host, an ipc:// path), receives attends, runs them and
  replies itself. Control-path work that touches the KV pool (register, free,
  drop) is handed to the same thread with `submit`, so the pool has one writer.
- `DataLink` is a compute peer's DEALER to one attention peer, owned by the
  engine's dense thread: `send` returns at once, `receive` waits for that reply.
- `StreamLink` is the same over a plain Unix-domain stream socket (net/stream.py),
  which the kernel thread also listens on when the peer runs in plain text: on one
  host the compute side chooses it at register time, and a round trip then wakes two
  threads instead of six (no ZeroMQ I/O threads in between).

Both sides use the wire format (net/wire.py) and the same checks as the control
path: a malformed message gets an error reply and a log line, never a crash;
the same CURVE keys (net/security.py); the same per-request deadline.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import logging
import os
import queue
import select
import shutil
import socket
import tempfile
import threading
import time
from typing import Any, Callable, Sequence

import numpy as np
import zmq

from . import stream
from .rpc import BAD_MESSAGE, BUSY, DEADLINE, HANDLER_FAILED, UNKNOWN_OP, RpcClosed, RpcError, RpcTimeout
from .wire import DEFAULT_LIMITS, MAGIC, Limits, Message, WireError, decode, encode, encode_attend, encode_attend_reply

log = logging.getLogger(__name__)

# Replies a stream caller has not read yet wait in the kernel thread's memory (as ZeroMQ's queue would
# hold them) so the thread never blocks on a slow reader; past this a connection is dropped.
STREAM_MAX_PENDING_BYTES = 1 << 30

DataHandler = Callable[[Message, float], tuple[dict, list]]  # (message, arrival time) -> reply


def host_id() -> str:
    """Names this machine (and boot) so two peers can tell they share one, and ipc:// works between them."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = ""
    return f"{socket.gethostname()}/{boot}"


def _nbytes(frames: Sequence) -> int:
    return sum(f.nbytes if isinstance(f, memoryview) else len(f) for f in frames)


def _sync(ctx: zmq.Context) -> zmq.Context:
    # A plain (blocking) view of an asyncio context: same libzmq context, so the same ZAP handler.
    return zmq.Context.shadow(ctx.underlying)


class KernelThread:
    """The attention peer's worker: serves `attend` on its own sockets and runs submitted jobs in order.

    `tcp_bind` is the host part to bind ("tcp://127.0.0.1"); `tcp_port` its port (0: the system
    chooses; a fixed one for firewalls and relays). `ipc` also binds an ipc:// path for peers on this host.
    `handler(msg, arrived)` runs an attend and returns (reply fields, reply tensors); it raises to
    send an error reply. `on_start` runs first on the thread (thread counts, warm-up). With `ipc`
    and no `security` it also listens on a Unix-domain stream socket (`stream_endpoint`,
    "unix://PATH", net/stream.py) and serves the same messages there.
    """

    def __init__(self, ctx: zmq.Context, tcp_bind: str, handler: DataHandler, security: Any = None,
                 limits: Limits = DEFAULT_LIMITS, on_start: Callable[[], None] | None = None, ipc: bool = True,
                 tcp_port: int = 0):
        self._ctx = ctx
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
        self._listener = None  # the stream listener (plain text only), and its connections by fd:
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
        sock = _sync(self._ctx).socket(zmq.ROUTER)
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
                    self._listener = stream.listen(path)
                    self.stream_endpoint = stream.SCHEME + path
        except BaseException:
            sock.close(linger=0)
            if self._listener is not None:
                self._listener.close()
            raise
        return sock

    def _run(self) -> None:
        try:
            sock = self._bind()
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
        listen_fd = self._listener.fileno() if self._listener is not None else None
        if listen_fd is not None:
            poller.register(listen_fd, zmq.POLLIN)
        try:
            while not self._stopping:
                ready = dict(poller.poll())
                # Jobs run between attends: a submitted free/register waits for one batch of kernels at most.
                if self._wake_r in ready:
                    try:
                        os.read(self._wake_r, 4096)
                    except BlockingIOError:
                        pass
                    self._run_jobs()
                if listen_fd is not None and listen_fd in ready:
                    self._accept()
                for fd, events in ready.items():
                    if events & zmq.POLLOUT and fd in self._pending:
                        self._flush(fd)
                streams = [fd for fd, events in ready.items() if fd in self._streams and events & (zmq.POLLIN | zmq.POLLERR)]
                if sock in ready or streams:
                    self._serve_waiting(sock, streams)
        finally:
            sock.close(linger=0)
            for fd in list(self._streams):
                self._drop_stream(fd)
            if self._listener is not None:
                self._listener.close()
            self._run_jobs(cancel=True)

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

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
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

    def _serve_waiting(self, sock: zmq.Socket, streams: list[int]) -> None:
        """Take every request waiting (past max_in_flight they are refused as busy), then run them in order.

        A request is (where to reply, frames, arrival time); where to reply is the ROUTER's routing id
        (bytes) or a stream connection's fd."""
        batch: list[tuple[bytes | int, list, float]] = []
        while True:
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
        self.bytes_received += _nbytes(frames)
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
        try:
            fields, tensors = self._handler(msg, arrived)
            reply = self._encode_reply(msg.rid, fields, tensors, binary=stream._view(frames[0])[0] == MAGIC)
        except Exception as e:
            log.warning("data path: attend id=%d failed: %r", msg.rid, e)
            return self._error_reply(to, msg.rid, HANDLER_FAILED, f"attend failed: {type(e).__name__}: {e}")
        self._send(to, reply)

    @staticmethod
    def _encode_reply(rid: int, fields: dict, tensors: list, binary: bool) -> list:
        """A binary attend gets the binary reply when it fits that format (out, lse and trace times)."""
        if binary and len(tensors) == 2 and fields.keys() <= {"tq", "tk0", "tk1"}:
            out, lse = tensors
            if isinstance(out, np.ndarray) and isinstance(lse, np.ndarray) and out.dtype == lse.dtype == np.float32 \
                    and out.ndim == 3 and lse.shape == out.shape[:2]:
                times = (fields["tq"], fields["tk0"], fields["tk1"]) if len(fields) == 3 else None
                return encode_attend_reply(rid, out, lse, times)
        return encode("reply", rid, fields, tensors)

    def _error_reply(self, to: bytes | int, rid: int, code: str, reason: str) -> None:
        self.errors += 1
        if self.errors <= 5 or self.errors % 100 == 0:
            log.warning("data path %s: %s (%d errors so far)", self.tcp_endpoint, reason, self.errors)
        self._send(to, encode("error", rid, {"code": code, "reason": reason}))

    def _send(self, to: bytes | int, frames: list) -> None:
        if isinstance(to, int):  # a stream connection
            if to in self._streams:  # (else closed meanwhile)
                bufs = stream.pack(frames)
                self.bytes_sent += sum(b.nbytes for b in bufs)
                self._flush(to, bufs)  # never waits: what the socket does not take now waits for POLLOUT
            return
        try:
            # ROUTER drops a message to a peer that has gone away instead of blocking.
            self._router.send_multipart([to, *frames], copy=False, flags=zmq.NOBLOCK)
            self.bytes_sent += _nbytes(frames)
        except zmq.Again:
            log.warning("data path: reply dropped (the caller's queue is full)")


class DataLink:
    """A compute peer's data socket to one attention peer. Every method runs on the owning thread."""

    def __init__(self, ctx: zmq.Context, endpoint: str, security: Any = None, limits: Limits = DEFAULT_LIMITS):
        from .security import apply

        self.endpoint = endpoint
        self._limits = limits
        sock = _sync(ctx).socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, max(limits.max_frame_bytes, limits.max_header_bytes))
        apply(sock, security, server=False)
        sock.connect(endpoint)
        self._sock = sock
        self._ids = itertools.count(1)
        self._replies: dict[int, Message | Exception] = {}
        self._waiting: set[int] = set()
        self.closed = False
        # Held inside send/receive: close() from another thread waits for it (sockets are not thread-safe).
        self._lock = threading.Lock()
        self.bytes_sent = 0
        self.bytes_received = 0

    def send(self, op: str, fields: dict, tensors: Sequence, timeout_s: float) -> int:
        """Queue a request in the msgpack format; returns its id. `timeout_s` is both how long
        ZeroMQ may take to accept it and the peer's deadline. Raises RpcTimeout, RpcClosed."""
        return self._send(lambda rid: encode(op, rid, fields, tensors, deadline=time.time() + timeout_s), op, timeout_s)

    def send_attend(self, owner: str, layer: int, h0: int, h1: int, meta: np.ndarray, q, k, v,
                    timeout_s: float, trace: bool = False) -> int:
        """Queue one attend in the fixed binary header (wire.encode_attend); returns its id.

        meta int64 [n, 4] = (shard key, context_len, n_q, num_new_tokens) per entry; q [Tq, Hq, D],
        k/v [Tkv, Hkv, D] in the registered storage (float32, or 16-bit floats as uint16 bits), sent
        without a copy: the caller must not write into them until the reply arrives. `timeout_s`:
        how long ZeroMQ may take to accept it, and the peer's deadline. Raises RpcTimeout, RpcClosed,
        WireError (shapes/dtypes the format cannot carry)."""
        return self._send(lambda rid: encode_attend(rid, owner, layer, h0, h1, meta, q, k, v,
                                                    deadline=time.time() + timeout_s, trace=trace), "attend", timeout_s)

    def _send(self, build: Callable[[int], list], op: str, timeout_s: float) -> int:
        with self._lock:
            if self.closed:
                raise RpcClosed(f"data link to {self.endpoint} is closed")
            rid = next(self._ids)
            frames = build(rid)
            self.bytes_sent += self._send_frames(frames, op, timeout_s)
        self._waiting.add(rid)
        return rid

    def _send_frames(self, frames: list, op: str, timeout_s: float) -> int:
        try:
            # A multipart message is taken whole or not at all: NOBLOCK first, poll only when full.
            self._sock.send_multipart(frames, copy=False, flags=zmq.NOBLOCK)
        except zmq.Again:
            if not self._sock.poll(int(timeout_s * 1000), zmq.POLLOUT):
                raise RpcTimeout(f"{op} to {self.endpoint}: could not send within {timeout_s:g} s") from None
            self._sock.send_multipart(frames, copy=False)
        return _nbytes(frames)

    def receive(self, rid: int, deadline: float, alive: Callable[[], bool] = lambda: True,
                check_every_s: float = 0.05) -> Message:
        """Wait for the reply to request `rid` and return it: a Message whose tensors are read-only
        views of the received frames (an attend's: out float32 [Tq, Hq, D], lse float32 [Tq, Hq]).

        deadline: time.monotonic() seconds. Blocks in zmq poll, waking every `check_every_s` seconds to ask
        `alive()`. Raises RpcTimeout past the deadline (or for a "deadline" error reply), RpcClosed
        when `alive()` turns false (membership declared the peer dead) or the link is closed,
        RpcError(reason, code) for any other error reply. Replies to other ids that arrive
        meanwhile are kept for their own receive."""
        self._lock.acquire()
        try:
            if self.closed and rid not in self._replies:
                raise RpcClosed(f"data link to {self.endpoint} is closed")
            while rid not in self._replies:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise RpcTimeout(f"attend to {self.endpoint}: no reply in time")
                if self._readable(min(remaining, check_every_s)):
                    self._take_replies()
                elif not alive():
                    raise RpcClosed(f"attention peer at {self.endpoint} is gone")
            got = self._replies.pop(rid)
        finally:
            self._waiting.discard(rid)
            self._lock.release()
        if isinstance(got, Exception):
            raise got
        if got.op == "error":
            reason, code = str(got.fields.get("reason", "unknown error")), got.fields.get("code")
            raise (RpcTimeout if code == DEADLINE else RpcError)(reason, code)
        return got

    def _readable(self, timeout_s: float) -> bool:
        return bool(self._sock.poll(int(timeout_s * 1000) or 1, zmq.POLLIN))

    def _received(self) -> list[list]:
        """Every reply waiting now, as frame lists."""
        out = []
        while True:
            try:
                frames = self._sock.recv_multipart(flags=zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return out
            self.bytes_received += _nbytes(frames)
            out.append(frames)

    def _take_replies(self) -> None:
        for frames in self._received():
            try:
                msg = decode(frames, self._limits)
            except WireError as e:
                log.warning("data link %s: bad reply: %s", self.endpoint, e)
                if e.rid is not None and e.rid in self._waiting:
                    self._replies[e.rid] = RpcError(f"bad reply: {e}")
                continue
            if msg.rid in self._waiting:
                self._replies[msg.rid] = msg
            # else: a late reply to a request given up on; nothing waits for it

    def close(self, timeout: float = 5.0) -> None:
        """Close the socket; from another thread, once the owner is out of send/receive (bounded wait)."""
        locked = self._lock.acquire(timeout=timeout)
        try:
            if not self.closed:
                self.closed = True
                self._close_socket()
        finally:
            if locked:
                self._lock.release()

    def _close_socket(self) -> None:
        self._sock.close(linger=0)


class StreamLink(DataLink):
    """A compute peer's data link over the kernel thread's Unix-domain stream socket (net/stream.py).

    Same methods, messages and errors as DataLink; chosen at register time for a plaintext peer on
    this host. The owning thread writes requests and reads replies itself: no ZeroMQ I/O thread.
    `endpoint`: "unix://PATH" from the register reply. Raises OSError when it cannot connect."""

    def __init__(self, endpoint: str, limits: Limits = DEFAULT_LIMITS):
        self.endpoint = endpoint
        self._limits = limits
        self._sock = stream.connect(endpoint)
        self._reader = stream.FrameReader(self._sock, limits)
        self._ids = itertools.count(1)
        self._replies: dict[int, Message | Exception] = {}
        self._waiting: set[int] = set()
        self.closed = False
        self._lock = threading.Lock()
        self.bytes_sent = 0
        self.bytes_received = 0

    def _send_frames(self, frames: list, op: str, timeout_s: float) -> int:
        try:
            return stream.send_frames(self._sock, frames, timeout_s)
        except TimeoutError:
            # Part of the message may be out: the stream cannot carry another one after it.
            self._broken(f"{op} to {self.endpoint}: could not send within {timeout_s:g} s")
            raise RpcTimeout(f"{op} to {self.endpoint}: could not send within {timeout_s:g} s") from None
        except OSError as e:
            self._broken(f"{op} to {self.endpoint}: {e}")
            raise RpcClosed(f"data link to {self.endpoint}: {e}") from None

    def _readable(self, timeout_s: float) -> bool:
        return stream.wait(self._sock, select.POLLIN, timeout_s)

    def _received(self) -> list[list]:
        try:
            frames = self._reader.read()
        except OSError as e:
            self._reader.error = e
            return []
        self.bytes_received = self._reader.bytes_received
        return frames

    def _take_replies(self) -> None:
        super()._take_replies()
        if self._reader.error is not None or self._reader.closed:  # after the replies that came before
            self._broken(f"attention peer at {self.endpoint} closed the data link"
                         f"{f' ({self._reader.error})' if self._reader.error else ''}")

    def _broken(self, reason: str) -> None:
        """Fail every request in flight: the stream carries no more replies."""
        for rid in self._waiting:
            self._replies.setdefault(rid, RpcClosed(reason))
        self.closed = True
        self._sock.close()

    def _close_socket(self) -> None:
        self._sock.close()

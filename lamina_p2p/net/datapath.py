"""The data path: per-layer attend requests on sockets owned by the threads that do the work.

DESIGN.md section 5. The control path (gossip, register, free, stats) runs on each
peer's asyncio event loop (net/rpc.py). Per-layer attends do not: a round trip
through asyncio futures and executor hand-offs costs hundreds of microseconds, and
there is one per layer per micro-batch. Here, the compute side:

- `DataLink` is a compute peer's DEALER to one attention peer, owned by the
  engine's dense thread: `send` returns at once, `receive` waits for that reply.
- `StreamLink` is the same over a plain stream socket (net/stream.py: Unix-domain on one
  host, TCP between hosts), which the attention peer's kernel thread also listens on when the
  peer runs in plain text: the compute side chooses it at register time, and a round trip then
  wakes two threads instead of six (no ZeroMQ I/O threads in between).

The other end of both is the attention peer's `KernelThread` (net/kernel_thread.py).
Both sides use the wire format (net/wire.py) and the same checks as the control
path: a malformed message gets an error reply and a log line, never a crash;
the same CURVE keys (net/security.py); the same per-request deadline.
"""

from __future__ import annotations

import itertools
import logging
import select
import socket
import threading
import time
from typing import Any, Callable, Sequence

import numpy as np
import zmq

from . import busypoll, stream
from .rpc import DEADLINE, RpcClosed, RpcError, RpcTimeout
from .wire import DEFAULT_LIMITS, Limits, Message, WireError, decode, encode, encode_attend

log = logging.getLogger(__name__)


def host_id() -> str:
    """Names this machine (and boot) so two peers can tell they share one, and ipc:// works between them."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = ""
    return f"{socket.gethostname()}/{boot}"


def frames_nbytes(frames: Sequence) -> int:
    """Bytes in a message's frames (ZeroMQ frames, bytes or memoryviews), for the byte counters."""
    return sum(f.nbytes if isinstance(f, memoryview) else len(f) for f in frames)


def blocking_view(ctx: zmq.Context) -> zmq.Context:
    """A plain (blocking) view of an asyncio context: the same libzmq context, so the same ZAP handler."""
    return zmq.Context.shadow(ctx.underlying)


class DataLink:
    """A compute peer's data socket to one attention peer. Every method runs on the owning thread."""

    def __init__(self, ctx: zmq.Context, endpoint: str, security: Any = None, limits: Limits = DEFAULT_LIMITS):
        from .security import apply

        self._init_link(endpoint, limits)
        sock = blocking_view(ctx).socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, max(limits.max_frame_bytes, limits.max_header_bytes))
        apply(sock, security, server=False)
        sock.connect(endpoint)
        self._sock = sock

    def _init_link(self, endpoint: str, limits: Limits) -> None:
        """What every link holds, whatever its socket: request ids, replies by id, counters."""
        self.endpoint = endpoint
        self._limits = limits
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
        return self._send(lambda rid: self._framed(encode(op, rid, fields, tensors, deadline=time.time() + timeout_s)),
                          op, timeout_s)

    @staticmethod
    def _framed(frames: list) -> list:
        """A message's frames as this link's socket sends them (a stream frames them, net/stream.py)."""
        return frames

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
        return frames_nbytes(frames)

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
            self.bytes_received += frames_nbytes(frames)
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
    """A compute peer's data link over the kernel thread's stream socket (net/stream.py).

    Same methods, messages and errors as DataLink; chosen at register time for a plaintext peer.
    The owning thread writes requests and reads replies itself: no ZeroMQ I/O thread.
    `endpoint`: "unix://PATH" (a peer on this host) or "tcp://HOST:PORT" from the register reply. `busy_poll_us`: `receive` polls the socket
    without blocking for this many microseconds before it blocks (0: never; net/busypoll.py), and
    rehearses the last reply once when the wait is for the attend just sent.
    Raises OSError when it cannot connect, ValueError for a negative window."""

    # A wait for the attend sent last, starting this soon after it went out, has the peer's whole kernel
    # ahead of it; any other (a micro-batch pipeline's wait for an earlier one, after other work) may end
    # at any moment, and a rehearsal would delay it.
    REHEARSE_WITHIN_S = 1e-4

    def __init__(self, endpoint: str, limits: Limits = DEFAULT_LIMITS, busy_poll_us: int = 0):
        self.busy_poll_s = busypoll.busy_poll_s(busy_poll_us)
        self._init_link(endpoint, limits)
        self._sock = stream.connect(endpoint)
        self._reader = stream.FrameReader(self._sock, limits)
        self._poll = select.poll()  # one for every wait: cheaper than a new one per call when spinning
        self._poll.register(self._sock, select.POLLIN)
        self.busy_poll = busypoll.BusyPoll(self.busy_poll_s)
        self._sent_s = 0.0  # time.monotonic() when the last message went out
        self._last_attend = 0  # the id of the last attend built
        self._last_reply: list | None = None  # kept for rehearsal (net/busypoll.py)
        self.rehearsals = 0
        self.replies_waiting = 0  # polls before a window that found a reply already there (no window opened)
        self._window_due = self._rehearsal_due = False

    def receive(self, rid: int, deadline: float, alive: Callable[[], bool] = lambda: True,
                check_every_s: float = 0.05) -> Message:
        self._window_due = True
        self._rehearsal_due = self._last_reply is not None and rid == self._last_attend \
            and time.monotonic() - self._sent_s < self.REHEARSE_WITHIN_S
        try:
            return super().receive(rid, deadline, alive, check_every_s)
        finally:
            self.busy_poll.stop()

    receive.__doc__ = DataLink.receive.__doc__

    _framed = staticmethod(stream.pack)

    def send_attend(self, owner: str, layer: int, h0: int, h1: int, meta: np.ndarray, q, k, v,
                    timeout_s: float, trace: bool = False) -> int:
        name = owner.encode()

        def build(rid: int) -> list:
            self._last_attend = rid
            deadline = time.time() + timeout_s
            bufs = stream.pack_attend(rid, name, layer, h0, h1, meta, q, k, v, deadline, trace)
            return bufs if bufs is not None else \
                stream.pack(encode_attend(rid, owner, layer, h0, h1, meta, q, k, v, deadline=deadline, trace=trace))

        return self._send(build, "attend", timeout_s)

    send_attend.__doc__ = DataLink.send_attend.__doc__

    def _send_frames(self, bufs: list, op: str, timeout_s: float) -> int:
        try:
            sent = stream.send_buffers(self._sock, bufs, timeout_s)
            self._sent_s = time.monotonic()
            return sent
        except TimeoutError:
            # Part of the message may be out: the stream cannot carry another one after it.
            self._broken(f"{op} to {self.endpoint}: could not send within {timeout_s:g} s")
            raise RpcTimeout(f"{op} to {self.endpoint}: could not send within {timeout_s:g} s") from None
        except OSError as e:
            self._broken(f"{op} to {self.endpoint}: {e}")
            raise RpcClosed(f"data link to {self.endpoint}: {e}") from None

    def _readable(self, timeout_s: float) -> bool:
        # Busy-poll first (see net/busypoll.py): a reply inside the window costs no wake-up of this
        # thread. poll(0) releases the GIL on each call: the event loop's thread still runs.
        if self._window_due:  # one window a receive, and none while a reply is already here (a pipeline's
            if self._poll.poll(0):  # usual case: opening one reads the run-queue clock, a /proc file)
                self.replies_waiting += 1
                return True
            self._window_due = False
            self.busy_poll.start()
        while self.busy_poll.spinning():
            if self._poll.poll(0):
                self.busy_poll.caught_one()
                return True
            if self._rehearsal_due:
                self._rehearsal_due = False
                self._reader.rehearse(self._last_reply)
                self.rehearsals += 1
        return bool(self._poll.poll(max(int(timeout_s * 1000), 1)))

    def _received(self) -> list[list]:
        try:
            frames = self._reader.read()
        except OSError as e:
            self._reader.error = e
            return []
        self.bytes_received = self._reader.bytes_received
        if frames and self.busy_poll_s and frames_nbytes(frames[-1]) <= busypoll.REHEARSAL_MAX_BYTES:
            self._last_reply = frames[-1]
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

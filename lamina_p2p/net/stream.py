"""The data path over a plain stream socket: Unix-domain on one host, TCP between hosts (plain text only).

Why: a ZeroMQ message crosses two extra threads each way (the sender's I/O thread, then the
receiver's), so one attend round trip is six thread wake-ups where a stream socket read and
written by the two working threads themselves needs two. On a shared or loaded CPU every wake-up
waits for a time slice; measured in tools/bench_layer_path.py (issue 11).

The messages are the wire format's frames unchanged (net/wire.py: the binary attend and reply,
msgpack for the rest), each message preceded by its frame lengths:

    PREFIX   magic b"LMS1", frame count (uint32, little-endian)
    LENGTHS  one uint32 per frame
    frames   the frames' bytes, back to back

`FrameReader` checks the prefix against the same `Limits` as the decoder before it keeps anything
(frame count, each frame's size, the message's total); a stream whose framing is broken cannot be
resynchronised, so the reader raises `StreamError` and the peer answers once and closes that
connection. Only plaintext links use it (a CURVE-secured cluster keeps ZeroMQ). The Unix socket lives
in the kernel thread's private (0700) directory, so only this user's processes can connect; the TCP
listener is as open as the plaintext ZeroMQ data port next to it (a plaintext peer listens beyond
loopback only with --insecure-listen). TCP links set TCP_NODELAY: a reply must not wait for an ACK.
"""

from __future__ import annotations

import select
import socket
import struct
import time
from typing import Sequence

import numpy as np

from .wire import (ATTEND, DEFAULT_LIMITS, FLAG_DEADLINE, FLAG_TRACE, KIND_ATTEND, KIND_REPLY, MAGIC, PROTOCOL_VERSION,
                   REPLY, TAG_CODE, Limits, WireError, decode, frame_view)

STREAM_MAGIC = b"LMS1"
PREFIX = struct.Struct("<4sI")
_LENGTH = struct.Struct("<I")
_READ_CHUNK = 256 * 1024
SCHEME = "unix://"
TCP_SCHEME = "tcp://"
# Bytes in flight per direction: a prefill layer's attend is megabytes, and the default (~200 kB) makes
# each one hundreds of wake-up ping-pongs. The kernel caps it at net.core.wmem_max without privileges.
SEND_BUFFER_BYTES = 4 << 20
# A write to a Unix socket goes out in pieces of at most this many bytes, one sendmsg each. Linux allocates a larger
# Unix stream write's data in page blocks of up to 32 KB (af_unix.c, UNIX_SKB_FRAGS_SZ), and on the 2-vCPU Zen 5 VMs
# such writes took 40-150 us for runs of hundreds of messages (a batch-16 decode step's 31 KB attend, its 37 KB
# reply), where the same bytes in 16 KB pieces took 6-16 us standalone, 20-50 in the pipeline (tools/bench_unix_send.py;
# tools/PERFORMANCE_LOG.md, stop 41). TCP writes were steady whole: they are left as they are.
UNIX_PIECE_BYTES = 16 << 10


def tune(sock: socket.socket) -> socket.socket:
    """Non-blocking, with a large send buffer (best effort), and TCP_NODELAY on TCP."""
    sock.setblocking(False)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER_BYTES)
    except OSError:
        pass
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        # Nagle would hold a reply's last segment until the previous one is ACKed (delayed ACK: up to 40 ms).
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


class StreamError(WireError):
    """Broken framing on a stream: the connection cannot continue."""


_LENGTHS: dict[int, struct.Struct] = {}


def _lengths(count: int) -> struct.Struct:
    """The LENGTHS struct of a message of `count` frames (cached: built once per count)."""
    st = _LENGTHS.get(count)
    if st is None:
        st = _LENGTHS[count] = struct.Struct(f"<{count}I")
    return st


def pack(frames: Sequence) -> list[memoryview]:
    """The buffers of one framed message (for sendmsg): prefix, lengths, then the frames themselves."""
    views = [frame_view(f) for f in frames]
    head = PREFIX.pack(STREAM_MAGIC, len(views)) + _lengths(len(views)).pack(*[v.nbytes for v in views])
    # An empty frame (a shard with no new tokens: k, v of 0 rows) has its length and no bytes: sendmsg
    # writes nothing for it, and a writer waiting to see it go would wait forever.
    return [memoryview(head), *(v for v in views if v.nbytes)]


# An attend and its reply framed for a stream in one struct: prefix, the frames' lengths, the binary header.
_ATTEND_FRAMED = struct.Struct("<4sI5I" + ATTEND.format.removeprefix("<"))
_REPLY_FRAMED = struct.Struct("<4sI3I" + REPLY.format.removeprefix("<"))
_I64 = np.dtype("<i8")
_F32 = np.dtype("<f4")
_WIRE_CODE = {np.dtype("<f4"): TAG_CODE["f32"], np.dtype("<f2"): TAG_CODE["f16"], np.dtype("<u2"): TAG_CODE["u16"]}


def pack_attend(rid: int, owner: bytes, layer: int, h0: int, h1: int, meta: np.ndarray, q: np.ndarray,
                k: np.ndarray, v: np.ndarray, deadline: float, trace: bool) -> list | None:
    """`pack(encode_attend(...))`, byte for byte, for the data path's inputs: numpy arrays, C-contiguous,
    meta int64 [n, 4], q [Tq, Hq, D] and k, v [Tkv, Hkv, D] of one wire dtype (float32, float16, or
    16-bit floats as uint16 bits); `owner` utf-8. One struct pack and the arrays' own memory, where the
    general encoder's conversions and checks cost ~2x more in the pipeline (caches emptied by the
    weights' stream between two layers; tools/bench_layer_path.py). None for any other input: the caller
    encodes it the general way (which raises WireError for what the format cannot carry)."""
    if not (type(meta) is type(q) is type(k) is type(v) is np.ndarray):
        return None
    code = _WIRE_CODE.get(q.dtype)
    if code is None or k.dtype != q.dtype or v.dtype != q.dtype or meta.dtype != _I64 or q.ndim != 3 \
            or k.ndim != 3 or k.shape != v.shape or meta.ndim != 2 or meta.shape[1] != 4 or k.shape[2] != q.shape[2] \
            or not (q.flags.c_contiguous and k.flags.c_contiguous and v.flags.c_contiguous and meta.flags.c_contiguous):
        return None
    tq, hq, d = q.shape
    tkv, hkv, _ = k.shape
    head = _ATTEND_FRAMED.pack(STREAM_MAGIC, 5, ATTEND.size + len(owner), meta.nbytes, q.nbytes, k.nbytes, v.nbytes,
                               MAGIC, PROTOCOL_VERSION, KIND_ATTEND, FLAG_DEADLINE | (FLAG_TRACE if trace else 0), code,
                               rid, deadline, layer, h0, h1, meta.shape[0], tq, hq, tkv, hkv, d, len(owner))
    # (An empty frame has its length and no buffer, as in `pack`.)
    return [memoryview(head + owner), *(memoryview(a).cast("B") for a in (meta, q, k, v) if a.nbytes)]


def pack_attend_reply(rid: int, out: np.ndarray, lse: np.ndarray, times: tuple | None) -> list | None:
    """`pack(encode_attend_reply(rid, out, lse, times))`, byte for byte, in one struct pack (see `pack_attend`):
    out float32 [T, Hq, D] and lse float32 [T, Hq], C-contiguous; None for anything else."""
    if type(out) is not np.ndarray or type(lse) is not np.ndarray or out.dtype != _F32 or lse.dtype != _F32 \
            or out.ndim != 3 or lse.shape != out.shape[:2] or not (out.flags.c_contiguous and lse.flags.c_contiguous):
        return None
    head = _REPLY_FRAMED.pack(STREAM_MAGIC, 3, REPLY.size, out.nbytes, lse.nbytes, MAGIC, PROTOCOL_VERSION, KIND_REPLY,
                              FLAG_TRACE if times else 0, rid, *out.shape, *(times or (0.0, 0.0, 0.0)))
    return [memoryview(head), *(memoryview(a).cast("B") for a in (out, lse) if a.nbytes)]


def write_some(sock: socket.socket, bufs: list[memoryview]) -> list[memoryview]:
    """Write what a non-blocking socket takes now; returns what is left (empty: all written).
    Raises OSError (BrokenPipeError...) as the socket does."""
    bufs = [b for b in bufs if b.nbytes]
    while bufs:
        try:
            n = _sendmsg(sock, bufs)
        except (BlockingIOError, InterruptedError):
            return bufs
        if n == 0:
            return bufs
        bufs = _unsent(bufs, n)
    return bufs


def _sendmsg(sock: socket.socket, bufs: list[memoryview]) -> int:
    """sock.sendmsg of the start of `bufs` (byte views), on a Unix socket in pieces of at most UNIX_PIECE_BYTES,
    one call each, until one is not taken whole; the bytes sent. Raises as sendmsg when nothing was sent."""
    if sock.family != socket.AF_UNIX:
        return sock.sendmsg(bufs[:512])  # (IOV_MAX is 1024)
    sent = 0
    while bufs:
        piece, size, bufs = _split(bufs, UNIX_PIECE_BYTES)
        try:
            n = sock.sendmsg(piece)
        except (BlockingIOError, InterruptedError):
            if sent:
                return sent
            raise
        sent += n
        if n < size:
            return sent
    return sent


def _split(bufs: list[memoryview], limit: int) -> tuple[list[memoryview], int, list[memoryview]]:
    """(the first `limit` bytes of `bufs` in at most 512 buffers, their byte count, the rest)."""
    piece, size = [], 0
    for i, b in enumerate(bufs):
        if len(piece) == 512:
            return piece, size, bufs[i:]
        if size + b.nbytes <= limit:
            piece.append(b)
            size += b.nbytes
            continue
        cut = limit - size
        if cut:
            piece.append(b[:cut])
        return piece, limit, [b[cut:], *bufs[i + 1:]]
    return piece, size, []


def _unsent(bufs: list[memoryview], n: int) -> list[memoryview]:
    """What is left of `bufs` once their first `n` bytes went out (the rest of a partly sent buffer first)."""
    while n:
        if n >= bufs[0].nbytes:
            n -= bufs.pop(0).nbytes
        else:
            bufs[0], n = bufs[0][n:], 0
    return bufs


def send_frames(sock: socket.socket, frames: Sequence, timeout_s: float) -> int:
    """Write one message to a non-blocking stream socket, whole; returns its byte count.

    Raises TimeoutError when the peer does not take it within `timeout_s` seconds (part may have
    been written: the connection must then be closed), OSError (BrokenPipeError...) as the socket does."""
    return send_buffers(sock, pack(frames), timeout_s)


def send_buffers(sock: socket.socket, bufs: list, timeout_s: float) -> int:
    """`send_frames` for a message already framed (`pack`, `pack_attend`)."""
    total = sum(b.nbytes for b in bufs)
    try:  # the usual case first: the socket takes it all at once
        n = _sendmsg(sock, bufs)
    except (BlockingIOError, InterruptedError):
        n = 0
    if n == total:
        return total
    bufs = _unsent(list(bufs), n)
    deadline = None
    while True:
        bufs = write_some(sock, bufs)
        if not bufs:
            return total
        sent = total - sum(b.nbytes for b in bufs)
        if deadline is None:
            deadline = time.monotonic() + timeout_s
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not wait(sock, select.POLLOUT, remaining):
            raise TimeoutError(f"stream: the other end took {sent} of {total} bytes in {timeout_s:g} s")


def wait(sock: socket.socket, events: int, timeout_s: float) -> bool:
    """Whether the socket is ready for `events` (select.POLLIN/POLLOUT) within `timeout_s` seconds.
    (poll, not select: select fails on descriptors past 1023.)"""
    p = select.poll()
    p.register(sock, events)
    return bool(p.poll(max(int(timeout_s * 1000), 1)))


class FrameReader:
    """Reads length-prefixed messages from a non-blocking stream socket, checked against `limits`."""

    def __init__(self, sock: socket.socket, limits: Limits = DEFAULT_LIMITS):
        self._sock = sock
        self._limits = limits
        self._buf = bytearray()  # the start of a message not whole yet
        # recv_into one buffer kept for the reader's life: recv(n) allocates n bytes per call, and at
        # 256 kB that allocation (fresh pages each time) cost ~25 us of a ~30 us read (issue 11).
        self._chunk = memoryview(bytearray(_READ_CHUNK))
        self._need: tuple[int, tuple, int] | None = None  # (header bytes, frame lengths, size) of _buf's message
        self.bytes_received = 0
        self.closed = False  # the other end closed the connection
        self.error: StreamError | None = None  # the framing broke: nothing more can be read

    def read(self) -> list[list[bytearray]]:
        """Every whole message that has arrived (possibly none), each a list of frames (bytearray).

        Afterwards `closed` says the other end closed the connection (a partial message is
        dropped) and `error` holds a StreamError when the framing broke on something the limits
        refuse; the whole messages before either are still returned."""
        if self.error is not None:
            return []
        closed = False
        out: list[list[bytearray]] = []
        try:
            while True:
                try:
                    n = self._sock.recv_into(self._chunk)
                except (BlockingIOError, InterruptedError):
                    break
                except ConnectionError:
                    closed = True
                    break
                if not n:
                    closed = True
                    break
                self.bytes_received += n
                if self._buf:
                    self._buf += self._chunk[:n]
                else:
                    # Whole messages straight from the chunk, only a partial one's start kept in _buf: going
                    # through _buf cost a copy and its bookkeeping, ~12 of ~40 us a reply in the pipeline.
                    taken = self._take(self._chunk, n, out)
                    if taken < n:
                        self._buf += self._chunk[taken:n]
                if n < _READ_CHUNK:
                    break
            while (msg := self._next()) is not None:
                out.append(msg)
        except StreamError as e:
            self.error = e
        self.closed = closed
        return out

    def rehearse(self, frames: Sequence) -> None:
        """Frame `frames` (a message already handled), parse and decode it as `read` would, with no effect
        on this reader: busy-poll's rehearsal (net/busypoll.py). Never raises."""
        try:
            message = memoryview(bytearray().join(pack(frames)))
            parsed: list[list[bytearray]] = []
            self._take(message, message.nbytes, parsed)
            for one in parsed:
                decode(one, self._limits)
        except Exception:  # a rehearsal has no result: what it does is warm the caches
            pass

    def _header(self, buf, at: int, end: int) -> tuple[int, tuple, int] | None:
        """(header bytes, frame lengths, message size) of the message at buf[at:end], None while its header is
        not whole. Raises StreamError for a prefix or lengths the limits refuse."""
        if end - at < PREFIX.size:
            return None
        magic, count = PREFIX.unpack_from(buf, at)
        if magic != STREAM_MAGIC:
            raise StreamError(f"stream: message starts with {bytes(magic)!r}, not {STREAM_MAGIC!r}")
        if not 1 <= count <= self._limits.max_frames + 1:
            raise StreamError(f"stream: {count} frames, limit {self._limits.max_frames + 1}")
        head = PREFIX.size + count * _LENGTH.size
        if end - at < head:
            return None
        lengths = _lengths(count).unpack_from(buf, at + PREFIX.size)
        body = sum(lengths)
        if max(lengths) > max(self._limits.max_frame_bytes, self._limits.max_header_bytes) \
                or body - lengths[0] > self._limits.max_total_bytes:
            raise StreamError(f"stream: frames of {list(lengths)} bytes exceed the limits")
        return head, lengths, head + body

    @staticmethod
    def _frames(mv: memoryview, at: int, lengths: tuple) -> list[bytearray]:
        # Own allocation each, aligned for any dtype: a view into the read buffer would be misaligned for
        # the kernel's fast path (it copies unaligned inputs) and would pin the whole buffer for as long
        # as one frame lives.
        frames = []
        for n in lengths:
            frames.append(bytearray(mv[at:at + n]))
            at += n
        return frames

    def _take(self, chunk: memoryview, n: int, out: list) -> int:
        """Append the whole messages at the start of chunk[:n] to `out`; returns where the rest begins."""
        at = 0
        while (need := self._header(chunk, at, n)) is not None and at + need[2] <= n:
            out.append(self._frames(chunk, at + need[0], need[1]))
            at += need[2]
        return at

    def _next(self) -> list[bytearray] | None:
        """The message at the start of _buf once it is whole (then dropped from _buf), else None."""
        buf = self._buf
        need = self._need
        if need is None:
            need = self._need = self._header(buf, 0, len(buf))
            if need is None:
                return None
        head, lengths, size = need
        if len(buf) < size:
            return None
        with memoryview(buf) as mv:  # (released before the del: a bytearray with a view cannot shrink)
            frames = self._frames(mv, head, lengths)
        del buf[:size]
        self._need = None
        return frames


def tcp_host_port(endpoint: str) -> tuple[str, int]:
    """("host", port) of "tcp://host:port" (an IPv6 host in brackets). Raises ValueError."""
    host, sep, port = endpoint.removeprefix(TCP_SCHEME).rpartition(":")
    if not endpoint.startswith(TCP_SCHEME) or not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"stream endpoint {endpoint!r} is not {TCP_SCHEME}HOST:PORT")
    return host.removeprefix("[").removesuffix("]"), int(port)


def connect(endpoint: str, timeout_s: float = 10.0) -> socket.socket:
    """A non-blocking connection to a kernel thread's stream endpoint: "unix:///path" or "tcp://host:port".
    Raises ValueError for another form, OSError when it cannot connect (TCP: within `timeout_s`)."""
    if endpoint.startswith(TCP_SCHEME):
        sock = socket.create_connection(tcp_host_port(endpoint), timeout=timeout_s)
        return tune(sock)
    if not endpoint.startswith(SCHEME):
        raise ValueError(f"stream endpoint {endpoint!r} is neither {SCHEME}PATH nor {TCP_SCHEME}HOST:PORT")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(endpoint.removeprefix(SCHEME))
    except BaseException:
        sock.close()
        raise
    return tune(sock)


def listen(path: str) -> socket.socket:
    """A non-blocking Unix-domain listener at `path`."""
    return _listening(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM), path)


def listen_tcp(host: str, port: int) -> socket.socket:
    """A non-blocking TCP listener on host:port (port 0: any free one; "*" or "0.0.0.0": every IPv4
    address). Raises OSError (address in use...)."""
    host = "0.0.0.0" if host in ("*", "") else host.removeprefix("[").removesuffix("]")
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    except BaseException:
        sock.close()
        raise
    return _listening(sock, (host, port))


def _listening(sock: socket.socket, address) -> socket.socket:
    """`sock` bound to `address`, listening, non-blocking; closed if any of that fails."""
    try:
        sock.bind(address)
        sock.listen(64)
    except BaseException:
        sock.close()
        raise
    sock.setblocking(False)
    return sock

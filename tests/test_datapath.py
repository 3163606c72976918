"""The data path (net/kernel_thread.py, net/datapath.py): a kernel thread that owns its ROUTER, a link owned by its caller.

Real ZeroMQ sockets over TCP and ipc://, real CURVE keys; no event loop anywhere on this path.
"""

from __future__ import annotations

import threading
import time

import msgpack
import numpy as np
import pytest
import zmq

from lamina_p2p.net import stream
from lamina_p2p.net.datapath import DataLink, StreamLink
from lamina_p2p.net.kernel_thread import KernelThread
from lamina_p2p.net.rpc import RpcClosed, RpcError, RpcTimeout
from lamina_p2p.net.security import generate_keys, load_security
from lamina_p2p.net.wire import PROTOCOL_VERSION, Limits, decode, encode
from tests.waiting import wait_until


class Echo:
    """An attend handler that answers with its tensors doubled, noting the thread it ran on."""

    def __init__(self):
        self.threads: set[int] = set()
        self.gate: threading.Event | None = None

    def __call__(self, msg, arrived):
        self.threads.add(threading.get_ident())
        if self.gate is not None:
            self.gate.wait(10)
        if msg.fields.get("fail"):
            raise ValueError("asked to fail")
        return {"n": len(msg.tensors)}, [t * 2 for t in msg.tensors]


@pytest.fixture
def served():
    ctx = zmq.Context()
    handler = Echo()
    kt = KernelThread(ctx, "tcp://127.0.0.1", handler, limits=Limits(max_in_flight=3), stream_tcp_port=0)
    kt.start()
    links = []

    def link(endpoint=None, security=None):
        ln = DataLink(ctx, endpoint or kt.tcp_endpoint, security=security)
        links.append(ln)
        return ln

    yield kt, handler, link
    for ln in links:
        ln.close()
    kt.stop()
    ctx.term()


def burst_while_busy(kt, ln, n=8) -> list:
    """Send n attends while the kernel thread is held by a job, then release it: each one's
    outcome, "ok" or the error reply's code (past max_in_flight: "busy")."""
    gate = threading.Event()
    blocked = kt.submit(gate.wait, 10)  # the kernel thread is busy: requests queue up on the socket
    rids = [ln.send("attend", {}, [np.ones(2, np.float32)], timeout_s=10) for _ in range(n)]
    gate.set()
    blocked.result(10)
    outcomes = []
    for rid in rids:
        try:
            ln.receive(rid, time.monotonic() + 10)
            outcomes.append("ok")
        except RpcError as e:
            outcomes.append(e.code)
    return outcomes


def test_round_trips_over_tcp_and_ipc_are_matched_by_id_and_run_on_the_kernel_thread(served):
    kt, handler, link = served
    assert kt.ipc_endpoint and kt.ipc_endpoint.startswith("ipc://")
    for endpoint in (kt.tcp_endpoint, kt.ipc_endpoint):
        ln = link(endpoint)
        xs = [np.arange(i, i + 5, dtype=np.float32) for i in range(3)]  # max_in_flight: 3
        rids = [ln.send("attend", {}, [x], timeout_s=10) for x in xs]
        for rid, x in reversed(list(zip(rids, xs))):  # received out of order: still matched
            msg = ln.receive(rid, time.monotonic() + 10)
            np.testing.assert_array_equal(msg.tensors[0], x * 2)
    ran_jobs_on = kt.submit(threading.get_ident).result(10)
    assert handler.threads == {ran_jobs_on}


def test_malformed_messages_get_error_replies_and_the_thread_keeps_serving(served):
    kt, _, link = served
    ctx = zmq.Context()
    raw = ctx.socket(zmq.DEALER)
    raw.linger = 0
    raw.connect(kt.tcp_endpoint)
    bad = [[b"garbage"], [b"\x81\xa1v\x01"], [msgpack.packb({"v": PROTOCOL_VERSION, "op": "attend", "id": 5,
                                                             "t": [["f32", [2**40]]]}), b"\0" * 8],
           encode("stats", 9, {}), [bytes(f) for f in encode("attend", 3, {}, [np.zeros(4, np.float32)])][:1]]
    for frames in bad:
        raw.send_multipart(frames)
    codes = []
    for _ in bad:
        assert raw.poll(10_000)
        codes.append(msgpack.unpackb(raw.recv_multipart()[0])["f"]["code"])
    assert set(codes) <= {"bad_message", "unknown_op"} and "unknown_op" in codes
    raw.close()
    ctx.term()
    ln = link()
    with pytest.raises(RpcError, match="asked to fail"):  # a handler that raises: an error reply, not a crash
        ln.receive(ln.send("attend", {"fail": True}, [], timeout_s=10), time.monotonic() + 10)
    msg = ln.receive(ln.send("attend", {}, [np.ones(3, np.float32)], timeout_s=10), time.monotonic() + 10)
    np.testing.assert_array_equal(msg.tensors[0], np.full(3, 2, np.float32))


def test_past_max_in_flight_waiting_requests_are_answered_busy(served):
    kt, handler, link = served
    ln = link()
    seen = []
    for _ in range(5):  # the requests must all be queued at the peer before it wakes: usually the first try
        outcomes = burst_while_busy(kt, ln)
        assert outcomes.count("ok") >= 3 and set(outcomes) <= {"ok", "busy"}
        seen += outcomes
        if "busy" in seen:
            break
    assert "busy" in seen


def test_deadline_and_a_dead_peer_end_the_wait(served):
    kt, handler, link = served
    ln = link()
    handler.gate = threading.Event()
    try:
        rid = ln.send("attend", {}, [], timeout_s=0.3)
        with pytest.raises(RpcTimeout):
            ln.receive(rid, time.monotonic() + 0.3)
        rid = ln.send("attend", {}, [], timeout_s=30)
        t0 = time.monotonic()
        with pytest.raises(RpcClosed):  # membership says the peer is dead: no waiting for the deadline
            ln.receive(rid, time.monotonic() + 30, alive=lambda: False)
        assert time.monotonic() - t0 < 10
    finally:
        handler.gate.set()


def test_curve_keys_are_required_on_the_data_path(tmp_path):
    good = load_security(generate_keys(tmp_path / "good")["cluster"])
    wrong = load_security(generate_keys(tmp_path / "wrong")["cluster"])
    ctx = zmq.Context()
    kt = KernelThread(ctx, "tcp://127.0.0.1", Echo(), security=good, ipc=False)
    kt.start()
    try:
        ok = DataLink(ctx, kt.tcp_endpoint, security=good)
        msg = ok.receive(ok.send("attend", {}, [np.ones(2, np.float32)], timeout_s=10), time.monotonic() + 10)
        np.testing.assert_array_equal(msg.tensors[0], [2, 2])
        for security in (wrong, None):
            intruder = DataLink(ctx, kt.tcp_endpoint, security=security)
            with pytest.raises(RpcTimeout):  # the handshake fails: nothing is ever served
                intruder.receive(intruder.send("attend", {}, [np.ones(2, np.float32)], timeout_s=1),
                                 time.monotonic() + 1)
            intruder.close()
        ok.close()
    finally:
        kt.stop()
        ctx.term()


# -- the stream socket (net/stream.py): plaintext peers on one host ------------------------------------
@pytest.fixture(params=["unix", "tcp"])
def stream_kind(request):
    """The stream data path on one host (Unix socket) and between hosts (TCP, here over loopback)."""
    return request.param


def stream_endpoint(kt, kind):
    return kt.stream_endpoint if kind == "unix" else kt.stream_tcp_endpoint


def stream_link(kt, kind):
    return StreamLink(stream_endpoint(kt, kind))


def _bytes(bufs) -> bytes:
    return b"".join(bytes(b) for b in bufs)


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.uint16])
@pytest.mark.parametrize("shapes", [(3, 9, 3, 64, 3), (1, 4, 0, 2, 8), (16, 8, 16, 2, 128)])  # n, Hq, Tkv, Hkv, D
@pytest.mark.parametrize("trace", [False, True])
def test_the_one_struct_framing_of_an_attend_and_its_reply_is_the_general_one(dtype, shapes, trace):
    """stream.pack_attend / pack_attend_reply (the data path's fast path) give, byte for byte, what the
    general encoder framed for a stream gives; for anything else they decline (None)."""
    from lamina_p2p.net.wire import encode_attend, encode_attend_reply

    n, hq, tkv, hkv, d = shapes
    rng = np.random.default_rng(n + tkv)
    meta = rng.integers(0, 1000, (n, 4)).astype(np.int64)
    q = rng.standard_normal((n, hq, d)).astype(dtype)
    k, v = (rng.standard_normal((tkv, hkv, d)).astype(dtype) for _ in range(2))
    fast = stream.pack_attend(12345, "ownér".encode(), 7, 1, 1 + hkv, meta, q, k, v, 1.7e9 + 0.25, trace)
    general = stream.pack(encode_attend(12345, "ownér", 7, 1, 1 + hkv, meta, q, k, v, deadline=1.7e9 + 0.25, trace=trace))
    assert _bytes(fast) == _bytes(general)
    out = rng.standard_normal((n, hq, d)).astype(np.float32)
    lse = rng.standard_normal((n, hq)).astype(np.float32)
    times = (1.5, 2.5, 3.5) if trace else None
    assert _bytes(stream.pack_attend_reply(9, out, lse, times)) == _bytes(stream.pack(encode_attend_reply(9, out, lse, times)))
    # Declined: what the general encoder converts (torch, another dtype, strided) or refuses (shapes).
    import torch

    declined = [(torch.from_numpy(q), k, v, meta), (q.astype(np.float64), k, v, meta), (q, k.astype(np.float32)
                if dtype != np.float32 else k.astype(np.float16), v, meta), (q[:, ::2], k, v, meta),
                (q, k, v[:, :, :1], meta), (q, k, v, meta.astype(np.int32)), (q[0], k, v, meta)]
    for args in declined:
        assert stream.pack_attend(1, b"o", 0, 0, 1, args[3], *args[:3], 0.0, False) is None
    assert stream.pack_attend_reply(1, out.astype(np.float16), lse, None) is None
    assert stream.pack_attend_reply(1, out, lse[:, :1], None) is None
    assert stream.pack_attend_reply(1, out[:, ::2], lse[:, ::2], None) is None


def test_unix_writes_go_out_in_pieces_and_arrive_whole():
    """send_buffers and write_some write a Unix socket in pieces of at most UNIX_PIECE_BYTES (net/stream.py): every
    message, of buffers of any sizes, arrives byte for byte, including when the socket takes only part of a piece
    (a send buffer smaller than the message) and the writer waits for it."""
    import select
    import socket

    rng = np.random.default_rng(5)
    sizes = [1, stream.UNIX_PIECE_BYTES - 1, stream.UNIX_PIECE_BYTES, stream.UNIX_PIECE_BYTES + 1, 31_312, 37_496,
             700_000]
    msgs = [[rng.integers(0, 256, int(rng.integers(1, 40)), np.uint8).tobytes(),
             rng.integers(0, 256, n, np.uint8).tobytes(), rng.integers(0, 256, n // 3 + 1, np.uint8).tobytes()]
            for n in sizes]
    a, b = socket.socketpair()
    try:
        stream.tune(a), stream.tune(b)
        a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 << 10)  # a large message waits for the reader
        reader, got = stream.FrameReader(b), []
        pieces = []
        real = a.sendmsg

        class Counting:  # the piece sizes a.sendmsg is given
            family = a.family
            fileno = a.fileno

            def sendmsg(self, bufs):
                pieces.append(sum(memoryview(x).nbytes for x in bufs))
                return real(bufs)

        done = threading.Event()

        def read_all():
            while len(got) < len(msgs):
                if stream.wait(b, select.POLLIN, 5.0):
                    got.extend(reader.read())
            done.set()

        t = threading.Thread(target=read_all, daemon=True)
        t.start()
        for m in msgs[:4]:
            assert stream.send_buffers(Counting(), stream.pack(m), 10.0) == sum(len(f) for f in m) + 8 + 4 * len(m)
        for m in msgs[4:]:  # the kernel thread's way: what the socket does not take now is written later
            left = stream.write_some(Counting(), stream.pack(m))
            while left:
                stream.wait(a, select.POLLOUT, 5.0)
                left = stream.write_some(Counting(), left)
        assert done.wait(30)
        assert [[bytes(f) for f in m] for m in got] == msgs and reader.error is None
        assert max(pieces) <= stream.UNIX_PIECE_BYTES and sum(pieces) >= sum(sum(map(len, m)) for m in msgs)
    finally:
        a.close(), b.close()


def test_the_stream_reader_returns_messages_of_any_size_in_order_however_they_arrive():
    """Whole messages are parsed straight from the read chunk, a partial one's start kept until the rest
    arrives (net/stream.py FrameReader): messages smaller and larger than the chunk, cut anywhere."""
    import socket

    rng = np.random.default_rng(3)
    sizes = [10, 100_000, 3, 300_000, 256 * 1024 - 40, 256 * 1024, 7, 700_000, 1, 64]
    msgs = [[rng.integers(0, 256, 20, np.uint8).tobytes(), rng.integers(0, 256, n, np.uint8).tobytes()] for n in sizes]
    data = b"".join(_bytes(stream.pack(m)) for m in msgs)
    for cuts in ([len(data)], sorted(rng.integers(1, len(data), 25).tolist()) + [len(data)]):
        a, b = socket.socketpair()
        try:
            stream.tune(a), stream.tune(b)
            reader, got, at = stream.FrameReader(b), [], 0
            for cut in cuts:
                while at < cut:
                    try:
                        at += a.send(data[at:cut])
                    except BlockingIOError:  # the socket's buffer is full until the reader takes some
                        pass
                    got += reader.read()

            def all_read() -> bool:
                got.extend(reader.read())
                return len(got) >= len(msgs)

            wait_until(all_read, what="every message")
            assert [[bytes(f) for f in m] for m in got] == msgs and reader.error is None
        finally:
            a.close(), b.close()


def test_the_stream_socket_serves_both_headers_on_the_kernel_thread(served, stream_kind):
    kt, handler, _ = served
    assert kt.stream_endpoint and kt.stream_endpoint.startswith("unix://")
    assert kt.stream_tcp_endpoint and kt.stream_tcp_endpoint.startswith("tcp://127.0.0.1:")
    ln = stream_link(kt, stream_kind)
    try:
        xs = [np.arange(i, i + 5, dtype=np.float32) for i in range(3)]
        rids = [ln.send("attend", {}, [x], timeout_s=10) for x in xs]
        for rid, x in reversed(list(zip(rids, xs))):  # received out of order: still matched
            np.testing.assert_array_equal(ln.receive(rid, time.monotonic() + 10).tensors[0], x * 2)
        meta, q, kv = np.zeros((2, 4), np.int64), np.ones((2, 3, 4), np.float32), np.ones((2, 1, 4), np.float32)
        msg = ln.receive(ln.send_attend("me", 1, 0, 1, meta, q, kv, kv, timeout_s=10), time.monotonic() + 10)
        assert msg.op == "reply" and [t.shape for t in msg.tensors] == [(2, 4), (2, 3, 4), (2, 1, 4), (2, 1, 4)]
        np.testing.assert_array_equal(msg.tensors[1], q * 2)
        with pytest.raises(RpcError, match="asked to fail"):
            ln.receive(ln.send("attend", {"fail": True}, [], timeout_s=10), time.monotonic() + 10)
        # Empty frames (k, v of a shard with no new tokens), last in the message either way.
        msg = ln.receive(ln.send("attend", {}, [np.ones(2, np.float32), np.zeros((0, 3), np.float32)], timeout_s=10),
                         time.monotonic() + 10)
        assert [t.shape for t in msg.tensors] == [(2,), (0, 3)]
        assert ln.bytes_sent > 0 and ln.bytes_received > 0
    finally:
        ln.close()
    assert handler.threads == {kt.submit(threading.get_ident).result(10)}
    assert kt.requests == 6


def raw_stream(kt, kind):
    import socket

    if kind == "tcp":
        return socket.create_connection(stream.tcp_host_port(kt.stream_tcp_endpoint), timeout=10)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(kt.stream_endpoint.removeprefix("unix://"))
    return sock


def read_replies(sock, count, until_closed):
    """`count` framed replies, decoded; with `until_closed`, then whether the peer closed the connection."""
    import select

    sock.setblocking(False)
    reader, out = stream.FrameReader(sock), []
    deadline = time.monotonic() + 10
    closed = False
    while len(out) < count or (until_closed and not closed):
        if not select.select([sock], [], [], max(deadline - time.monotonic(), 0))[0]:
            break
        out += [decode(frames) for frames in reader.read()]
        if reader.closed:
            return out, True
    return out, closed


def test_broken_framing_gets_one_error_reply_then_the_connection_closes(served, stream_kind):
    kt, _, _ = served
    good = stream.pack(encode("attend", 4, {}, [np.ones(2, np.float32)]))
    head = b"".join(bytes(b) for b in good[:1])
    broken = [b"GARBAGE!" * 4, stream.PREFIX.pack(stream.STREAM_MAGIC, 0),  # wrong magic, no frames
              stream.PREFIX.pack(stream.STREAM_MAGIC, 10**6),  # more frames than the limits allow
              stream.PREFIX.pack(stream.STREAM_MAGIC, 2) + np.array([10, 2**31], "<u4").tobytes()]  # a huge frame
    for junk in broken:
        sock = raw_stream(kt, stream_kind)
        sock.sendall(head + b"".join(bytes(b) for b in good[1:]) + junk)  # a good message first, then the junk
        replies, closed = read_replies(sock, 2, until_closed=True)
        sock.close()
        assert [r.op for r in replies] == ["reply", "error"] and replies[1].fields["code"] == "bad_message"
        assert closed
    # Malformed messages inside good framing: error replies, the connection stays.
    sock = raw_stream(kt, stream_kind)
    bad = [[b"garbage"], encode("stats", 9, {}), [bytes(f) for f in encode("attend", 3, {}, [np.zeros(4, np.float32)])][:1]]
    for frames in bad:  # (max_in_flight is 3 here)
        sock.sendall(b"".join(bytes(b) for b in stream.pack(frames)))
    replies, closed = read_replies(sock, 3, until_closed=False)
    sock.sendall(b"".join(bytes(b) for b in stream.pack(encode("attend", 5, {}, [np.ones(2, np.float32)]))))
    replies += read_replies(sock, 1, until_closed=False)[0]
    sock.close()
    assert [r.op for r in replies] == ["error", "error", "error", "reply"] and not closed
    ln = stream_link(kt, stream_kind)  # the thread still serves everyone
    assert ln.receive(ln.send("attend", {}, [np.ones(1, np.float32)], timeout_s=10), time.monotonic() + 10).op == "reply"
    ln.close()


def test_on_the_stream_busy_deadline_and_a_closed_peer_end_the_wait(served, stream_kind):
    kt, handler, _ = served
    ln = stream_link(kt, stream_kind)
    # The requests are in the socket's buffer once send returns: the thread reads them all at once.
    outcomes = burst_while_busy(kt, ln)
    assert outcomes.count("ok") >= 3 and set(outcomes) <= {"ok", "busy"} and "busy" in outcomes
    handler.gate = threading.Event()
    try:
        with pytest.raises(RpcTimeout):
            ln.receive(ln.send("attend", {}, [], timeout_s=0.3), time.monotonic() + 0.3)
        with pytest.raises(RpcClosed):  # membership says the peer is dead: no waiting for the deadline
            ln.receive(ln.send("attend", {}, [], timeout_s=30), time.monotonic() + 30, alive=lambda: False)
    finally:
        handler.gate.set()
    ln.close()
    ln = stream_link(kt, stream_kind)
    ln.receive(ln.send("attend", {}, [], timeout_s=10), time.monotonic() + 10)
    kt.stop()  # the peer goes away: its end of the stream closes
    t0 = time.monotonic()
    with pytest.raises(RpcClosed):  # at send (broken pipe) or at once in receive, not at the deadline
        ln.receive(ln.send("attend", {}, [], timeout_s=30), time.monotonic() + 30)
    assert time.monotonic() - t0 < 10
    ln.close()


def test_curve_peers_offer_no_stream(tmp_path):
    keys = load_security(generate_keys(tmp_path / "k")["cluster"])
    ctx = zmq.Context()
    kt = KernelThread(ctx, "tcp://127.0.0.1", Echo(), security=keys, stream_tcp_port=0)
    kt.start()
    try:
        assert kt.stream_endpoint is None and kt.stream_tcp_endpoint is None
    finally:
        kt.stop()
        ctx.term()


def test_a_stream_caller_that_does_not_read_its_reply_holds_up_no_one(served, stream_kind):
    """A reply larger than the socket's buffer waits in the kernel thread's memory, not in a blocked
    write: the thread serves another caller meanwhile, and the slow caller gets its whole reply later."""
    kt, _, _ = served
    slow, other = stream_link(kt, stream_kind), stream_link(kt, stream_kind)
    try:
        big = np.arange(2 << 20, dtype=np.float32)  # 8 MB each way: far past a Unix socket's buffer
        rid = slow.send("attend", {}, [big], timeout_s=30)
        msg = other.receive(other.send("attend", {}, [np.ones(3, np.float32)], timeout_s=10), time.monotonic() + 10)
        np.testing.assert_array_equal(msg.tensors[0], np.full(3, 2, np.float32))
        np.testing.assert_array_equal(slow.receive(rid, time.monotonic() + 30).tensors[0], big * 2)
    finally:
        slow.close()
        other.close()

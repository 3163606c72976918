"""Busy-poll on the stream data path (net/busypoll.py, KernelThread and StreamLink with a window).

Real sockets and threads, a real attention peer process; no wall-clock assertions: the window's
effect on latency is measured in tools/bench_layer_path.py, here only that behaviour is unchanged
with it on (replies, deadlines, alive(), jobs, ZeroMQ on the same thread, the control path).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import zmq
import zmq.asyncio

from lamina_p2p.attention.service import AttendRequest, AttentionService
from lamina_p2p.net import busypoll, stream
from lamina_p2p.net.datapath import DataLink, StreamLink
from lamina_p2p.net.kernel_thread import KernelThread
from lamina_p2p.net.rpc import RpcClient, RpcClosed, RpcTimeout
from lamina_p2p.net.wire import decode, encode
from tests.helpers import node, one_line_error
from tests.waiting import wait_until

WINDOW_US = 200_000  # long enough that the other side always answers inside it


def test_the_window_is_off_unless_asked_for():
    assert busypoll.busy_poll_s(0) == 0.0
    assert busypoll.busy_poll_s(250) == pytest.approx(250e-6)
    with pytest.raises(ValueError, match="negative"):
        busypoll.busy_poll_s(-1)
    with pytest.raises(ValueError, match="negative"):
        KernelThread(zmq.Context.instance(), "tcp://127.0.0.1", lambda m, a: ({}, []), busy_poll_us=-5)
    ctx = zmq.Context()
    kt = KernelThread(ctx, "tcp://127.0.0.1", lambda m, a: ({}, []))
    kt.start()
    try:
        link = StreamLink(kt.stream_endpoint)
        assert kt.busy_poll_s == link.busy_poll_s == 0.0  # the default: no spinning on either side
        link.close()
    finally:
        kt.stop()
        ctx.term()


def test_busy_poll_window_opens_closes_and_backs_off_when_preempted():
    off = busypoll.BusyPoll(0.0)
    off.start()
    assert not off.spinning()  # a zero window never spins

    bp = busypoll.BusyPoll(60.0)
    assert not bp.spinning()  # no window opened yet
    bp.start()
    assert bp.spinning() and bp.spinning()
    bp.stop()
    assert not bp.spinning()

    short = busypoll.BusyPoll(1e-9)
    short.start()
    assert not short.spinning()  # the window has passed
    assert short.backoffs == 0

    # Every gap counts as a preemption (preempted_s < 0) spent on the run queue (a clock that
    # advances a second a read): it stops and backs off.
    hog = busypoll.BusyPoll(60.0, backoff_s=60.0, preempted_s=-1.0, run_queue_s=queued_clock())
    hog.start()
    assert not hog.spinning() and hog.backoffs == 1
    hog.start()  # backing off: no window opens
    assert not hog.spinning() and hog.backoffs == 1

    # Preempted again soon after a back-off ended: the next back-off is longer (doubled, capped).
    again = busypoll.BusyPoll(60.0, backoff_s=1e-4, max_backoff_s=2.5e-4, preempted_s=-1.0,
                              run_queue_s=queued_clock())
    lengths = []
    for _ in range(4):
        deadline = time.monotonic() + 10
        while time.monotonic() < again._off_until and time.monotonic() < deadline:  # the back-off passes
            pass
        again.start()
        assert not again.spinning()
        lengths.append(again._off_s)
    assert lengths == [1e-4, 2e-4, 2.5e-4, 2.5e-4] and again.backoffs == 4


def queued_clock():
    """A run-queue clock under which every read finds another second spent queued."""
    ticks = itertools.count()
    return lambda: float(next(ticks))


def test_a_gap_not_spent_on_the_run_queue_does_not_end_the_window():
    # Every gap is long (preempted_s < 0), but the thread was never queued: the hypervisor's, not ours.
    bp = busypoll.BusyPoll(60.0, preempted_s=-1.0, run_queue_s=lambda: 0.0)
    bp.start()
    assert bp.spinning() and bp.spinning()
    assert bp.backoffs == 0 and bp.host_gaps == 2


@pytest.mark.skipif(busypoll.run_queue_clock() is None, reason="no per-thread schedstat in /proc")
def test_a_spinner_sharing_its_cpu_with_a_busy_process_backs_off():
    """A real preemption: a process that never sleeps on the spinning thread's CPU takes it for a
    time slice; that gap is spent on the run queue, so the window ends and backs off."""
    cpu = min(os.sched_getaffinity(0))
    hog = subprocess.Popen([sys.executable, "-c", f"import os\nos.sched_setaffinity(0, {{{cpu}}})\nwhile True: pass"])
    result = {}

    def spin():
        os.sched_setaffinity(0, {cpu})  # this thread only
        bp = busypoll.BusyPoll(60.0)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            bp.start()
            while bp.spinning():
                pass
            if bp.backoffs:
                break
        result.update(backoffs=bp.backoffs, windows=bp.windows)

    try:
        spinner = threading.Thread(target=spin)
        spinner.start()
        spinner.join(90)
    finally:
        hog.kill()
        hog.wait()
    assert result.get("backoffs") == 1, result


class Doubler:
    def __init__(self):
        self.gate: threading.Event | None = None

    def __call__(self, msg, arrived):
        if self.gate is not None:
            self.gate.wait(10)
        return {"n": len(msg.tensors)}, [t * 2 for t in msg.tensors]


@pytest.fixture
def spinning():
    ctx = zmq.Context()
    handler = Doubler()
    kt = KernelThread(ctx, "tcp://127.0.0.1", handler, busy_poll_us=WINDOW_US)
    kt.start()
    link = StreamLink(kt.stream_endpoint, busy_poll_us=WINDOW_US)
    yield kt, handler, link, ctx
    link.close()
    kt.stop()
    ctx.term()


def test_round_trips_with_busy_poll_on_both_sides(spinning):
    kt, handler, link, ctx = spinning
    assert kt.busy_poll_s == link.busy_poll_s == pytest.approx(WINDOW_US * 1e-6)
    rng = np.random.default_rng(0)
    for i in range(20):
        x = rng.standard_normal((3, 4), dtype=np.float32)
        rid = link.send("attend", {"i": i}, [x], timeout_s=10)
        got = link.receive(rid, time.monotonic() + 30)
        np.testing.assert_array_equal(got.tensors[0], x * 2)
        assert got.fields == {"n": 1}
    # Inside the kernel thread's window: a ZeroMQ caller, and a submitted job, are served too.
    zlink = DataLink(ctx, kt.ipc_endpoint)
    try:
        rid = link.send("attend", {}, [np.ones(2, np.float32)], timeout_s=10)
        link.receive(rid, time.monotonic() + 30)
        rid = zlink.send("attend", {}, [np.ones(2, np.float32)], timeout_s=10)
        np.testing.assert_array_equal(zlink.receive(rid, time.monotonic() + 30).tensors[0], [2, 2])
        assert kt.submit(lambda: "ran").result(30) == "ran"
    finally:
        zlink.close()
    assert kt.requests == 22 and kt.errors == 0
    # Every receive opened a window, unless its reply was there already or it was backing off (a loaded
    # machine may preempt the spinner).
    bp = link.busy_poll
    assert 1 <= bp.windows + link.replies_waiting + bp.backoffs and bp.windows + link.replies_waiting <= 21


def test_spinning_link_and_peer_rehearse_the_last_message(spinning):
    """Busy-poll's rehearsal (net/busypoll.py): while a side spins, it re-runs the last message's parse and
    decode once; the round trips around it are unchanged."""
    kt, handler, link, ctx = spinning
    link.REHEARSE_WITHIN_S = 60.0  # every wait for the attend just sent counts as one that starts right after it
    meta = np.array([[1, 0, 2, 2]], np.int64)
    q, k = np.ones((2, 4, 8), np.float32), np.ones((2, 2, 8), np.float32)

    def attend(scale: float) -> int:
        return link.send_attend("owner", 0, 0, 2, meta, q * scale, k, k, timeout_s=10)

    got = link.receive(attend(1.0), time.monotonic() + 30)
    np.testing.assert_array_equal(got.tensors[1], q * 2)
    assert link.rehearsals == 0  # nothing to rehearse before the first reply
    handler.gate = threading.Event()  # the peer holds the next request: the link's wait spins, then times out
    try:
        rid = attend(1.0)
        with pytest.raises(RpcTimeout):
            link.receive(rid, time.monotonic() + 0.2)
    finally:
        handler.gate.set()
    # At the window's first empty poll, before it could back off.
    assert link.rehearsals == 1
    wait_until(lambda: kt.rehearsals >= 1, what="the kernel thread's rehearsal")
    handler.gate = None
    got = link.receive(attend(3.0), time.monotonic() + 30)  # (rehearsed or not: the reply may be there at once)
    np.testing.assert_array_equal(got.tensors[1], q * 6)
    # A wait for an earlier attend (a micro-batch pipeline's) is not rehearsed: its reply may come any moment.
    rehearsed = link.rehearsals
    handler.gate = threading.Event()
    try:
        first, _ = attend(1.0), attend(1.0)
        with pytest.raises(RpcTimeout):
            link.receive(first, time.monotonic() + 0.05)
    finally:
        handler.gate.set()
    assert link.rehearsals == rehearsed and kt.errors == 0


@pytest.mark.parametrize("storage", ["bfloat16", "float32"])
def test_the_kernel_rehearsal_leaves_the_attention_service_alone(storage):
    """The peer's kernel rehearsal (attention/rehearsal.py) runs an attend of the last request's layout on a
    pool of its own: the service's sequences, KV and next results are exactly as without it."""
    from lamina_p2p.attention.peer import AttentionPeer, AttentionPeerConfig
    from lamina_p2p.net.wire import encode_attend

    geometry = {"num_layers": 2, "num_heads": 6, "num_kv_heads": 2, "head_dim": 16, "storage": storage,
                "max_positions": 64}
    dtype = np.float32 if storage == "float32" else np.uint16
    rng = np.random.default_rng(5)

    def values(*shape):
        x = rng.standard_normal(shape).astype(np.float32)
        return x if dtype == np.float32 else (x.view(np.uint32) >> 16).astype(np.uint16)  # bf16 bits

    steps = []
    for context, n in ((0, 5), (5, 1), (6, 1)):
        meta = np.array([[3, context, n, n]], np.int64)
        steps.append((meta, values(n, 6, 16), values(n, 2, 16), values(n, 2, 16)))
    peer, reference = AttentionPeer(AttentionPeerConfig(kv_bytes=1 << 24)), AttentionService(1 << 24)
    peer.service.register("c", **geometry)
    reference.register("c", **geometry)
    for i, (meta, q, k, v) in enumerate(steps):
        msg = decode(encode_attend(i, "c", 1, 0, 2, meta, q, k, v))
        _, (out, lse) = peer._attend_data(msg, time.monotonic())
        want = reference.attend(AttendRequest("c", 1, meta[:, 0], meta[:, 1], meta[:, 2], meta[:, 3], 0, 2, q, k, v))
        np.testing.assert_array_equal(out, want[0])
        np.testing.assert_array_equal(lse, want[1])
        before = peer.service.stats()
        for _ in range(3):
            peer._rehearse_kernel()
        assert peer._rehearsal.runs == 3 * (i + 1) and peer.service.stats() == before
    peer._last_layout = ("not registered", 6, 2, 16)  # a layout it cannot rehearse: skipped, not raised, not retried
    peer._rehearse_kernel()
    peer._rehearse_kernel()
    assert peer._rehearsal.runs == 9 and peer._unrehearsable == {("not registered", 6, 2, 16)}


def test_a_rehearsal_leaves_the_reader_as_it_was():
    a, b = socket.socketpair()
    try:
        stream.tune(a), stream.tune(b)
        reader = stream.FrameReader(b)
        message = b"".join(bytes(v) for v in stream.pack(encode("attend", 7, {"x": 1}, [np.ones(3, np.float32)])))
        a.sendall(message[:11])  # part of a message: the reader holds it
        assert reader.read() == []
        reader.rehearse(encode("attend", 8, {}, [np.zeros(2, np.float32)]))
        reader.rehearse([b"\xc1 not a message"])  # what does not decode is rehearsed too, silently
        a.sendall(message[11:])
        (frames,) = wait_until(reader.read, what="the rest of the message")
        got = decode(frames)
        assert (got.rid, got.fields) == (7, {"x": 1}) and reader.error is None and not reader.closed
        np.testing.assert_array_equal(got.tensors[0], np.ones(3, np.float32))
    finally:
        a.close(), b.close()


def test_with_busy_poll_alive_and_deadlines_still_end_the_wait(spinning):
    kt, handler, link, ctx = spinning
    handler.gate = threading.Event()  # the peer holds every request until released
    try:
        rid = link.send("attend", {}, [np.ones(2, np.float32)], timeout_s=10)
        with pytest.raises(RpcClosed):
            link.receive(rid, time.monotonic() + 30, alive=lambda: False, check_every_s=0.01)
        rid = link.send("attend", {}, [np.ones(2, np.float32)], timeout_s=10)
        with pytest.raises(RpcTimeout):
            link.receive(rid, time.monotonic() + 0.05)
    finally:
        handler.gate.set()


GEOMETRY = {"num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "head_dim": 8, "storage": "float32",
            "max_positions": 64}


@pytest.mark.cluster
def test_a_peer_with_busy_poll_answers_attends_and_its_control_path(attention_peers):
    """A real attention peer whose kernel thread polls its stream socket for 1 s after every reply:
    each attend is right, and the control path (register, stats) answers while it polls."""
    (peer,) = attention_peers(1, "--busy-poll-us", "1000000")
    rng = np.random.default_rng(1)

    async def scenario():
        ctx = zmq.asyncio.Context()
        client = RpcClient(ctx, peer.address)
        link = None
        try:
            info = (await client.call("register", {"owner": "bp", **GEOMETRY}, timeout_s=10)).fields
            assert info["data_stream"].startswith("unix://")
            link = StreamLink(info["data_stream"], busy_poll_us=WINDOW_US)
            ref = AttentionService(1 << 22)
            ref.register("ref", **GEOMETRY)
            for seq in range(5):
                meta = np.array([[seq, 0, 5, 5]], np.int64)
                q = rng.standard_normal((5, 4, 8), dtype=np.float32)
                k, v = (rng.standard_normal((5, 2, 8), dtype=np.float32) for _ in range(2))
                rid = link.send_attend("bp", 0, 0, 2, meta, q, k, v, timeout_s=10)
                got = link.receive(rid, time.monotonic() + 30)
                # Right after the reply the peer's kernel thread is polling: the event loop must still answer.
                stats = (await client.call("stats", {}, timeout_s=10)).fields
                assert stats["busy_poll_us"] == 1_000_000
                assert {"busy_poll_windows", "busy_poll_caught", "busy_poll_backoffs", "busy_poll_host_gaps",
                        "busy_poll_rehearsals"} <= stats.keys()
                out, lse = ref.attend(AttendRequest("ref", 0, meta[:, 0], meta[:, 1], meta[:, 2], meta[:, 3], 0, 2,
                                                    q, k, v))
                np.testing.assert_allclose(got.tensors[0], out, rtol=1e-5, atol=1e-6)
                np.testing.assert_allclose(got.tensors[1], lse, rtol=1e-5, atol=1e-6)
            await client.call("register", {"owner": "bp-2", **GEOMETRY}, timeout_s=10)
            assert stats["data_path_requests"] == 5 and stats["data_path_errors"] == 0
            # Between attends the polling kernel thread rehearsed the message path and the kernel.
            deadline = time.monotonic() + 30
            while not (stats["busy_poll_rehearsals"] and stats["kernel_rehearsals"]) and time.monotonic() < deadline:
                stats = (await client.call("stats", {}, timeout_s=10)).fields
            assert stats["busy_poll_rehearsals"] >= 1 and stats["kernel_rehearsals"] >= 1, stats
        finally:
            if link is not None:
                link.close()
            await client.close()
            ctx.destroy(linger=0)

    asyncio.run(scenario())
    assert peer.proc.poll() is None


def test_a_negative_window_is_a_one_line_error():
    r = node("start", "--role", "attention", "--busy-poll-us", "-1")
    one_line_error(r, "--busy-poll-us")

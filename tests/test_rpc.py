"""RpcServer / RpcClient over real ZeroMQ sockets on loopback."""
import asyncio
import subprocess
import sys
import textwrap
import time

import msgpack
import numpy as np
import pytest
import uvloop
import zmq
import zmq.asyncio

from lamina_p2p.net.rpc import RpcClient, RpcClosed, RpcError, RpcServer, RpcTimeout
from lamina_p2p.net.wire import PROTOCOL_VERSION, decode, encode


def run(coro):
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


async def server_idle(server, timeout=5.0, what="server tasks to finish"):
    """Wait on the server's request tasks themselves until none is left; fail at the deadline."""
    end = time.monotonic() + timeout
    while server._tasks:
        left = end - time.monotonic()
        if left <= 0:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.wait(set(server._tasks), timeout=left)


class Cluster:
    """One server with echo/fail/hang handlers and one client, torn down whatever happens."""

    def __init__(self):
        self.ctx = zmq.asyncio.Context()
        self.server = RpcServer(self.ctx, "tcp://127.0.0.1:0")
        self.release = asyncio.Event()
        self.arrived = 0  # "hang" calls that reached the server
        self.arrival = asyncio.Condition()
        self.server.register("echo", self.echo)
        self.server.register("fail", self.fail)
        self.server.register("hang", self.hang)

    async def echo(self, msg):
        await asyncio.sleep(msg.fields.get("delay", 0))
        return {"x": msg.fields.get("x")}, [t.copy() for t in msg.tensors]

    async def fail(self, msg):
        raise ValueError("boom")

    async def hang(self, msg):
        async with self.arrival:
            self.arrived += 1
            self.arrival.notify_all()
        await self.release.wait()
        return {}, []

    async def __aenter__(self):
        await self.server.start()
        self.client = RpcClient(self.ctx, self.server.bound_address)
        return self

    async def __aexit__(self, *exc):
        await self.client.close()
        await self.server.close()
        self.ctx.destroy(linger=0)


def test_bound_address_resolves_port_zero():
    async def body():
        async with Cluster() as c:
            assert c.server.bound_address.startswith("tcp://127.0.0.1:")
            assert not c.server.bound_address.endswith(":0")

    run(body())


def test_many_concurrent_calls_are_matched_by_id():
    async def body():
        async with Cluster() as c:
            rng = np.random.default_rng(1)

            async def one(i):
                a = np.full((i % 7, 3), i, np.int64)
                m = await c.client.call("echo", {"x": i, "delay": float(rng.random() * 0.02)}, [a])
                assert m.op == "reply" and m.fields["x"] == i
                np.testing.assert_array_equal(m.tensors[0], a)

            await asyncio.gather(*(one(i) for i in range(300)))
            assert c.client.in_flight == 0
            assert c.client.bytes_sent > 0 and c.client.bytes_received > 0
            assert c.server.bytes_received == c.client.bytes_sent
            await server_idle(c.server)

    run(body())


def test_large_tensors_round_trip():
    async def body():
        async with Cluster() as c:
            a = np.random.default_rng(0).standard_normal((1024, 1024)).astype(np.float32)  # 4 MiB
            m = await c.client.call("echo", tensors=[a])
            np.testing.assert_array_equal(m.tensors[0], a)

    run(body())


def test_unknown_op_and_handler_exception_are_error_replies():
    async def body():
        async with Cluster() as c:
            with pytest.raises(RpcError, match="unknown op 'nope'") as e:
                await c.client.call("nope")
            assert e.value.code == "unknown_op"
            with pytest.raises(RpcError, match="fail failed: ValueError: boom") as e:
                await c.client.call("fail")
            assert e.value.code == "handler"
            assert (await c.client.call("echo", {"x": 5})).fields["x"] == 5
            assert c.server.errors == 2

    run(body())


def test_timeout_and_the_server_drops_the_work():
    async def body():
        async with Cluster() as c:
            t0 = time.monotonic()
            with pytest.raises(RpcTimeout):
                await c.client.call("hang", timeout_s=0.2)
            assert time.monotonic() - t0 < 1.0
            # The server cancels the handler at the request's deadline: no leaked task.
            await server_idle(c.server, what="hung handler to be cancelled")
            assert c.client.in_flight == 0
            assert (await c.client.call("echo", {"x": 1})).fields["x"] == 1

    run(body())


def test_call_to_a_peer_that_is_not_there_times_out():
    async def body():
        ctx = zmq.asyncio.Context()
        sock = ctx.socket(zmq.ROUTER)  # take a free port, then free it
        port = sock.bind_to_random_port("tcp://127.0.0.1")
        sock.close(0)
        client = RpcClient(ctx, f"tcp://127.0.0.1:{port}")
        with pytest.raises(RpcTimeout):
            await client.call("echo", timeout_s=0.2)
        await client.close()
        ctx.destroy(0)

    run(body())


def test_close_fails_pending_calls():
    async def body():
        async with Cluster() as c:
            calls = [asyncio.create_task(c.client.call("hang", timeout_s=30)) for _ in range(5)]
            async with c.arrival:
                await asyncio.wait_for(c.arrival.wait_for(lambda: c.arrived == 5), 5)
            await c.client.close()
            for t in calls:
                with pytest.raises(RpcClosed):
                    await asyncio.wait_for(t, 2)
            with pytest.raises(RpcClosed):
                await c.client.call("echo")

    run(body())


def test_hostile_input_from_a_raw_dealer():
    async def body():
        async with Cluster() as c:
            raw = c.ctx.socket(zmq.DEALER)
            raw.connect(c.server.bound_address)
            hdr = lambda **kw: msgpack.packb({"v": PROTOCOL_VERSION, "op": "echo", "id": 9, "t": [], **kw})
            bad = [
                [b"\xc1\xc1garbage"],
                [b""],
                [msgpack.packb([1, 2, 3])],
                [hdr(v=99)],
                [hdr(t=[["f32", [4]]])],  # truncated multipart: the tensor frame is missing
                [hdr(t=[["f32", [4]]]), b"\0" * 15],  # frame one byte short
                [hdr(t=[["f32", [1 << 40]]]), b"\0" * 16],  # 2**40 elements declared
                [hdr(t=[["f32", [1 << 20, 1 << 20, 1 << 20]]]), b"\0" * 16],
                [hdr(t=[["zz", [1]]]), b"\0"],
                [hdr(dl=time.time() - 10)],  # deadline already past
                [hdr(op="nope")],
                [hdr(t=[["u8", []]] * 100)] + [b"\0"] * 100,
            ]
            for frames in bad:
                await raw.send_multipart(frames)
            replies = []
            for _ in bad:
                replies.append(decode(await asyncio.wait_for(raw.recv_multipart(), 5)))
            assert all(r.op == "error" for r in replies), [r.fields for r in replies]
            reasons = " | ".join(r.fields["reason"] for r in replies)
            for word in ("msgpack", "version", "declares", "limit", "deadline", "unknown op", "frames"):
                assert word in reasons
            # Where the id was readable, the error goes back to that id.
            assert [r.rid for r in replies][4:] == [9] * 7 + [-1]  # frame count is checked first
            raw.close(0)
            # The server still serves correct calls, and has no leftover tasks.
            results = await asyncio.gather(*(c.client.call("echo", {"x": i}) for i in range(50)))
            assert [m.fields["x"] for m in results] == list(range(50))
            await server_idle(c.server)

    run(body())


def test_hostile_replies_do_not_break_the_client():
    """A server that answers garbage: the client fails that call, not the socket."""

    async def body():
        ctx = zmq.asyncio.Context()
        router = ctx.socket(zmq.ROUTER)
        port = router.bind_to_random_port("tcp://127.0.0.1")
        client = RpcClient(ctx, f"tcp://127.0.0.1:{port}")
        first = asyncio.create_task(client.call("a", timeout_s=5))
        rid_frames = await router.recv_multipart()
        rid = decode(rid_frames[1:]).rid
        await router.send_multipart([rid_frames[0], b"\xc1 garbage"])  # no id: ignored
        await router.send_multipart([rid_frames[0], *encode("reply", rid, tensors=[np.zeros(4)])[:1]])
        with pytest.raises(RpcError, match="bad reply"):
            await first
        second = asyncio.create_task(client.call("b", timeout_s=5))
        f = await router.recv_multipart()
        await router.send_multipart([f[0], *encode("reply", decode(f[1:]).rid, {"ok": 1})])
        assert (await second).fields == {"ok": 1}
        await client.close()
        router.close(0)
        ctx.destroy(0)

    run(body())


SERVER_SCRIPT = textwrap.dedent(
    """
    import asyncio, sys, uvloop, zmq.asyncio
    from lamina_p2p.net.rpc import RpcServer

    async def main():
        ctx = zmq.asyncio.Context()
        server = RpcServer(ctx, "tcp://127.0.0.1:0")
        async def echo(msg):
            return {"pid": __import__("os").getpid(), "x": msg.fields.get("x")}, [t * 2 for t in msg.tensors]
        server.register("echo", echo)
        await server.start()
        print(server.bound_address, flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)  # until stdin closes
        await server.close()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main())
    """
)


def test_server_in_another_process():
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVER_SCRIPT], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:

        async def body():
            loop = asyncio.get_running_loop()
            address = (await asyncio.wait_for(loop.run_in_executor(None, proc.stdout.readline), 30)).strip()
            assert address.startswith("tcp://"), "server process did not start"
            ctx = zmq.asyncio.Context()
            client = RpcClient(ctx, address)
            a = np.arange(200_000, dtype=np.float32)
            results = await asyncio.gather(*(client.call("echo", {"x": i}, [a], timeout_s=10) for i in range(20)))
            for i, m in enumerate(results):
                assert m.fields == {"pid": proc.pid, "x": i}
                np.testing.assert_array_equal(m.tensors[0], a * 2)
            await client.close()
            ctx.destroy(0)

        run(body())
    finally:
        proc.stdin.close()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0

"""Hostile input against real peer processes: garbage on an attention peer's port, malformed and
oversized messages, requests asking for absurd allocations, and hostile HTTP bodies against
`lamina-node serve`. After each barrage the peer must still answer correctly."""

from __future__ import annotations

import asyncio
import json
import random
import select
import socket
import urllib.error
import urllib.request

import msgpack
import numpy as np
import pytest
import zmq
import zmq.asyncio

from lamina_p2p.attention.service import AttendRequest, AttentionService
from lamina_p2p.net.rpc import RpcClient, RpcError
from lamina_p2p.net.wire import ATTEND, MAGIC, PROTOCOL_VERSION, decode, encode, encode_attend

pytestmark = pytest.mark.cluster

GEOMETRY = {"num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "head_dim": 8, "storage": "float32",
            "max_positions": 64}


@pytest.fixture(scope="module")
def peer(module_peer_group):
    (p,) = module_peer_group.attention(1, kv_memory="32MiB", threads=1)
    return p


def host_port(address):
    host, port = address.removeprefix("tcp://").rsplit(":", 1)
    return host, int(port)


def inputs(seed):
    rng = np.random.default_rng(seed)
    return (np.array([[3, 0, 5, 5]], np.int64), rng.standard_normal((5, 4, 8), dtype=np.float32),
            rng.standard_normal((5, 2, 8), dtype=np.float32), rng.standard_normal((5, 2, 8), dtype=np.float32))


async def check_serves_correctly(address, owner, seed):
    """register + attend through a real RpcClient, compared with a fresh local AttentionService."""
    meta, q, k, v = inputs(seed)
    ctx = zmq.asyncio.Context()
    client = RpcClient(ctx, address)
    try:
        await client.call("register", {"owner": owner, **GEOMETRY}, timeout_s=10)
        msg = await client.call("attend", {"owner": owner, "layer": 0, "h0": 0, "h1": 2}, [meta, q, k, v],
                                timeout_s=10)
        await client.call("drop", {"owner": owner}, timeout_s=10)
    finally:
        await client.close()
        ctx.destroy(linger=0)
    svc = AttentionService(1 << 22)
    svc.register("ref", **GEOMETRY)
    out, lse = svc.attend(AttendRequest("ref", 0, meta[:, 0], meta[:, 1], meta[:, 2], meta[:, 3], 0, 2, q, k, v))
    np.testing.assert_allclose(msg.tensors[0], out, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(msg.tensors[1], lse, rtol=1e-5, atol=1e-6)


def test_garbage_on_the_port_then_still_correct(peer):
    rng = random.Random(1234)
    host, port = host_port(peer.address)
    asyncio.run(check_serves_correctly(peer.address, "before", 1))

    # 1. Raw TCP that is not ZMTP: random bytes, a valid signature followed by junk, an endless
    #    stream, a connection that just closes; none of it is answered, none of it stops the peer.
    zmtp_signature = b"\xff" + b"\0" * 8 + b"\x7f"
    payloads = [bytes(rng.getrandbits(8) for _ in range(rng.randrange(1, 4096))) for _ in range(20)]
    payloads += [zmtp_signature + b"\x03\x00NULL" + bytes(rng.getrandbits(8) for _ in range(500)),
                 zmtp_signature + b"\x03\x00CURVE" + b"\0" * 40, b"", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
                 b"\x00" * 200_000]
    for data in payloads:
        with socket.create_connection((host, port), timeout=5) as s:
            try:
                s.sendall(data)
            except OSError:
                pass  # the peer may hang up first: that is allowed

    async def zmtp_barrage():
        ctx = zmq.asyncio.Context()
        sock = ctx.socket(zmq.DEALER)
        sock.linger = 0
        sock.connect(peer.address)
        sent = 0

        async def send(frames):
            nonlocal sent
            await sock.send_multipart(frames)
            sent += 1

        # 2. Well-framed ZeroMQ messages with random contents.
        for _ in range(60):
            await send([bytes(rng.getrandbits(8) for _ in range(rng.randrange(0, 300)))
                        for _ in range(rng.randrange(1, 6))])
        # 3. Truncated messages: a valid attend with its frames cut short or missing.
        meta, q, k, v = inputs(2)
        good = [bytes(f) for f in encode("attend", 77, {"owner": "x", "layer": 0, "h0": 0, "h1": 2},
                                         [meta, q, k, v])]
        for i in range(1, len(good)):
            await send(good[:i])  # frames missing
            await send(good[:i] + [good[i][: len(good[i]) // 2]])  # last frame cut
        await send([good[0][:5]])  # header cut
        # 4. Oversized: a header past the limit, too many frames, shapes declaring petabytes.
        await send([msgpack.packb({"v": PROTOCOL_VERSION, "op": "attend", "id": 1, "pad": "x" * 70_000})])
        await send([msgpack.packb({"v": PROTOCOL_VERSION, "op": "free", "id": 4,
                                   "f": {"owner": "x", "seq_ids": list(range(10**6))}})])
        await send([msgpack.packb({"v": PROTOCOL_VERSION, "op": "stats", "id": 2})] + [b"x"] * 100)
        await send([msgpack.packb({"v": PROTOCOL_VERSION, "op": "attend", "id": 3,
                                   "t": [["f32", [2**40, 2**40]]]}), b"\0" * 16])
        # Every one of them is answered with an error reply: the peer read and refused each.
        replies = []
        async with asyncio.timeout(30):
            while len(replies) < sent:
                replies.append(msgpack.unpackb((await sock.recv_multipart())[0]))
        sock.close()
        ctx.destroy(linger=0)
        return replies

    replies = asyncio.run(zmtp_barrage())
    assert all(r["op"] == "error" for r in replies), [r for r in replies if r["op"] != "error"][:3]
    assert {r["f"]["code"] for r in replies} <= {"bad_message", "unknown_op", "handler"}
    asyncio.run(check_serves_correctly(peer.address, "after", 3))
    assert peer.proc.poll() is None


def test_requests_asking_for_absurd_allocations_are_refused(peer):
    async def scenario():
        ctx = zmq.asyncio.Context()
        client = RpcClient(ctx, peer.address)

        async def refused(op, fields, tensors=(), match=None):  # None: any RpcError
            with pytest.raises(RpcError, match=match):
                await client.call(op, fields, tensors, timeout_s=10)

        try:
            for bad in ({"num_layers": 10**6}, {"num_layers": 2**62}, {"head_dim": 10**5}, {"num_heads": 10**7},
                        {"num_kv_heads": 1024, "num_heads": 1024, "max_positions": 1 << 20},
                        {"max_positions": 2**40}, {"num_layers": -1}, {"head_dim": "8"}, {"num_layers": 2.5}):
                await refused("register", {"owner": "absurd", **GEOMETRY, **bad}, match="register")
            await refused("register", {"owner": "o" * 10_000, **GEOMETRY}, match="owner")
            await refused("register", {"owner": ["not", "a", "str"], **GEOMETRY}, match="owner")
            await client.call("register", {"owner": "victim", **GEOMETRY}, timeout_s=10)
            meta, q, k, v = inputs(4)
            for fields in ({"layer": 10**9}, {"layer": -1}, {"h0": 0, "h1": 10**6}, {"h0": -5}, {"h1": 2**62}):
                await refused("attend", {"owner": "victim", "layer": 0, "h0": 0, "h1": 2, **fields},
                              [meta, q, k, v])
            many = np.zeros((100_000, 4), np.int64)
            await refused("attend", {"owner": "victim", "layer": 0, "h0": 0, "h1": 2}, [many, q, k, v],
                          match="sequences")
            # A free with 20k ids is over the cap (one with a million does not fit a header: see the
            # barrage above, whose oversized header gets an error reply).
            await refused("free", {"owner": "victim", "seq_ids": [1] * 20_000}, match="seq_ids")
            stats = (await client.call("stats", timeout_s=10)).fields
            assert stats["owners"] == 1 and stats["sequences"] == 0  # only "victim", holding nothing
            await client.call("drop", {"owner": "victim"}, timeout_s=10)
        finally:
            await client.close()
            ctx.destroy(linger=0)
        await check_serves_correctly(peer.address, "after-absurd", 5)

    asyncio.run(scenario())


def register_for_data(peer) -> dict:
    """Register "data-victim" on the peer; its register reply (the data path's endpoints)."""
    async def register():
        ctx = zmq.asyncio.Context()
        client = RpcClient(ctx, peer.address)
        try:
            return (await client.call("register", {"owner": "data-victim", **GEOMETRY}, timeout_s=10)).fields
        finally:
            await client.close()
            ctx.destroy(linger=0)

    return asyncio.run(register())


def data_barrage():
    """(barrage, a good msgpack attend, a good binary attend (id 12)) for "data-victim", as frame lists."""
    rng = random.Random(99)
    meta, q, k, v = inputs(6)
    good = [bytes(f) for f in encode("attend", 7, {"owner": "data-victim", "layer": 0, "h0": 0, "h1": 2},
                                     [meta, q, k, v])]
    barrage = [[bytes(rng.getrandbits(8) for _ in range(rng.randrange(0, 200))) for _ in range(rng.randrange(1, 5))]
               for _ in range(30)]
    barrage += [good[:i] for i in range(1, len(good))] + [good[:-1] + [good[-1][:7]]]
    barrage += [[bytes(f) for f in encode("attend", 8, {"owner": "data-victim", "layer": 10**9, "h0": 0, "h1": 2},
                                          [meta, q, k, v])],
                [bytes(f) for f in encode("attend", 9, {"owner": "data-victim", "layer": 0, "h0": 0, "h1": 2},
                                          [np.zeros((100_000, 4), np.int64), q, k, v])],
                [bytes(f) for f in encode("register", 10, {"owner": "x", **GEOMETRY})],
                [msgpack.packb({"v": PROTOCOL_VERSION, "op": "attend", "id": 11, "t": [["f32", [2**40, 2**40]]]}),
                 b"\0" * 16]]
    # The hot path's fixed binary header, broken every way its decoder checks.
    gb = [bytes(f) for f in encode_attend(12, "data-victim", 0, 0, 2, meta, q, k, v)]
    absurd = ATTEND.pack(MAGIC, PROTOCOL_VERSION, 1, 0, 0, 13, 0.0, 0, 0, 2, 1, 2**31 - 1, 2**31 - 1, 5, 2, 8, 11)
    barrage += [[gb[0][:10], *gb[1:]], [gb[0] + b"x", *gb[1:]], gb[:-1], gb + [b""], [gb[0], gb[1], gb[2][:-4], *gb[3:]],
                [absurd + b"data-victim", *gb[1:]], [bytes([MAGIC, PROTOCOL_VERSION, 9]), *gb[1:]],
                [bytes([MAGIC, PROTOCOL_VERSION + 1]) + gb[0][2:], *gb[1:]], [gb[0][:-11] + b"\xff" * 11, *gb[1:]],
                [bytes(f) for f in encode_attend(14, "data-victim", 10**9, 0, 2, meta, q, k, v)],
                [bytes(f) for f in encode_attend(15, "data-victim", 0, 0, 2, np.zeros((100_000, 4), np.int64),
                                                 q, k, v)]]
    return barrage, good, gb


def test_hostile_messages_on_the_data_path_are_answered_and_the_peer_keeps_serving(peer):
    """The per-layer data socket (the kernel thread's own ROUTER, named in the register reply) takes the
    same barrage: garbage, truncated and absurd attends each get an error reply; the peer still serves."""
    barrage, good, gb = data_barrage()
    info = register_for_data(peer)
    tcp, ipc = info["data"], info["data_ipc"]
    assert tcp.startswith("tcp://") and ipc.startswith("ipc://")
    ctx = zmq.Context()
    try:
        for endpoint in (tcp, ipc):
            sock = ctx.socket(zmq.DEALER)
            sock.linger = 0
            sock.connect(endpoint)
            for frames in barrage:
                sock.send_multipart(frames)
            replies = []
            while len(replies) < len(barrage):
                assert sock.poll(30_000), f"{len(replies)} of {len(barrage)} answered on {endpoint}"
                replies.append(msgpack.unpackb(sock.recv_multipart()[0]))
            assert all(r["op"] == "error" for r in replies)
            assert {r["f"]["code"] for r in replies} <= {"bad_message", "unknown_op", "handler"}
            sock.send_multipart(good)  # and a well-formed attend on the same socket is served
            assert sock.poll(30_000)
            assert msgpack.unpackb(sock.recv_multipart()[0])["op"] == "reply"
            sock.send_multipart(gb)  # in either header: the binary one is answered in kind
            assert sock.poll(30_000)
            reply = decode(sock.recv_multipart())
            assert reply.op == "reply" and reply.rid == 12 and reply.tensors[0].shape == (5, 4, 8)
            sock.close()
    finally:
        ctx.term()
    asyncio.run(check_serves_correctly(peer.address, "after-data-barrage", 7))
    assert peer.proc.poll() is None


# -- HTTP -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def http_server(tiny, serve_url):
    return serve_url(tiny, "--kv-memory", "16MiB")


def post(url, body: bytes, path="/v1/completions"):
    req = urllib.request.Request(url + path, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        raw = e.read()
        try:
            return e.code, json.loads(raw)
        except ValueError:
            return e.code, raw[:200]


def test_hostile_http_bodies_get_4xx_in_openai_shape(http_server):
    url = http_server

    def completion(**fields):
        return json.dumps({"model": "tiny", "prompt": [1, 2, 3], "max_tokens": 2, **fields}).encode()

    cases = {
        "oversized": (b'{"model": "tiny", "prompt": "' + b"a" * (9 << 20) + b'"}', 413),
        "invalid json": (b'{"model": "tiny", "prompt": [1, 2', 400),
        "not utf-8": (b'{"model": "\xff\xfe"}', 400),
        "deeply nested": (b'{"model": "tiny", "prompt": ' + b"[" * 200_000 + b"]" * 200_000 + b"}", 400),
        "max_tokens 1e12": (completion(max_tokens=10**12), 400),
        "max_tokens huge int": (completion(max_tokens=10**400), 400),
        "temperature NaN": (completion().replace(b'"max_tokens"', b'"temperature": NaN, "max_tokens"'), 400),
        "temperature inf": (completion().replace(b'"max_tokens"', b'"temperature": Infinity, "max_tokens"'), 400),
        "top_p -inf": (completion().replace(b'"max_tokens"', b'"top_p": -Infinity, "max_tokens"'), 400),
        "temperature 1e999": (completion().replace(b'"max_tokens"', b'"temperature": 1e999, "max_tokens"'), 400),
        "seed 1e400": (completion(seed=10**400), 400),
        "n huge": (completion(n=10**9), 400),
        "logprobs huge": (completion(logprobs=10**9), 400),
        "prompt token id huge": (completion(prompt=[10**12]), 400),
        "prompt token id negative": (completion(prompt=[-1]), 400),
        "prompt too long": (completion(prompt=[1] * 100_000), 400),
        "many prompts": (completion(prompt=[[1]] * 100_000), 400),
        "stop huge": (completion(stop=["x" * 100] * 10_000), 400),
        "stop_token_ids huge": (completion(stop_token_ids=[10**30]), 400),
        "prompt wrong type": (completion(prompt=5), 400),
        "max_tokens wrong type": (completion(max_tokens="5"), 400),
        "body is a list": (b"[1, 2, 3]", 400),
        "messages wrong type": (json.dumps({"model": "tiny", "messages": "hi"}).encode(), 400),
    }
    failures = []
    for name, (body, want) in cases.items():
        path = "/v1/chat/completions" if b'"messages"' in body else "/v1/completions"
        status, reply = post(url, body, path)
        err = reply.get("error") if isinstance(reply, dict) else None
        if status != want or not (isinstance(err, dict) and {"message", "type", "param", "code"} <= set(err)):
            failures.append((name, status, str(reply)[:200]))
    assert not failures, failures
    # ... and the server still serves.
    status, reply = post(url, completion())
    assert status == 200 and reply["choices"][0]["finish_reason"] in ("length", "stop")


# -- in-process: what libzmq and the server bound before any handler runs --------------------------
def test_oversized_frames_are_dropped_by_libzmq_and_a_flood_is_answered_busy():
    from lamina_p2p.net.rpc import RpcServer, RpcTimeout
    from lamina_p2p.net.wire import Limits

    limits = Limits(max_frame_bytes=1 << 16, max_total_bytes=1 << 17, max_in_flight=4)

    async def scenario():
        ctx = zmq.asyncio.Context()
        server = RpcServer(ctx, "tcp://127.0.0.1:0", limits)
        gate = asyncio.Event()

        async def slow(msg):
            await gate.wait()
            return {"n": len(msg.tensors)}, []

        server.register("slow", slow)
        await server.start()
        try:
            # A frame past MAXMSGSIZE: libzmq drops the connection before buffering it; no reply.
            big = RpcClient(ctx, server.bound_address)
            with pytest.raises(RpcTimeout):
                await big.call("slow", tensors=[np.zeros(1 << 20, np.uint8)], timeout_s=1.0)
            await big.close()
            # A flood: the first four wait in the handler, the rest are refused at once as busy.
            client = RpcClient(ctx, server.bound_address)
            calls = [asyncio.ensure_future(client.call("slow", timeout_s=10)) for _ in range(10)]
            async with asyncio.timeout(10):
                while sum(c.done() for c in calls) < 6:
                    await asyncio.wait([c for c in calls if not c.done()], return_when=asyncio.FIRST_COMPLETED)
            busy = [c for c in calls if c.done()]
            assert all(isinstance(c.exception(), RpcError) and c.exception().code == "busy" for c in busy)
            gate.set()
            results = await asyncio.gather(*[c for c in calls if c not in busy])
            assert [r.fields for r in results] == [{"n": 0}] * 4
            await client.close()
        finally:
            await server.close()
            ctx.destroy(linger=0)

    asyncio.run(scenario())


def test_hostile_gossip_entries_are_dropped(peer):
    """Entries with non-finite load, negative sizes, oversized names or wrong types never enter the table."""
    def entry(i, **bad):
        return {"id": f"junk{i}", "role": "attention", "address": f"tcp://127.0.0.1:{10000 + i}", "device": "cpu",
                "kv_total_bytes": 1, "kv_free_bytes": 1, "load": 0.0, "version": PROTOCOL_VERSION,
                "cluster": "lamina", "heartbeat": 1, "ready": True, **bad}

    junk = [entry(0, load=float("nan")), entry(1, load=float("inf")), entry(2, kv_free_bytes=-5),
            entry(3, device="x" * 1000), entry(4, heartbeat=True), entry(5, role="king"), entry(6, id="i" * 100),
            entry(7, address=["tcp://x:1"]), "not a map", 17]

    async def scenario():
        ctx = zmq.asyncio.Context()
        client = RpcClient(ctx, peer.address)
        try:
            reply = await client.call("gossip", {"from": "junk0", "cluster": "lamina", "version": PROTOCOL_VERSION,
                                                 "leave": False, "peers": junk}, timeout_s=10)
            assert all(not p["id"].startswith("junk") for p in reply.fields["peers"])
            table = (await client.call("status", timeout_s=10)).fields
            assert all(not str(p["id"]).startswith(("junk", "iii")) for p in table["peers"])
        finally:
            await client.close()
            ctx.destroy(linger=0)
        await check_serves_correctly(peer.address, "after-gossip", 6)

    asyncio.run(scenario())


def test_hostile_messages_on_the_stream_data_path_are_answered_and_the_peer_keeps_serving(peer):
    """The plaintext peer's Unix-domain stream socket (net/stream.py, "data_stream" in the register reply)
    takes the same barrage in good framing: each gets an error reply on the same connection, then a good
    attend in either header is served; broken framing gets one error reply and that connection closes."""
    from lamina_p2p.net import stream

    barrage, good, gb = data_barrage()
    endpoint = register_for_data(peer)["data_stream"]
    assert endpoint.startswith("unix://")

    def connect():
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(30)
        sock.connect(endpoint.removeprefix("unix://"))
        return sock

    def replies(sock, count):
        sock.setblocking(False)
        reader, out = stream.FrameReader(sock), []
        while len(out) < count and not reader.closed:
            assert select.select([sock], [], [], 30)[0], f"{len(out)} of {count} answered on the stream"
            out += [decode(frames) for frames in reader.read()]
        sock.setblocking(True)
        return out, reader.closed

    sock = connect()
    for frames in barrage:
        sock.sendall(b"".join(bytes(b) for b in stream.pack(frames)))
    got, closed = replies(sock, len(barrage))
    assert not closed and all(r.op == "error" for r in got) and len(got) == len(barrage)
    assert {r.fields["code"] for r in got} <= {"bad_message", "unknown_op", "handler"}
    for frames, rid in ((good, 7), (gb, 12)):
        sock.sendall(b"".join(bytes(b) for b in stream.pack(frames)))
        (reply,), _ = replies(sock, 1)
        assert reply.op == "reply" and reply.rid == rid and reply.tensors[0].shape == (5, 4, 8)
    sock.close()
    rng = random.Random(7)
    for junk in (bytes(rng.getrandbits(8) for _ in range(300)), stream.PREFIX.pack(stream.STREAM_MAGIC, 2**31),
                 stream.PREFIX.pack(stream.STREAM_MAGIC, 1) + (2**31).to_bytes(4, "little")):
        sock = connect()
        sock.sendall(junk)
        got, closed = replies(sock, 1)
        assert [r.fields["code"] for r in got] == ["bad_message"]
        assert closed or replies(sock, 2)[1]
        sock.close()
    asyncio.run(check_serves_correctly(peer.address, "after-stream-barrage", 7))
    assert peer.proc.poll() is None

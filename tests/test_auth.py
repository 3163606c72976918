"""CURVE authentication between real peer processes: the right key works; a wrong key, no key and a
replayed connection are refused; a peer with the wrong key never shows up in `status`."""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import threading
import time

import numpy as np
import pytest
import zmq
import zmq.asyncio

from lamina_p2p.attention.service import AttendRequest, AttentionService
from lamina_p2p.launch import stop_all
from lamina_p2p.net.rpc import RpcClient, RpcServer, RpcTimeout
from lamina_p2p.net.security import generate_keys, load_security
from helpers import node
from waiting import wait_until

pytestmark = [pytest.mark.cluster, pytest.mark.skipif(not zmq.has("curve"), reason="libzmq without CURVE")]

FAST = ["--heartbeat", "0.1", "--dead-after", "1.5"]
GEOMETRY = {"num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "head_dim": 8, "storage": "float32",
            "max_positions": 64}



@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    root = tmp_path_factory.mktemp("keys")
    out = node("keygen", "--out", str(root / "good"), "--peer", "a", "--peer", "b", timeout=60)
    assert out.returncode == 0, out.stderr
    assert oct((root / "good" / "cluster.key_secret").stat().st_mode & 0o777) == "0o600"
    generate_keys(root / "other")  # another cluster's secret: the wrong key
    only_a = root / "allow-a"
    only_a.mkdir()
    shutil.copy(root / "good" / "allow" / "a.key", only_a)
    return {"good": str(root / "good" / "cluster.key_secret"), "wrong": str(root / "other" / "cluster.key_secret"),
            "a": str(root / "good" / "peers" / "a.key_secret"), "b": str(root / "good" / "peers" / "b.key_secret"),
            "allow_a": str(only_a)}


@pytest.fixture
def attention(launch_peer):
    """Factory: attention(*args) -> an attention peer on loopback (fast failure detection), stopped at teardown."""
    return lambda *args: launch_peer(["start", "--role", "attention", "--listen", "tcp://127.0.0.1:0",
                                      "--kv-memory", "32MiB", "--threads", "1", *FAST, *args])


def _round_trip_inputs(seed: int):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((3, 4, 8), dtype=np.float32)
    k = rng.standard_normal((3, 2, 8), dtype=np.float32)
    v = rng.standard_normal((3, 2, 8), dtype=np.float32)
    meta = np.array([[7, 0, 3, 3]], np.int64)
    return meta, q, k, v


def expected_attend(seed: int):
    meta, q, k, v = _round_trip_inputs(seed)
    svc = AttentionService(1 << 22)
    svc.register("ref", **GEOMETRY)
    return svc.attend(AttendRequest("ref", 1, meta[:, 0], meta[:, 1], meta[:, 2], meta[:, 3], 0, 2, q, k, v))


async def register_and_attend(client: RpcClient, owner: str, seed: int, timeout: float = 10.0):
    await client.call("register", {"owner": owner, **GEOMETRY}, timeout_s=timeout)
    meta, q, k, v = _round_trip_inputs(seed)
    msg = await client.call("attend", {"owner": owner, "layer": 1, "h0": 0, "h1": 2}, [meta, q, k, v],
                            timeout_s=timeout)
    return msg.tensors[0], msg.tensors[1]


def call(address, security, op, fields=None, timeout=5.0):
    async def go():
        ctx = zmq.asyncio.Context()
        client = RpcClient(ctx, address, security=security)
        try:
            return (await client.call(op, fields, timeout_s=timeout)).fields
        finally:
            await client.close()
            ctx.destroy(linger=0)

    return asyncio.run(go())


def status(address, *key_args):
    out = node("status", "--join", address, "--json", "--timeout", "3", *key_args, timeout=60)
    return out.returncode, (json.loads(out.stdout) if out.returncode == 0 else out.stderr)


def test_secured_cluster_works_and_refuses_wrong_and_missing_keys(keys, attention):
    good, wrong = load_security(keys["good"]), load_security(keys["wrong"])
    seed_peer = attention("--secret", keys["good"])
    # A second attention peer with the key joins; one with another cluster's key tries to.
    second = attention("--secret", keys["good"], "--join", seed_peer.address)
    bad_peer = attention("--secret", keys["wrong"], "--join", seed_peer.address)

    async def scenario():
        from lamina_p2p.compute.remote import join_cluster

        # A compute peer joins with the key: gossip works both ways, and attention round trips.
        async with join_cluster([seed_peer.address], security=good, heartbeat_interval=0.1,
                                dead_after=1.5) as transport:
            await transport.membership.wait_for(lambda m: len(m.peers(role="attention")) == 2, timeout=20)
            for i, p in enumerate(transport.membership.peers(role="attention")):
                client = RpcClient(transport.zmq_context, p.address, security=transport.membership.security)
                try:
                    out, lse = await register_and_attend(client, f"good-{i}", seed=i)
                finally:
                    await client.close()
                ref_out, ref_lse = expected_attend(seed=i)
                np.testing.assert_allclose(out, ref_out, rtol=1e-5, atol=1e-6)
                np.testing.assert_allclose(lse, ref_lse, rtol=1e-5, atol=1e-6)
            ids = {p.id for p in transport.membership.peers()}
            assert bad_peer.peer_id not in ids
        # Wrong key and no key: no work gets in (the connection never completes; calls time out).
        for security in (wrong, None):
            ctx = zmq.asyncio.Context()
            client = RpcClient(ctx, seed_peer.address, security=security)
            with pytest.raises(RpcTimeout):
                await register_and_attend(client, "intruder", seed=9, timeout=1.0)
            await client.close()
            ctx.destroy(linger=0)

    asyncio.run(scenario())
    stats = call(seed_peer.address, good, "stats")
    assert stats["owners"] == 1 and stats["attend_calls"] == 1  # "good-k" only: no intruder

    # The peer with the wrong key has been knocking (failed handshakes are counted) but is not shown.
    rc, table = wait_until(lambda: (lambda r: r if r[0] == 0 and r[1]["handshake_failures"] >= 3 else None)(
        status(seed_peer.address, "--secret", keys["good"])), 20, "the wrong-key peer's handshakes")
    shown = {p["id"] for p in table["peers"]}
    assert second.peer_id in shown and bad_peer.peer_id not in shown
    # ... and sees nobody: its own table is itself alone.
    rc, own = status(bad_peer.address, "--secret", keys["wrong"])
    assert rc == 0 and [p["id"] for p in own["peers"]] == [bad_peer.peer_id]
    # `status` without the key, or with the wrong one, gets nothing.
    rc, err = status(seed_peer.address)
    assert rc != 0 and "--secret" in err
    rc, err = status(seed_peer.address, "--secret", keys["wrong"])
    assert rc != 0


def test_allow_list_admits_listed_peer_keys_only(keys):
    """In-process servers, allow-list mode: only peer a's key is allowed; b and the bare cluster key are not."""
    server_sec = load_security(keys["good"], keys["a"], keys["allow_a"])
    as_a = load_security(keys["good"], keys["a"], keys["allow_a"])
    as_b = load_security(keys["good"], keys["b"], keys["allow_a"])
    cluster_only = load_security(keys["good"])

    async def scenario():
        ctx = zmq.asyncio.Context()
        server = RpcServer(ctx, "tcp://127.0.0.1:0", security=server_sec)
        calls = []

        async def echo(msg):
            calls.append(msg.fields)
            return {"ok": True}, []

        server.register("echo", echo)
        await server.start()
        try:
            client = RpcClient(ctx, server.bound_address, security=as_a)
            assert (await client.call("echo", {"who": "a"}, timeout_s=5)).fields == {"ok": True}
            await client.close()
            for who, sec in (("b", as_b), ("cluster", cluster_only)):
                client = RpcClient(ctx, server.bound_address, security=sec)
                with pytest.raises(RpcTimeout):
                    await client.call("echo", {"who": who}, timeout_s=1.0)
                await client.close()
            assert calls == [{"who": "a"}]
            assert server.handshake_failures >= 2
        finally:
            await server.close()
            ctx.destroy(linger=0)

    asyncio.run(scenario())


class Relay:
    """A TCP relay that records what the client sent, to replay it later."""

    def __init__(self, target: tuple[str, int]):
        self.target = target
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.client_bytes = bytearray()
        self.threads = [threading.Thread(target=self._accept, daemon=True)]
        self.threads[0].start()

    def _accept(self):
        conn, _ = self.sock.accept()
        upstream = socket.create_connection(self.target)
        self.conns = (conn, upstream)
        t = threading.Thread(target=self._pump, args=(upstream, conn, None), daemon=True)
        t.start()
        self._pump(conn, upstream, self.client_bytes)

    @staticmethod
    def _pump(src, dst, record):
        try:
            while data := src.recv(65536):
                if record is not None:
                    record += data
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self):
        self.sock.close()
        for s in getattr(self, "conns", ()):
            s.close()


def test_replayed_connection_is_refused(keys, attention):
    good = load_security(keys["good"])
    peer = attention("--secret", keys["good"])
    host, port = peer.address.removeprefix("tcp://").rsplit(":", 1)
    relay = Relay((host, int(port)))

    async def legit():
        ctx = zmq.asyncio.Context()
        client = RpcClient(ctx, f"tcp://127.0.0.1:{relay.port}", security=good)
        try:
            await register_and_attend(client, "captured", seed=1)
        finally:
            await client.close()
            ctx.destroy(linger=0)

    asyncio.run(legit())
    relay.close()
    captured = bytes(relay.client_bytes)
    assert len(captured) > 500  # greeting, HELLO, INITIATE and two encrypted requests
    # Forget the captured session's work, so a replay that got in would show.
    assert call(peer.address, good, "drop", {"owner": "captured"})["freed"] == 1
    before = call(peer.address, good, "stats")
    assert before["owners"] == 0

    failures_before = call(peer.address, good, "status")["handshake_failures"]
    raw = socket.create_connection((host, int(port)), timeout=10)
    raw.sendall(captured)
    # The peer must close the connection (the handshake fails: the cookie and its ephemeral key
    # are new), not take the replayed requests.
    deadline = time.monotonic() + 10
    closed = False
    while time.monotonic() < deadline and not closed:
        try:
            closed = raw.recv(65536) == b""
        except ConnectionResetError:
            closed = True
    raw.close()
    assert closed, "the peer kept a replayed connection open"
    wait_until(lambda: call(peer.address, good, "status")["handshake_failures"] > failures_before, 10,
               "the failed handshake to be counted")
    after = call(peer.address, good, "stats")
    assert after["owners"] == 0 and after["attend_calls"] == before["attend_calls"]


def test_plain_text_binds_loopback_only_unless_told(keys, launch_peer):
    out = node("start", "--role", "attention", "--listen", "tcp://0.0.0.0:0", timeout=60)
    assert out.returncode == 2 and "--insecure-listen" in out.stderr and "--secret" in out.stderr
    # With keys a wildcard bind is allowed (here in allow-list mode); so is plain text with the flag.
    allow_a = ["--secret", keys["good"], "--peer-key", keys["a"], "--allow", keys["allow_a"]]
    for extra in (allow_a, ["--insecure-listen"]):
        peer = launch_peer(["start", "--role", "attention", "--listen", "tcp://0.0.0.0:0", "--kv-memory", "8MiB",
                            "--threads", "1", *extra])
        if extra is allow_a:  # peer a's key is on the list, b's is not
            rc, table = status(peer.address, *allow_a)
            assert rc == 0 and [p["id"] for p in table["peers"]] == [peer.peer_id]
            rc, err = status(peer.address, "--secret", keys["good"], "--peer-key", keys["b"], "--allow",
                             keys["allow_a"])
            assert rc != 0 and "this cluster's key" in err
        stop_all([peer])  # it stops cleanly on SIGTERM
        assert peer.proc.returncode == 0
    # A public key file where the secret belongs is refused with a reason before anything starts.
    out = node("start", "--role", "attention", "--secret", keys["good"].removesuffix("_secret"), timeout=60)
    assert out.returncode == 2 and "no secret key" in out.stderr


def test_generate_with_keys_starts_secured_peers_and_matches_in_process(keys, tiny):
    """`generate --attention-peers 1 --secret K` hands the key to the peer it starts (a CURVE client
    could not talk to it otherwise) and produces the in-process greedy tokens."""
    from lamina_p2p.offline import GenerateOptions, run_generate

    model = tiny
    out = node("generate", "--model", str(model), "--prompt-ids", "1,2,3", "--max-tokens", "6",
               "--attention-peers", "1", "--kv-memory", "16MiB", "--attention-threads", "1",
               "--secret", keys["good"], "--json", timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    secured = json.loads(out.stdout.splitlines()[-1])
    local = run_generate(GenerateOptions(model_dir=str(model), prompt_ids=[[1, 2, 3]], max_tokens=6, kv_bytes=16 << 20))
    assert secured["token_ids"] == local["token_ids"]

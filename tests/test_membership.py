"""Membership over real sockets: join via seeds, late joiners, deaths, leaves, foreign clusters."""
import asyncio
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid

import pytest
import uvloop
import zmq.asyncio

from lamina_p2p.net.membership import Membership, PeerInfo, fetch_status
from lamina_p2p.net.rpc import RpcServer

FAST = dict(heartbeat_interval=0.05, suspect_after=0.3, dead_after=0.6)


def run(coro):
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


class Peers:
    """Starts in-process peers and stops whatever is still running at the end."""

    def __init__(self):
        self.ctx = zmq.asyncio.Context()
        self.running: list[tuple[RpcServer, Membership]] = []
        self.contexts: dict[int, zmq.asyncio.Context] = {}  # peers with a context of their own

    async def start(self, seeds=(), role="attention", cluster="test", bind="tcp://127.0.0.1:0", own_context=False,
                    **timing):
        """own_context: a context of its own, as a separate process has; kill() then releases its port."""
        ctx = zmq.asyncio.Context() if own_context else self.ctx
        server = RpcServer(ctx, bind)
        await server.start()
        me = PeerInfo(id=uuid.uuid4().hex, role=role, address=server.bound_address, cluster=cluster)
        m = Membership(server, ctx, me, list(seeds), **{**FAST, **timing})
        await m.start()
        self.running.append((server, m))
        if own_context:
            self.contexts[id(m)] = ctx
        return m

    async def kill(self, m: Membership):
        """Stop without a word, as a crashed process would."""
        server = next(s for s, mm in self.running if mm is m)
        self.running.remove((server, m))
        await m.stop(leave=False)
        await server.close()
        ctx = self.contexts.pop(id(m), None)
        if ctx is not None:
            # libzmq closes a listener's port in its I/O thread after close(); terminating the
            # context returns once those threads have finished, so the port is free then.
            await asyncio.to_thread(ctx.destroy, 0)

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        for server, m in self.running:
            await m.stop(leave=False)
            await server.close()
        for ctx in self.contexts.values():
            ctx.destroy(linger=0)
        self.ctx.destroy(linger=0)


def ids(m, **kw):
    return {p.id for p in m.peers(**kw)}


def sees(*ms):
    want = {m.me.id for m in ms}
    return lambda m: ids(m) == want


def test_three_peers_join_via_seeds_and_a_late_joiner_is_seen_by_all():
    async def body():
        async with Peers() as P:
            a = await P.start(role="compute")
            b = await P.start(seeds=[a.me.address])
            c = await P.start(seeds=[a.me.address])
            for m in (a, b, c):
                await m.wait_for(sees(a, b, c), timeout=5)
            # b and c never named each other: they met through a's table.
            assert {p.role for p in a.peers()} == {"compute", "attention"}
            assert ids(a, role="attention") == {b.me.id, c.me.id}

            d = await P.start(seeds=[c.me.address])  # seeds the newest, not the first
            for m in (a, b, c, d):
                await m.wait_for(sees(a, b, c, d), timeout=5)

            # Fields set with update_self travel with the next heartbeat.
            d.update_self(kv_free_bytes=12345, ready=True)
            await a.wait_for(lambda m: m.get(d.me.id).kv_free_bytes == 12345 and m.get(d.me.id).ready, 5)

            status = await fetch_status(P.ctx, b.me.address, timeout=5)
            assert status["id"] == b.me.id
            assert {p["id"] for p in status["peers"]} == {a.me.id, b.me.id, c.me.id, d.me.id}
            assert all(p["state"] == "alive" for p in status["peers"])

    run(body())


def test_killed_peer_is_dead_within_dead_after_and_leave_is_immediate():
    async def body():
        async with Peers() as P:
            a = await P.start()
            b = await P.start(seeds=[a.me.address])
            c = await P.start(seeds=[a.me.address])
            for m in (a, b, c):
                await m.wait_for(sees(a, b, c), timeout=5)
            events = []
            a.subscribe(lambda ev, p: events.append((ev, p.id)))

            t0 = time.monotonic()
            await P.kill(c)
            dead = lambda m: m.get(c.me.id).state == "dead"
            await a.wait_for(dead, timeout=FAST["dead_after"] + 1.0)
            await b.wait_for(dead, timeout=FAST["dead_after"] + 1.0)
            assert time.monotonic() - t0 < FAST["dead_after"] + 1.0
            assert ("died", c.me.id) in events
            assert ids(a) == {a.me.id, b.me.id}
            assert c.me.id in ids(a, alive=False)

            # A leave is heard at once, long before the (here 5 s) timeout could fire.
            d = await P.start(seeds=[a.me.address], suspect_after=4.0, dead_after=5.0)
            await a.wait_for(lambda m: d.me.id in ids(m), timeout=5)
            await d.wait_for(lambda m: a.me.id in ids(m), timeout=5)
            t0 = time.monotonic()
            P.running = [(s, m) for s, m in P.running if m is not d]
            await d.stop(leave=True)
            await a.wait_for(lambda m: m.get(d.me.id).state == "dead", timeout=2)
            assert time.monotonic() - t0 < 2
            assert ("joined", d.me.id) in events and ("died", d.me.id) in events

    run(body())


def test_restarted_peer_at_the_same_address_replaces_the_old_id():
    async def body():
        async with Peers() as P:
            a = await P.start()
            b = await P.start(seeds=[a.me.address], own_context=True)
            await a.wait_for(sees(a, b), timeout=5)
            address, old_id = b.me.address, b.me.id
            await P.kill(b)  # returns once b's context, and so its port, is released
            b2 = await P.start(seeds=[a.me.address], bind=address)  # new process, same endpoint
            await a.wait_for(lambda m: ids(m) == {a.me.id, b2.me.id}, timeout=5)
            assert a.get(old_id).state == "dead"

    run(body())


def test_other_cluster_is_ignored():
    async def body():
        async with Peers() as P:
            a = await P.start(cluster="blue")
            b = await P.start(seeds=[a.me.address], cluster="blue")
            x = await P.start(seeds=[a.me.address], cluster="red")
            await a.wait_for(sees(a, b), timeout=5)
            # x has gossiped to a and been told a is of another cluster.
            await x.wait_for(lambda m: a.me.address in m._refused, timeout=5)
            assert ids(a, alive=False) == {a.me.id, b.me.id}
            assert ids(x, alive=False) == {x.me.id}

    run(body())


def test_peer_info_from_wire_rejects_bad_entries():
    good = PeerInfo(id="p", role="compute", address="tcp://127.0.0.1:1").to_wire()
    assert PeerInfo.from_wire(good).to_wire() == good
    for bad in [
        [],
        {**good, "heartbeat": "3"},
        {**good, "heartbeat": True},
        {**good, "ready": 1},
        {**good, "role": "boss"},
        {k: v for k, v in good.items() if k != "address"},
    ]:
        with pytest.raises(ValueError):
            PeerInfo.from_wire(bad)


PEER_SCRIPT = textwrap.dedent(
    """
    import asyncio, sys, uuid, uvloop, zmq.asyncio
    from lamina_p2p.net.membership import Membership, PeerInfo
    from lamina_p2p.net.rpc import RpcServer

    async def main():
        ctx = zmq.asyncio.Context()
        server = RpcServer(ctx, "tcp://127.0.0.1:0")
        await server.start()
        me = PeerInfo(id=uuid.uuid4().hex, role="attention", address=server.bound_address, cluster="test")
        m = Membership(server, ctx, me, sys.argv[1:], heartbeat_interval=0.05, suspect_after=0.3, dead_after=0.6)
        await m.start()
        print(server.bound_address, me.id, flush=True)
        await asyncio.Event().wait()  # until killed

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main())
    """
)


def test_peers_in_separate_processes_and_sigkill():
    procs = []
    try:

        async def body():
            loop = asyncio.get_running_loop()
            async with Peers() as P:
                a = await P.start(role="compute")
                found = {}
                for _ in range(2):
                    p = subprocess.Popen(
                        [sys.executable, "-c", PEER_SCRIPT, a.me.address], stdout=subprocess.PIPE, text=True
                    )
                    procs.append(p)
                    line = await asyncio.wait_for(loop.run_in_executor(None, p.stdout.readline), 30)
                    address, peer_id = line.split()
                    found[peer_id] = address
                await a.wait_for(lambda m: set(found) <= ids(m), timeout=10)
                # Each child sees the whole cluster too.
                everyone = {a.me.id, *found}
                for address in found.values():
                    deadline = time.monotonic() + 5
                    while True:
                        st = await fetch_status(P.ctx, address, timeout=5)
                        if {p["id"] for p in st["peers"] if p["state"] == "alive"} == everyone:
                            break
                        assert time.monotonic() < deadline, st

                victim, survivor = list(found)
                t0 = time.monotonic()
                procs[0].send_signal(signal.SIGKILL)
                await a.wait_for(lambda m: m.get(victim).state == "dead", timeout=FAST["dead_after"] + 1.5)
                assert time.monotonic() - t0 < FAST["dead_after"] + 1.5
                deadline = time.monotonic() + FAST["dead_after"] + 1.5
                while True:
                    st = await fetch_status(P.ctx, found[survivor], timeout=5)
                    if {p["id"]: p["state"] for p in st["peers"]}[victim] == "dead":
                        break
                    assert time.monotonic() < deadline, st

        run(body())
    finally:
        for p in procs:
            if p.poll() is None:
                os.kill(p.pid, signal.SIGKILL)
            p.wait()


# --- LAN beacon, loopback only ---


def _free_udp_port() -> int:
    import socket

    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_beacon_discovery_on_loopback():
    """Two peers with no seeds find each other by broadcast on 127.255.255.255."""
    import socket

    from lamina_p2p.net.beacon import Beacon

    async def body():
        port = _free_udp_port()
        async with Peers() as P:
            a = await P.start()
            b = await P.start()
            beacons = [
                Beacon("test", m.me.address, m.add_seed, port=port, interval=0.05, broadcast="127.255.255.255")
                for m in (a, b)
            ]
            heard_by_red = []
            red = Beacon("red", "tcp://127.0.0.1:1", heard_by_red.append, port=port, interval=0.05,
                         broadcast="127.255.255.255")
            for bc in (*beacons, red):
                await bc.start()
            try:
                # Junk on the port is dropped, not fatal.
                junk = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                junk.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
                for data in (b"\xc1garbage", b"\x93\x01\x02\x03", b"x" * 2000):
                    junk.sendto(data, ("127.255.255.255", port))
                junk.close()
                for m in (a, b):
                    await m.wait_for(sees(a, b), timeout=5)
                assert set(beacons[0].seen) == {b.me.address}
                assert heard_by_red == []  # other cluster: never reported
                assert a.seeds == [b.me.address] and b.seeds == [a.me.address]
            finally:
                for bc in (*beacons, red):
                    await bc.stop()

    run(body())


def dead_to(m, *others):
    return all(m.get(o.me.id) is not None and m.get(o.me.id).state == "dead" for o in others)


def test_sides_that_hold_each_other_dead_heal_by_probing_old_addresses():
    """A partition long enough that each side marks the other dead, and every seed dead: nobody
    gossips to a peer it holds dead, so only probing addresses once seen alive can heal it."""
    async def body():
        async with Peers() as P:
            s = await P.start()
            x = await P.start(seeds=[s.me.address], role="compute", rejoin_max=1.0)
            y = await P.start(seeds=[s.me.address], rejoin_max=1.0)
            z = await P.start(seeds=[s.me.address], rejoin_max=1.0)
            for m in (s, x, y, z):
                await m.wait_for(sees(s, x, y, z), timeout=5)
            await P.kill(s)  # the only seed anyone has
            for m in (x, y, z):
                await m.wait_for(lambda m: dead_to(m, s) and ids(m) == {x.me.id, y.me.id, z.me.id}, timeout=5)

            # Cut x off both ways: its gossip goes nowhere, gossip to it is never answered.
            server = next(sv for sv, m in P.running if m is x)
            on_gossip, exchange = x._on_gossip, x._exchange

            async def blackhole(msg):
                await asyncio.Event().wait()

            async def nowhere(address):
                return None

            server.register("gossip", blackhole)
            x._exchange = nowhere
            await x.wait_for(lambda m: dead_to(m, y, z), timeout=5)
            for m in (y, z):
                await m.wait_for(lambda m: dead_to(m, x), timeout=5)
            server.register("gossip", on_gossip)
            x._exchange = exchange

            # Healed without any seed: x probes y and z, and they probe x.
            t0 = time.monotonic()
            for m in (x, y, z):
                await m.wait_for(sees(x, y, z), timeout=5)
            assert time.monotonic() - t0 < 1.0 + 2.0  # within a probe backoff, plus slack

    run(body())


# --- churn: seeds die, a peer stalls; every live view must still converge to the live set ---

CHURN_PEER = textwrap.dedent(
    """
    import asyncio, sys, uuid, uvloop, zmq.asyncio
    from lamina_p2p.net.membership import Membership, PeerInfo
    from lamina_p2p.net.rpc import RpcServer

    async def main():
        ctx = zmq.asyncio.Context()
        server = RpcServer(ctx, "tcp://127.0.0.1:0")
        await server.start()
        me = PeerInfo(id=uuid.uuid4().hex, role=sys.argv[1], address=server.bound_address, cluster="test")
        m = Membership(server, ctx, me, sys.argv[2:], heartbeat_interval=0.05, suspect_after=0.3,
                       dead_after=0.6, rejoin_max=1.5)
        await m.start()
        print(server.bound_address, me.id, flush=True)
        await asyncio.Event().wait()  # until killed

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main())
    """
)


class ChurnPeer:
    def __init__(self, proc, address, peer_id):
        self.proc, self.address, self.id = proc, address, peer_id


def test_views_converge_to_the_live_set_under_churn_and_a_stall():
    """The soak's pattern: the compute peer joins via the first attention peer, attention peers are
    SIGKILLed one by one and replaced by peers joining via a live one, and the compute peer's loop
    stalls past dead_after meanwhile (SIGSTOP, as an overloaded machine does): everyone times it
    out, and their gossip to it expires unread. Every live peer must end seeing exactly the live set."""
    procs = []

    async def spawn(role, *seeds):
        p = subprocess.Popen([sys.executable, "-c", CHURN_PEER, role, *seeds], stdout=subprocess.PIPE, text=True)
        procs.append(p)
        line = await asyncio.wait_for(asyncio.get_running_loop().run_in_executor(None, p.stdout.readline), 60)
        return ChurnPeer(p, *line.split())

    def kill(peer):
        peer.proc.send_signal(signal.SIGKILL)
        peer.proc.wait()

    async def views(ctx, peers):
        out = {}
        for p in peers:
            try:
                st = await fetch_status(ctx, p.address, timeout=2)
            except Exception as e:  # a stopped peer does not answer: its view is unknown
                out[p.id] = repr(e)
                continue
            out[p.id] = {q["id"]: (q["state"], q["age"]) for q in st["peers"]}
        return out

    async def converge(ctx, live, timeout=20.0):
        want = {p.id for p in live}
        deadline = time.monotonic() + timeout
        while True:
            seen = await views(ctx, live)
            if all(isinstance(v, dict) and {i for i, (s, _) in v.items() if s == "alive"} == want
                   for v in seen.values()):
                return
            assert time.monotonic() < deadline, f"views did not converge to {sorted(want)}: {seen}"

    async def body():
        ctx = zmq.asyncio.Context()
        try:
            a = await spawn("attention")
            b = await spawn("attention", a.address)
            c = await spawn("attention", a.address)
            x = await spawn("compute", a.address)  # joins via the first attention peer only
            await converge(ctx, [a, b, c, x])
            d = await spawn("attention", b.address)
            await converge(ctx, [a, b, c, d, x])
            kill(a)  # the compute peer's only seed
            e = await spawn("attention", d.address)
            await converge(ctx, [b, c, d, e, x])

            # The compute peer stalls until every other peer has held it dead for longer than a
            # gossip call may wait: nothing sent to it before is still answerable when it wakes.
            x.proc.send_signal(signal.SIGSTOP)
            try:
                deadline = time.monotonic() + 20
                while True:
                    seen = await views(ctx, [b, c, d, e])
                    if all(v.get(x.id, ("", 0))[0] == "dead" and v[x.id][1] > 0.6 + 1.5 for v in seen.values()):
                        break
                    assert time.monotonic() < deadline, seen
                kill(b)  # dies while the compute peer cannot notice
                f = await spawn("attention", c.address)
                await converge(ctx, [c, d, e, f])
            finally:
                x.proc.send_signal(signal.SIGCONT)
            await converge(ctx, [c, d, e, f, x])

            # More churn: every peer the compute peer met before its stall dies in turn.
            kill(c)
            g = await spawn("attention", e.address)
            kill(d)
            await converge(ctx, [e, f, g, x])
        finally:
            ctx.destroy(linger=0)

    try:
        run(body())
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGCONT)
                p.kill()
            p.wait()


def test_a_peer_whose_only_seed_is_dead_says_it_is_alone(caplog):
    async def body():
        async with Peers() as P:
            s = await P.start()
            address = s.me.address
            await P.kill(s)
            caplog.set_level("WARNING", logger="lamina_p2p.net.membership")
            warned = asyncio.Event()

            class Watch(logging.Handler):
                def emit(self, record):  # membership logs from its task, on this loop's thread
                    if "no seed has answered" in record.getMessage():
                        warned.set()

            watch = Watch()
            logging.getLogger("lamina_p2p.net.membership").addHandler(watch)
            try:
                n = await P.start(seeds=[address])
                await asyncio.wait_for(warned.wait(), 5)
            finally:
                logging.getLogger("lamina_p2p.net.membership").removeHandler(watch)
            assert ids(n) == {n.me.id}

    run(body())

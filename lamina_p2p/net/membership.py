"""Who is in the cluster: push-pull gossip of a peer table, with heartbeat-based failure detection.

Every peer owns one entry, its PeerInfo, and a heartbeat counter in it that only that peer bumps.
Each interval a peer bumps its counter and exchanges its table with a few random peers (and with
seeds it has not met yet); both sides keep, per peer, the entry with the higher counter. A peer
whose counter has not risen for `suspect_after` seconds of *local* time is suspect, after
`dead_after` dead. Comparing counters, never clocks, keeps machines with skewed clocks apart.

A peer that leaves says so ("leave" in its last gossip) so others mark it dead at once; a killed
peer is found by the timeout. A dead peer comes back only with a higher counter, or as a new id
(a restarted process) at the same address, which also retires the old id.

Healing. Nobody gossips to a peer it holds dead, so two sides that each hold the other dead (a peer
stalled past `dead_after`: everyone timed it out, and on waking it timed everyone out; their gossip
to it expired unread) would never speak again, and a peer whose seeds and known peers all died would
be alone for good. So a peer keeps probing every address it has seen alive, and its seeds, while no
live entry holds that address: with backoff from `dead_after` up to `rejoin_max`. One answered
probe exchanges both tables, and the higher counters bring each side back to life in the other's.
A peer also does not blame others for silence during its own stall: when a round comes late, the
lateness is credited to every peer's clock before the timeouts are checked.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import random
import time
from dataclasses import dataclass
from typing import Any, Callable

import zmq.asyncio

from .rpc import RpcClient, RpcError, RpcServer
from .wire import PROTOCOL_VERSION, Message

log = logging.getLogger(__name__)

ROLES = ("compute", "attention")
ALIVE, SUSPECT, DEAD = "alive", "suspect", "dead"
JOINED, DIED = "joined", "died"
REFUSED_RETRY = 30.0  # seconds before gossiping again to a seed of another cluster
MAX_PEERS = 4096  # entries a table holds: gossip cannot grow it past this
MAX_REJOIN_ADDRESSES = 256  # addresses once seen alive that are probed again; the least recent go first


@dataclass
class PeerInfo:
    id: str  # unique per process (uuid4 hex)
    role: str  # "compute" | "attention"
    address: str  # its RpcServer endpoint
    device: str = "cpu"
    kv_total_bytes: int = 0
    kv_free_bytes: int = 0
    load: float = 0.0
    version: int = PROTOCOL_VERSION
    cluster: str = "default"
    heartbeat: int = 0  # owned and bumped by that peer only
    ready: bool = False
    # local only: never sent, never trusted from others
    state: str = ALIVE
    last_seen: float = 0.0  # time.monotonic() of the last heartbeat increase

    def to_wire(self) -> dict:
        return {name: getattr(self, name) for name, _ in _WIRE}

    @classmethod
    def from_wire(cls, d: Any) -> "PeerInfo":
        """Build from an untrusted dict; ValueError unless every field has the right type."""
        if not isinstance(d, dict):
            raise ValueError("peer entry is not a map")
        values = {}
        for name, types in _WIRE:
            v = d.get(name)
            # bool is an int subclass: do not let True pass as a counter, or 1 as a flag.
            if not isinstance(v, types) or (isinstance(v, bool) and bool not in types):
                raise ValueError(f"peer field {name!r}: bad value {v!r}")
            values[name] = v
        if values["role"] not in ROLES or len(values["id"]) > 64 or len(values["address"]) > 256:
            raise ValueError(f"peer entry {values['id']!r}: bad role, id or address")
        if len(values["device"]) > 32 or len(values["cluster"]) > 64:
            raise ValueError(f"peer entry {values['id']!r}: device or cluster name too long")
        if not (math.isfinite(values["load"]) and values["load"] >= 0 and values["kv_total_bytes"] >= 0
                and values["kv_free_bytes"] >= 0 and values["heartbeat"] >= 0):
            raise ValueError(f"peer entry {values['id']!r}: negative or non-finite load, KV bytes or heartbeat")
        values["load"] = float(values["load"])
        return cls(**values)


# Fields that travel, with the types accepted from the wire.
_WIRE = [
    ("id", (str,)), ("role", (str,)), ("address", (str,)), ("device", (str,)),
    ("kv_total_bytes", (int,)), ("kv_free_bytes", (int,)), ("load", (int, float)),
    ("version", (int,)), ("cluster", (str,)), ("heartbeat", (int,)), ("ready", (bool,)),
]
_UPDATABLE = {"role", "address", "device", "kv_total_bytes", "kv_free_bytes", "load", "ready"}


class Membership:
    def __init__(
        self,
        server: RpcServer,
        ctx: zmq.asyncio.Context,
        me: PeerInfo,
        seeds: list[str],
        heartbeat_interval: float = 0.5,
        suspect_after: float = 2.0,
        dead_after: float = 5.0,
        fanout: int = 3,
        security: Any = None,
        rejoin_max: float | None = None,
    ):
        if not heartbeat_interval < suspect_after < dead_after:
            raise ValueError("need heartbeat_interval < suspect_after < dead_after")
        self.me = me
        self.seeds = list(seeds)
        self.heartbeat_interval = heartbeat_interval
        self.suspect_after = suspect_after
        self.dead_after = dead_after
        self.fanout = fanout
        # Longest wait between two probes of an address with no live peer (see "Healing" above).
        self.rejoin_max = max(4 * dead_after, 1.0) if rejoin_max is None else rejoin_max
        # A gossip call may wait this long; a peer slower than that is as good as silent.
        self._call_timeout = max(4 * heartbeat_interval, 1.0)
        self._ctx = ctx
        self._server = server
        self._security = security  # CURVE keys for the gossip clients (net.security.Security)
        me.version, me.state, me.last_seen = PROTOCOL_VERSION, ALIVE, time.monotonic()
        self._table: dict[str, PeerInfo] = {me.id: me}
        self._clients: dict[str, RpcClient] = {}
        self._gossiping: dict[str, asyncio.Task] = {}  # address -> its one in-flight exchange
        self._subscribers: list[Callable[[str, PeerInfo], Any]] = []
        self._changed = asyncio.Event()
        self._warned: set = set()
        self._refused: dict[str, float] = {}  # seed address -> when it said "other cluster"
        self._seen: dict[str, float] = {}  # address -> when a peer there was last seen alive
        self._probe: dict[str, tuple[float, float]] = {}  # address -> (next probe time, backoff)
        self._last_round: float | None = None
        self._started = time.monotonic()
        self._task: asyncio.Task | None = None
        self._closing: set[asyncio.Task] = set()  # clients of dead peers being closed
        self._stopped = False
        server.register("gossip", self._on_gossip)
        server.register("status", self._on_status)

    # --- public view ---

    @property
    def security(self) -> Any:
        """The CURVE settings this peer's clients use (None: plain text): others dial with them too."""
        return self._security

    def peers(self, role: str | None = None, alive: bool = True) -> list[PeerInfo]:
        """Copies of the table's entries (self included); alive=True keeps state "alive" only."""
        return [
            dataclasses.replace(p)
            for p in self._table.values()
            if (role is None or p.role == role) and (not alive or p.state == ALIVE)
        ]

    def get(self, peer_id: str) -> PeerInfo | None:
        p = self._table.get(peer_id)
        return dataclasses.replace(p) if p else None

    def update_self(self, **fields) -> None:
        unknown = set(fields) - _UPDATABLE
        if unknown:
            raise ValueError(f"cannot update {sorted(unknown)}")
        for k, v in fields.items():
            setattr(self.me, k, v)
        self._notify()  # others hear of it with the next heartbeat

    def add_seed(self, address: str) -> None:
        """Another address to gossip with until met (the LAN beacon calls this)."""
        if address not in self.seeds and address != self.me.address:
            self.seeds.append(address)
            self._refused.pop(address, None)

    def subscribe(self, callback: Callable[[str, PeerInfo], Any]) -> None:
        """callback(event, peer) on "joined" / "died"; called on the event loop, must not block."""
        self._subscribers.append(callback)

    async def wait_for(self, predicate: Callable[["Membership"], bool], timeout: float) -> None:
        """Return once predicate(self) holds; TimeoutError if it does not within timeout."""
        async with asyncio.timeout(timeout):
            while not predicate(self):
                await self._changed.wait()

    # --- lifecycle ---

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"membership {self.me.id[:8]}")

    async def stop(self, leave: bool = True) -> None:
        """Stop gossiping. With leave, tell every live peer first so they drop us at once."""
        self._stopped = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for t in self._gossiping.values():
            t.cancel()
        await asyncio.gather(*self._gossiping.values(), return_exceptions=True)
        if leave:
            self.me.heartbeat += 1
            fields = self._gossip_fields(leave=True)
            others = [p.address for p in self._table.values() if p.id != self.me.id and p.state != DEAD]
            await asyncio.gather(
                *(self._client(a).call("gossip", fields, timeout_s=self._call_timeout) for a in others),
                return_exceptions=True,
            )
        for c in self._clients.values():
            await c.close()
        self._clients.clear()
        await asyncio.gather(*self._closing, return_exceptions=True)

    # --- the protocol ---

    def _gossip_fields(self, leave: bool = False) -> dict:
        entries = [p.to_wire() for p in self._table.values() if p.state != DEAD]
        return {"from": self.me.id, "cluster": self.me.cluster, "version": PROTOCOL_VERSION,
                "leave": leave, "peers": entries}

    def _foreign(self, cluster: Any, version: Any, who: str) -> bool:
        """True (and one log line per stranger) if the sender is not of our cluster/protocol."""
        if cluster == self.me.cluster and version == PROTOCOL_VERSION:
            return False
        if who not in self._warned:
            self._warned.add(who)
            log.warning("ignoring %s: cluster %r version %r (we are %r version %d)",
                        who, cluster, version, self.me.cluster, PROTOCOL_VERSION)
        return True

    async def _on_gossip(self, msg: Message) -> tuple[dict, list]:
        if self._stopped:
            raise RuntimeError("membership stopped")
        f = msg.fields
        if self._foreign(f.get("cluster"), f.get("version"), f"gossip from {f.get('from')!r}"):
            # A plain reply, not an error: the sender learns our cluster and backs off.
            return {"cluster": self.me.cluster, "version": PROTOCOL_VERSION, "peers": []}, []
        self._merge(f.get("peers"))
        sender = self._table.get(f.get("from"))
        if f.get("leave") is True and sender is not None and sender.id != self.me.id:
            log.info("peer %s (%s) left", sender.id[:8], sender.address)
            self._mark_dead(sender)
        return self._gossip_fields(), []

    async def _on_status(self, msg: Message) -> tuple[dict, list]:
        now = time.monotonic()
        peers = [{**p.to_wire(), "state": p.state, "age": round(now - p.last_seen, 3)}
                 for p in self._table.values()]
        return {"id": self.me.id, "cluster": self.me.cluster, "peers": peers,
                "handshake_failures": getattr(self._server, "handshake_failures", 0)}, []

    def _merge(self, entries: Any) -> None:
        if not isinstance(entries, list):
            return
        now = time.monotonic()
        changed = False
        for raw in entries:
            try:
                p = PeerInfo.from_wire(raw)
            except ValueError as e:
                log.warning("dropping bad peer entry: %s", e)
                continue
            if p.id == self.me.id or self._foreign(p.cluster, p.version, f"peer {p.id!r} at {p.address}"):
                continue
            known = self._table.get(p.id)
            if known is not None and p.heartbeat <= known.heartbeat:
                continue  # old news
            if known is None and len(self._table) >= MAX_PEERS:
                if "full" not in self._warned:
                    self._warned.add("full")
                    log.warning("peer table full (%d entries): ignoring new peers", MAX_PEERS)
                continue
            changed = True
            p.last_seen = now
            p.state = ALIVE
            self._table[p.id] = p
            self._saw(p.address, now)
            if known is None:
                # A new id at an address we know is a restarted process: its old self is gone.
                for old in list(self._table.values()):
                    if old.address == p.address and old.id not in (p.id, self.me.id):
                        self._mark_dead(old)
            if known is None or known.state == DEAD:
                log.info("peer %s (%s, %s) joined", p.id[:8], p.role, p.address)
                self._emit(JOINED, p)
        if changed:
            self._notify()

    def _mark_dead(self, p: PeerInfo) -> None:
        if p.state == DEAD:
            return
        p.state = DEAD
        if p.address not in self.seeds and not self._live_at(p.address):
            self._drop_client(p.address)  # seeds keep theirs for a rejoin; so does a live peer there
        self._emit(DIED, p)
        self._notify()

    def _saw(self, address: str, now: float) -> None:
        self._seen.pop(address, None)  # re-insert: the dict stays ordered least recent first
        self._seen[address] = now
        self._probe.pop(address, None)
        while len(self._seen) > MAX_REJOIN_ADDRESSES:
            del self._seen[next(iter(self._seen))]

    def _credit_stall(self, now: float) -> None:
        """If this round is late (our own loop stalled), do not count the delay as others' silence."""
        last, self._last_round = self._last_round, now
        if last is None:
            return
        late = now - last - self.heartbeat_interval
        if late > self.heartbeat_interval:
            for p in self._table.values():
                if p.id != self.me.id and p.state != DEAD:
                    p.last_seen = min(now, p.last_seen + late)

    def _check_timeouts(self, now: float) -> None:
        for p in list(self._table.values()):
            if p.id == self.me.id or p.state == DEAD:
                if p.state == DEAD and now - p.last_seen > max(60.0, 10 * self.dead_after):
                    del self._table[p.id]  # forget tombstones eventually
                continue
            silent = now - p.last_seen
            if silent > self.dead_after:
                log.warning("peer %s (%s) dead: silent %.2f s", p.id[:8], p.address, silent)
                self._mark_dead(p)
            elif silent > self.suspect_after and p.state == ALIVE:
                p.state = SUSPECT
                self._notify()

    async def _run(self) -> None:
        while True:
            now = time.monotonic()
            self.me.heartbeat += 1
            self.me.last_seen = now
            self._credit_stall(now)
            self._check_timeouts(now)
            if self.seeds and not self._seen and "alone" not in self._warned \
                    and now - self._started > 2 * self.dead_after:
                self._warned.add("alone")  # no path to anyone: only a seed answering can end it
                log.warning("no seed has answered in %.0f s (%s): this peer is alone until one does",
                            now - self._started, ", ".join(self.seeds))
            for address in self._targets():
                if address not in self._gossiping:
                    t = asyncio.create_task(self._exchange(address))
                    self._gossiping[address] = t
                    t.add_done_callback(lambda _t, a=address: self._gossiping.pop(a, None))
            await asyncio.sleep(self.heartbeat_interval)

    def _targets(self) -> list[str]:
        others = [p for p in self._table.values() if p.id != self.me.id and p.state != DEAD]
        picked = {p.address for p in random.sample(others, min(self.fanout, len(others)))}
        known = {p.address for p in others}
        now = time.monotonic()
        # Seeds never met: every round, as at the start. Any address once seen alive (seeds
        # included) that no live entry holds now: probed with backoff, for as long as we remember it.
        for a in dict.fromkeys([*self.seeds, *self._seen]):
            if a in known or a == self.me.address:
                self._probe.pop(a, None)
                continue
            if now - self._refused.get(a, -REFUSED_RETRY) < REFUSED_RETRY:
                continue
            if a not in self._seen:
                picked.add(a)
                continue
            due, backoff = self._probe.get(a, (0.0, 0.0))
            if now >= due:
                picked.add(a)
                backoff = min(max(2 * backoff, self.dead_after), self.rejoin_max)
                self._probe[a] = (now + backoff, backoff)
        return list(picked)

    def _live_at(self, address: str) -> bool:
        return any(p.address == address and p.state != DEAD for p in self._table.values() if p.id != self.me.id)

    async def _exchange(self, address: str) -> None:
        try:
            reply = await self._client(address).call("gossip", self._gossip_fields(), timeout_s=self._call_timeout)
        except RpcError as e:  # timeouts included: silence is handled by the heartbeat clock
            if e.code is not None:  # an answer, not silence: say so once
                if address not in self._warned:
                    self._warned.add(address)
                    log.warning("gossip to %s refused: %s", address, e)
            if not self._live_at(address) and address not in self.seeds:
                self._drop_client(address)  # an unanswered probe: no socket kept redialling a dead port
            return
        f = reply.fields
        if self._foreign(f.get("cluster"), f.get("version"), f"gossip reply from {address}"):
            self._refused[address] = time.monotonic()
            self._notify()
        else:
            self._merge(f.get("peers"))

    def _drop_client(self, address: str) -> None:
        client = self._clients.pop(address, None)
        if client is not None:
            # Keep a reference: the loop holds tasks only weakly.
            t = asyncio.get_running_loop().create_task(client.close())
            self._closing.add(t)
            t.add_done_callback(self._closing.discard)

    def _client(self, address: str) -> RpcClient:
        client = self._clients.get(address)
        if client is None:
            client = self._clients[address] = RpcClient(self._ctx, address, security=self._security)
        return client

    def _emit(self, event: str, p: PeerInfo) -> None:
        for cb in self._subscribers:
            try:
                cb(event, dataclasses.replace(p))
            except Exception:
                log.exception("membership subscriber failed on %s %s", event, p.id[:8])

    def _notify(self) -> None:
        ev, self._changed = self._changed, asyncio.Event()
        ev.set()


async def fetch_status(ctx: zmq.asyncio.Context, address: str, timeout: float = 5.0, security: Any = None) -> dict:
    """The cluster as the peer at `address` sees it: {"id", "cluster", "peers": [...]}."""
    client = RpcClient(ctx, address, security=security)
    try:
        return (await client.call("status", timeout_s=timeout)).fields
    finally:
        await client.close()

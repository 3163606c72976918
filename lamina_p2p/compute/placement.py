"""Where a sequence's KV lives: its shards on attention peers.

A shard is (peer, kv-head range, token range). The three policies of
DESIGN.md section 4 are one mechanism:

- request:  one shard, all heads, all tokens;
- head:     one shard per peer, kv heads split in proportion to peer weight;
- sequence: shards by token range; only the tail shard takes new tokens, and a
            new tail opens on another peer every `shard_tokens` tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lamina_p2p.compute.errors import NoPeers

POLICIES = ("request", "head", "sequence")


@dataclass
class Shard:
    peer: str
    h0: int
    h1: int
    t0: int  # first token position held
    t1: int | None = None  # end (exclusive) of a closed shard; None while it is the tail
    reserved: int = 0  # load this shard adds to its peer in placement's bookkeeping
    index: int = 0  # position in the sequence's shard list; a peer may hold several shards of one sequence
    replicas: list[str] = field(default_factory=list)  # peers holding a copy (--kv-replicas), written in step
    # Storage on its peers: shards of a sequence with the same holders and heads share one (the
    # first one's index), their tokens in position order, so a peer attends over all of its part
    # of a sequence with one entry per run of query positions however many shards that part is.
    slot: int = -1  # -1: its own index

    def key(self, seq_id: int) -> int:
        """The id the attention peer files this shard's storage under."""
        return (seq_id << 12) | (self.slot if self.slot >= 0 else self.index)

    def tokens_before(self, cached: int) -> int:
        """Tokens this shard holds when the sequence has `cached` tokens in KV."""
        end = cached if self.t1 is None else min(cached, self.t1)
        return max(0, end - self.t0)


@dataclass
class PeerLoad:
    """What placement knows of a peer: its weight and the tokens we placed there."""

    peer: str
    weight: float  # advertised capacity (free + used KV bytes), relative
    placed_tokens: int = 0


@dataclass
class Placer:
    policy: str
    num_kv_heads: int
    shard_tokens: int = 1024
    replicas: int = 1  # copies of every shard, on distinct peers where there are enough
    peers: dict[str, PeerLoad] = field(default_factory=dict)

    def __post_init__(self):
        if self.policy not in POLICIES:
            raise ValueError(f"unknown placement {self.policy!r}; expected one of {', '.join(POLICIES)}")
        if self.shard_tokens <= 0:
            raise ValueError("shard_tokens must be positive")
        if self.replicas < 1:
            raise ValueError("kv replicas must be >= 1")

    def set_peers(self, weights: dict[str, float]) -> None:
        """Replace the set of usable peers, keeping what we know of those that stay."""
        self.peers = {p: self.peers.get(p, PeerLoad(p, w)) for p, w in weights.items() if w > 0}
        for p, w in weights.items():
            if p in self.peers:
                self.peers[p].weight = w

    def _least_loaded(self, exclude=()) -> str:
        if not self.peers:
            raise NoPeers("no attention peer is available")
        candidates = [p for p in self.peers.values() if p.peer not in exclude] or list(self.peers.values())
        return min(candidates, key=lambda p: (p.placed_tokens / p.weight, p.peer)).peer

    def place(self, expected_tokens: int) -> list[Shard]:
        """Initial shards for a new sequence."""
        if self.policy == "head":
            shards = self._head_split()
            for s in shards:
                s.reserved = expected_tokens * (s.h1 - s.h0) // self.num_kv_heads
        else:
            # Under sequence placement the first shard closes at shard_tokens and each later tail
            # reserves its own: reserving the whole sequence here counted it twice and sent every
            # later shard of a long prompt to the other peer (measured: 2 peers, 16-token shards,
            # a 1024-token prompt: kernel 201 ms on one peer, 32 ms on the other).
            first = expected_tokens if self.policy == "request" else min(expected_tokens, self.shard_tokens)
            shards = [Shard(self._least_loaded(), 0, self.num_kv_heads, 0, reserved=first)]
        for s in shards:
            self._add_replicas(s)
            self.peers[s.peer].placed_tokens += s.reserved
        return shards

    def _add_replicas(self, shard: Shard) -> None:
        """Copies on the least loaded other peers; fewer when the cluster has too few peers."""
        holders = {shard.peer}
        for _ in range(self.replicas - 1):
            if len(holders) >= len(self.peers):
                break
            peer = self._least_loaded(exclude=holders)
            shard.replicas.append(peer)
            holders.add(peer)
            self.peers[peer].placed_tokens += shard.reserved

    def _head_split(self) -> list[Shard]:
        if not self.peers:
            raise NoPeers("no attention peer is available")
        # Largest weights first; every used peer gets at least one head.
        order = sorted(self.peers.values(), key=lambda p: (-p.weight, p.peer))[: self.num_kv_heads]
        total = sum(p.weight for p in order)
        counts = [max(1, round(self.num_kv_heads * p.weight / total)) for p in order]
        while sum(counts) > self.num_kv_heads:
            counts[counts.index(max(counts))] -= 1
        while sum(counts) < self.num_kv_heads:
            counts[counts.index(min(counts))] += 1
        shards, h = [], 0
        for p, c in zip(order, counts):
            if c:
                shards.append(Shard(p.peer, h, h + c, 0))
                h += c
        return shards

    def roll(self, shards: list[Shard], cached: int, end: int | None = None) -> None:
        """Open tail shards until positions [cached, end) have a home (sequence placement only).

        A tail holds `shard_tokens` positions from its start; a chunk that runs past it closes
        it there and opens the next on another peer, as many times as the chunk needs."""
        if self.policy != "sequence":
            return
        end = cached + 1 if end is None else max(end, cached + 1)
        while True:
            tail = shards[-1]
            close_at = max(tail.t0 + self.shard_tokens, cached)
            if end <= close_at:
                return
            tail.t1 = close_at
            holders = {s.peer for s in shards}
            peer = self._least_loaded(exclude=holders)
            self.peers[peer].placed_tokens += self.shard_tokens
            shard = Shard(peer, 0, self.num_kv_heads, close_at, reserved=self.shard_tokens, index=len(shards))
            self._add_replicas(shard)
            # Share storage only with shards held by exactly the same peers in the same roles: then a
            # peer's storage under one key holds either primaries or copies, never both, also after
            # a failover (which moves every shard of a key to the same replica).
            same = next((s for s in shards if s.peer == shard.peer and s.replicas == shard.replicas
                         and (s.h0, s.h1) == (shard.h0, shard.h1)), None)
            if same is not None:
                shard.slot = same.slot if same.slot >= 0 else same.index
            shards.append(shard)

    def forget(self, shards: list[Shard]) -> None:
        for s in shards:
            for peer in (s.peer, *s.replicas):
                load = self.peers.get(peer)
                if load is not None:
                    load.placed_tokens = max(0, load.placed_tokens - s.reserved)


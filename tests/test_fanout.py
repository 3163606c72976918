"""Per layer, one request per peer whatever the number of shards, and no query row repeated in a storage."""

from __future__ import annotations

import numpy as np
import torch

from lamina_p2p.compute.fanout import merge_results, plan_micro_batch
from lamina_p2p.compute.placement import Placer
from lamina_p2p.compute.sequence import SamplingParams, Sequence


def placed(prompt_len: int, shard_tokens: int, peers=("a", "b"), replicas: int = 1):
    placer = Placer("sequence", 2, shard_tokens, replicas=replicas)
    placer.set_peers({p: 1.0 for p in peers})
    seq = Sequence(1, list(range(3, 3 + prompt_len)), SamplingParams(max_tokens=8))
    seq.shards = placer.place(prompt_len + 8)
    placer.roll(seq.shards, 0, prompt_len)  # the whole prompt in one chunk
    return placer, seq


def test_a_chunk_over_many_shards_is_one_request_per_peer_and_each_row_once_per_storage():
    placer, seq = placed(100, 8)
    assert len(seq.shards) == 13  # ceil(100 / 8): the chunk opened every shard it needs
    mb = plan_micro_batch([seq], [100], 2)
    assert sorted(g.peer for g in mb.groups) == ["a", "b"]
    assert {s.peer for s in seq.shards} == {"a", "b"} and max(
        sum(s.peer == p for s in seq.shards) for p in "ab") > 1  # some peer holds several shards
    for g in mb.groups:
        assert len(set(g.seq_ids.tolist())) == 1  # all of a peer's shards of the sequence: one storage
        assert int(g.n_q.sum()) <= 100  # no query row twice
    assert sum(int(g.num_new_tokens.sum()) for g in mb.groups) == 100
    # Decode after the prompt: one entry per peer.
    seq.cached = 100
    placer.roll(seq.shards, 100, 101)
    mb = plan_micro_batch([seq], [1], 2)
    assert sorted((g.peer, len(g.seq_ids)) for g in mb.groups) == [("a", 1), ("b", 1)]



def test_a_long_prompt_in_small_shards_is_spread_evenly():
    """Each tail goes to the least loaded peer: the first shard reserves its own tokens, not the whole
    sequence (which sent every later shard to the other peer)."""
    placer, seq = placed(1024, 16)
    held = {p: sum(min(s.t1 or 1024, 1024) - s.t0 for s in seq.shards if s.peer == p) for p in "ab"}
    assert held == {"a": 512, "b": 512}
    assert {p: load.placed_tokens for p, load in placer.peers.items()} == {"a": 512, "b": 512}
    placer.forget(seq.shards)
    assert all(load.placed_tokens == 0 for load in placer.peers.values())

def test_replicas_get_their_own_storage_and_the_same_positions():
    _, seq = placed(40, 8, peers=("a", "b", "c"), replicas=2)
    mb = plan_micro_batch([seq], [40], 2)
    primaries = mb.groups[: mb.num_primary]
    replicas = mb.groups[mb.num_primary:]
    assert int(sum(g.num_new_tokens.sum() for g in primaries)) == 40 == int(sum(g.num_new_tokens.sum() for g in replicas))
    assert len({g.peer for g in primaries}) == len(primaries) <= 3  # one request per peer and role


def test_merge_with_repeated_rows_is_the_exact_softmax():
    """Partials of one row from several entries of one request merge like partials of different peers."""
    rng = np.random.default_rng(0)
    scores = rng.standard_normal((3, 12)).astype(np.float32)  # 3 partials, 12 keys each, 1 row
    values = rng.standard_normal((3, 12, 4)).astype(np.float32)
    outs, lses = [], []
    for s, v in zip(scores, values):
        w = np.exp(s - s.max())
        outs.append((w[:, None] * v).sum(0) / w.sum())
        lses.append(s.max() + np.log(w.sum()))

    class G:  # two groups: one with the row twice (two storages on one peer), one with it once
        def __init__(self, rows):
            self.rows, self.h0, self.h1, self.replica = torch.tensor(rows), 0, 1, False

    class MB:
        num_tokens, overlapping, num_primary = 1, True, 2
        groups = [G([0, 0]), G([0])]

    results = [(np.stack(outs[:2])[:, None], np.array(lses[:2], np.float32)[:, None]),
               (outs[2][None, None], np.array([[lses[2]]], np.float32))]
    merged = merge_results(MB(), results, num_heads=1, head_dim=4, group_size=1)
    s_all, v_all = scores.reshape(-1), values.reshape(-1, 4)
    w = np.exp(s_all - s_all.max())
    np.testing.assert_allclose(merged[0, 0].numpy(), (w[:, None] * v_all).sum(0) / w.sum(), rtol=1e-5, atol=1e-6)


def _covered_twice(mb) -> bool:
    """The oracle: count every (row, kv head) each primary group's queries cover, from the plan's own rows."""
    coverage = np.zeros((mb.num_tokens, 8), np.int64)
    for g in mb.groups[: mb.num_primary]:
        rows = np.arange(mb.num_tokens) if g.rows is None else g.rows.numpy()
        np.add.at(coverage, (rows[:, None], np.arange(g.h0, g.h1)[None, :]), 1)
    return bool((coverage > 1).any())


def test_the_plan_says_when_rows_overlap_for_every_placement_and_step():
    """`overlapping` (whether the merge needs the LSE) against the brute-force coverage: request, head and
    sequence placement over 1-3 peers, replicas, prefill chunks and decode steps of several sequences."""
    rng = np.random.default_rng(0)
    seen = set()
    for policy, shard_tokens, peers, replicas in (("request", 512, "ab", 1), ("head", 512, "abc", 1),
                                                   ("sequence", 8, "ab", 1), ("sequence", 16, "abc", 2),
                                                   ("sequence", 5, "a", 1)):
        placer = Placer(policy, 8, shard_tokens, replicas=replicas)
        placer.set_peers({p: 1.0 for p in peers})
        seqs = [Sequence(i, list(range(3, 3 + int(rng.integers(1, 40)))), SamplingParams(max_tokens=16))
                for i in range(3)]
        for seq in seqs:
            seq.shards = placer.place(seq.length + 16)
        for _ in range(6):
            counts = [min(seq.pending, int(rng.integers(1, 24))) for seq in seqs]
            for seq, n in zip(seqs, counts):
                placer.roll(seq.shards, seq.cached, seq.cached + n)
            mb = plan_micro_batch(seqs, counts, 8)
            assert mb.overlapping == _covered_twice(mb), (policy, shard_tokens, counts)
            seen.add(mb.overlapping)
            for seq, n in zip(seqs, counts):
                seq.cached += n
                if seq.cached == seq.length:
                    seq.tokens.append(7)
    assert seen == {True, False}  # both answers were asked for

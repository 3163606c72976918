"""The attention service: shard table, byte budget, request checks, and the CUDA pool (simulator)."""

from __future__ import annotations

import numpy as np
import pytest

from lamina_p2p.attention.service import AttendRequest, AttentionService, KVFull, ShardError

GEOM = dict(num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, storage="float32", max_positions=128)


def request(owner="o", layer=0, seq_ids=(1,), ctx=(0,), n=(3,), append=True, h0=0, h1=2, rng=None, group=2):
    rng = rng or np.random.default_rng(0)
    n = np.array(n, np.int64)
    num_new_tokens = n if append else np.zeros_like(n)
    heads = h1 - h0
    q = rng.standard_normal((int(n.sum()), heads * group, 8)).astype(np.float32)
    k = rng.standard_normal((int(num_new_tokens.sum()), heads, 8)).astype(np.float32)
    v = rng.standard_normal((int(num_new_tokens.sum()), heads, 8)).astype(np.float32)
    return AttendRequest(owner, layer, np.array(seq_ids, np.int64), np.array(ctx, np.int64), n, num_new_tokens, h0, h1, q, k, v)


def test_append_then_decode_and_free_returns_every_byte():
    svc = AttentionService(1 << 20, block_size=4)
    svc.register("o", **GEOM)
    out, lse = svc.attend(request(seq_ids=(1, 2), ctx=(0, 0), n=(5, 2)))
    assert out.shape == (7, 4, 8) and np.isfinite(lse).all()
    for layer in range(2):
        svc.attend(request(layer=layer, seq_ids=(1, 2), ctx=(5, 2), n=(1, 1)))
    stats = svc.stats()
    assert stats["sequences"] == 2 and stats["kv_used_bytes"] > 0
    assert svc.free("o", [1, 2]) == 2
    assert svc.stats()["kv_used_bytes"] == 0


def test_budget_is_never_exceeded():
    block_bytes = 2 * 2 * 4 * 8 * 4  # K and V, 2 layers, 4 tokens, head_dim 8, float32
    svc = AttentionService(block_bytes * 4, block_size=4)
    svc.register("o", **GEOM)
    svc.attend(request(seq_ids=(1,), n=(8,)))  # 2 blocks per head x 2 heads = all 4
    with pytest.raises(KVFull):
        svc.attend(request(seq_ids=(2,), n=(1,)))
    assert svc.budget.used <= svc.budget.total


def test_a_growing_sequence_takes_its_blocks_in_runs_within_the_budget():
    """Past its first blocks a shard grows by GROW_BLOCKS a kv head, each head's one run in memory, unless
    the budget holds only what it needs; KVFull only when it cannot hold even that."""
    from lamina_p2p.attention.kv_pool import GROW_BLOCKS, KVBudget, KVPool, PoolKey

    key = PoolKey(num_layers=2, head_dim=8, storage="float32", block_size=4)
    block = key.block_bytes()
    pool = KVPool(key, KVBudget(block * (2 * GROW_BLOCKS + 6)), max_blocks_per_seq=64, num_kv_heads=2)
    a, b = pool.new_table_row(2), pool.new_table_row(2)
    pool.ensure(a, 4)
    pool.ensure(b, 4)  # the prompts: one block a head each, exactly
    assert pool.budget.used == 4 * block and pool.capacity_tokens[a] == 4
    pool.ensure(a, 5)  # a's decode crosses into its second block
    assert pool.capacity_tokens[a] == 4 * (1 + GROW_BLOCKS) and pool.budget.used == (4 + 2 * GROW_BLOCKS) * block
    runs = pool.table[a, :, 1:1 + GROW_BLOCKS]
    assert (np.diff(runs, axis=1) == 1).all() and (pool.table[a, :, 1 + GROW_BLOCKS:] == -1).all()
    pool.ensure(b, 5)  # two blocks left in the budget: b grows by exactly one a head
    assert pool.capacity_tokens[b] == 8 and pool.budget.used == pool.budget.total
    with pytest.raises(KVFull):
        pool.ensure(b, 9)
    pool.release(a)
    pool.release(b)
    assert pool.budget.used == 0


@pytest.mark.parametrize("bad,match", [
    (dict(h0=1, h1=3), "head range"),
    (dict(layer=5), "layer"),
    (dict(ctx=(4,)), "no shard"),
    (dict(append=False), "no shard"),
])
def test_bad_requests_are_refused_with_a_reason(bad, match):
    svc = AttentionService(1 << 20)
    svc.register("o", **GEOM)
    with pytest.raises(ShardError, match=match):
        svc.attend(request(**bad))


def test_ctx_past_the_cached_tokens_is_refused():
    svc = AttentionService(1 << 20)
    svc.register("o", **GEOM)
    svc.attend(request(n=(3,)))
    with pytest.raises(ShardError, match="cached tokens"):
        svc.attend(request(ctx=(7,), n=(1,)))


@pytest.mark.parametrize("bad,match", [
    (dict(n=(0, 1)), "n_q > 0"),
    (dict(h0=1, h1=2), "holds 2 kv heads here, request has 1"),
    (dict(ctx=(4, 4)), "sequence 1: context_len 4 > 3 cached tokens"),
    (dict(wrong_q=True), "q: expected"),
])
def test_a_decode_step_of_known_shards_is_refused_before_anything_is_written(bad, match):
    """The shard-table work of a step whose entries all name shards held here (attention/shard_rows.py): the same
    checks and errors as a first request's, and a refused step changes no shard's length or blocks."""
    svc = AttentionService(1 << 20, block_size=4)
    svc.register("o", **GEOM)
    svc.attend(request(seq_ids=(1, 2), ctx=(0, 0), n=(3, 4)))
    pool = svc._owners["o"].pool
    lengths, capacity, used = pool.length.copy(), pool.capacity_tokens.copy(), svc.stats()["kv_used_bytes"]
    wrong_q = bad.pop("wrong_q", False)
    req = request(seq_ids=(1, 2), **{"ctx": (3, 4), "n": (2, 1), **bad})
    if wrong_q:
        req.q = req.q[:, :1]
    with pytest.raises(ShardError, match=match):
        svc.attend(req)
    assert (pool.length == lengths).all() and (pool.capacity_tokens == capacity).all()
    assert svc.stats()["kv_used_bytes"] == used
    svc.attend(request(seq_ids=(1, 2), ctx=(3, 4), n=(2, 1)))  # the step itself: grows 1 past its first block
    rows = [svc._owners["o"].table_rows[s] for s in (1, 2)]
    assert pool.length[rows].tolist() == [5, 5] and pool.capacity_tokens[rows[0]] > capacity[rows[0]]


def test_owners_are_isolated_and_dropping_one_frees_only_its_kv():
    svc = AttentionService(1 << 20)
    svc.register("a", **GEOM)
    svc.register("b", **GEOM)
    svc.attend(request(owner="a"))
    svc.attend(request(owner="b"))
    used = svc.stats()["kv_used_bytes"]
    assert svc.drop_owner("a") == 1
    assert svc.stats()["kv_used_bytes"] == used // 2
    with pytest.raises(ShardError, match="not registered"):
        svc.attend(request(owner="a", ctx=(3,), n=(1,)))


def test_head_shards_use_part_of_the_table():
    """A shard holding one of two kv heads, as head placement sends it."""
    svc = AttentionService(1 << 20)
    svc.register("o", **GEOM)
    out, _ = svc.attend(request(h0=1, h1=2, n=(4,)))
    assert out.shape == (4, 2, 8)


def test_cuda_pool_matches_cpu_pool():
    """The attention peer's --device cuda path (numba.cuda; the simulator in CI)."""
    cuda = pytest.importorskip("numba.cuda")
    if not cuda.is_available():
        pytest.skip("no CUDA device or simulator")
    cpu, gpu = AttentionService(1 << 20, block_size=4), AttentionService(1 << 20, block_size=4, device="cuda")
    for svc in (cpu, gpu):
        svc.register("o", **GEOM)
    steps = [dict(seq_ids=(1, 2), ctx=(0, 0), n=(5, 2)), dict(seq_ids=(1, 2), ctx=(5, 2), n=(1, 1)),
             dict(layer=1, seq_ids=(1, 2), ctx=(0, 0), n=(5, 2))]
    for i, step in enumerate(steps):
        a = cpu.attend(request(rng=np.random.default_rng(i), **step))
        b = gpu.attend(request(rng=np.random.default_rng(i), **step))
        np.testing.assert_allclose(a[0], b[0], atol=1e-5)
        np.testing.assert_allclose(a[1], b[1], atol=1e-5)


def test_a_layout_checked_once_a_step_is_checked_again_after_a_free():
    """The shard-table work is reused by the later layers of a step (same layout), never across a free:
    a freed sequence sent again as if still cached is refused, and one re-prefilled gets a fresh shard."""
    svc = AttentionService(1 << 20, block_size=4)
    svc.register("o", **GEOM)
    for layer in range(2):
        svc.attend(request(layer=layer, seq_ids=(1,), n=(5,)))
    for layer in range(2):
        out, lse = svc.attend(request(layer=layer, seq_ids=(1,), ctx=(5,), n=(1,)))
    with pytest.raises(ShardError, match="expected"):  # same layout, wrong q shape: still checked
        bad = request(layer=1, seq_ids=(1,), ctx=(5,), n=(1,))
        bad.q = bad.q[:, :1]
        svc.attend(bad)
    assert svc.free("o", [1]) == 1
    with pytest.raises(ShardError, match="no shard"):
        svc.attend(request(layer=1, seq_ids=(1,), ctx=(5,), n=(1,)))
    fresh = AttentionService(1 << 20, block_size=4)
    fresh.register("o", **GEOM)
    for s in (svc, fresh):
        for layer in range(2):
            s.attend(request(layer=layer, seq_ids=(1,), n=(5,), rng=np.random.default_rng(7)))
    for layer in range(2):
        got = svc.attend(request(layer=layer, seq_ids=(1,), ctx=(5,), n=(1,), rng=np.random.default_rng(layer)))
        want = fresh.attend(request(layer=layer, seq_ids=(1,), ctx=(5,), n=(1,), rng=np.random.default_rng(layer)))
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])

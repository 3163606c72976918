"""The spin pool (model/spin_pool.py): its ops bit-equal to the serial fused kernels.

Each output block is computed wholly by one thread with the serial kernel's code, so the
result must not depend on who computed it: checked with a worker spinning, a worker that
parks after every op (and is woken for the next), two workers, and a worker that never
starts (the caller computes everything), at 1, 3, 16 and 17 rows and shapes that are not
multiples of 16. Then the fused layer through the pool against the same layer on one thread.
"""

from __future__ import annotations

import asyncio
import copy

import numpy as np
import pytest
import torch

from lamina_p2p.model import fused
from lamina_p2p.model import spin_pool as sp
from lamina_p2p.model.bench_dense import random_model
from lamina_p2p.model.gemv import BLOCK, Gemv

from waiting import wait_until

ROWS = (1, 3, 16, 17)
# (hidden, out of the linear ops, intermediate (a multiple of 16: gate/up blocks are interleaved))
SHAPES = [(40, 100, 48), (77, 33, 16), (130, 260, 96)]


def _bf16(t: torch.Tensor) -> np.ndarray:
    return t.to(torch.bfloat16).view(torch.int16).numpy().copy()


def _ops(seed: int, rows: int, hidden: int, n_out: int, inter: int):
    """Random inputs for the four ops and their serial results: [(pool fn, args, out, expected)]."""
    g = torch.Generator().manual_seed(seed)
    x = _bf16(torch.randn(rows, hidden, generator=g))
    norm_w = _bf16(torch.randn(hidden, generator=g))
    lin = Gemv((torch.randn(n_out, hidden, generator=g) / hidden ** 0.5).to(torch.bfloat16),
               torch.randn(n_out, generator=g))
    o = Gemv((torch.randn(hidden, n_out, generator=g) / n_out ** 0.5).to(torch.bfloat16), None)
    gate_up = fused.pack_gate_up(Gemv((torch.randn(2 * inter, hidden, generator=g) / hidden ** 0.5)
                                      .to(torch.bfloat16), None).wb)
    attn = _bf16(torch.randn(rows, n_out, generator=g))
    zero = np.zeros(max(o.wb.shape[0], gate_up.shape[0]) * BLOCK, np.float32)
    cases = []
    for round_out, dtype in ((True, np.int16), (False, np.float32)):  # a bf16 projection; the LM head
        want = np.empty((rows, n_out), dtype)
        fused.norm_linear(x, norm_w, 1e-5, True, lin.wb, lin.bias, want, round_out, False)
        cases.append((sp.pool_norm_linear, (x, norm_w, 1e-5, True, lin.wb, lin.bias), np.empty_like(want),
                      (round_out,), want))
    want = np.empty((rows, hidden), np.int16)
    fused.linear_add(attn, o.wb, x, want, False)
    cases.append((sp.pool_linear_add, (attn, o.wb, zero, x), np.empty_like(want), (), want))
    want = np.empty((rows, inter), np.int16)
    fused.norm_swiglu(x, norm_w, 1e-5, gate_up, want, False)
    cases.append((sp.pool_norm_swiglu, (x, norm_w, 1e-5, gate_up, zero), np.empty_like(want), (), want))
    return cases


def _check(pool: sp.SpinPool, repeats: int = 1) -> None:
    seed = 0
    for hidden, n_out, inter in SHAPES:
        for rows in ROWS:
            seed += 1
            for fn, args, out, tail, want in _ops(seed, rows, hidden, n_out, inter):
                for _ in range(repeats):
                    out[...] = -1
                    pool.run(fn, *args, out, *tail)
                    assert np.array_equal(out, want), (fn.__name__, rows, hidden, n_out, inter)


@pytest.mark.parametrize("workers, spin_s", [(1, sp.SPIN_S), (1, 0.0), (2, sp.SPIN_S)])
def test_pool_ops_are_bit_equal_to_the_serial_kernels(workers, spin_s):
    pool = sp.SpinPool(workers, spin_s=spin_s)
    try:
        _check(pool, repeats=3)
        assert pool.ctl[sp.SEQ] % 2 == 1 and pool.ctl[sp.ACTIVE] == 0  # every op closed, nobody inside
    finally:
        pool.close()
    assert not any(t.is_alive() for t in pool._threads)


def test_a_worker_that_never_starts_leaves_the_caller_to_do_everything():
    pool = sp.SpinPool(1, start=False)
    _check(pool)
    assert pool.ctl[sp.WORKED] == 0
    pool.close()


def test_a_parked_worker_is_woken_and_helps_again():
    pool = sp.SpinPool(1, spin_s=0.0)  # parks as soon as it finds nothing to do
    try:
        # 512 units of 16 x 512 weights (8 MB, ~1 ms an op): long enough for a woken worker to join one even
        # when another process holds the other CPU (with 64 units it sometimes never did within 30 s).
        k, units = 512, 512
        x, w = _bf16(torch.ones(1, k)), Gemv(torch.ones(16 * units, k, dtype=torch.bfloat16), None)
        out = np.empty((1, 16 * units), np.int16)
        args = (x, _bf16(torch.ones(k)), 1e-5, True, w.wb, w.bias, out, True)
        for _ in range(3):
            # (Parking again proves the previous wake reached it: the caller's claim cleared both flags.)
            wait_until(lambda: pool.ctl[sp.NPARKED] == 1, what="the worker to park")
            # The caller finds it parked and claims it for waking. (Not pool.ctl read after pool.run: the
            # woken worker, idle with spin_s=0, may already have parked again by then.)
            wake = sp.pool_norm_linear(pool.ctl, *args)
            assert wake == 1
            pool.wake(wake)
        def burst():  # back-to-back ops: the first wakes the worker, a later one finds it awake
            for _ in range(20):
                pool.run(sp.pool_norm_linear, *args)
            return pool.ctl[sp.WORKED] > 0

        wait_until(burst, timeout_s=120.0, what="the woken worker to compute a unit")
        assert (out == _bf16(torch.full((1, 16 * units), float(k)))).all()
    finally:
        pool.close()


def test_a_prefetch_left_open_runs_on_the_worker_and_the_next_op_closes_it():
    pool = sp.SpinPool(1)
    try:
        g = torch.Generator().manual_seed(9)
        big = Gemv(torch.randn(16 * 40, 96, generator=g).to(torch.bfloat16), None)
        small = Gemv(torch.randn(16 * 3, 96, generator=g).to(torch.bfloat16), None)
        pool.run(sp._open_prefetch, big.wb, 10, small.wb, 99, keep=(big.wb, small.wb))
        assert pool.ctl[sp.SEQ] % 2 == 0  # left open for the worker
        # The worker loads the last 10 blocks of the first hint and all 3 of the second (99 is capped).
        wait_until(lambda: pool.ctl[sp.PREFETCHED] == 13, what="the worker to prefetch the hinted blocks")
        for fn, args, out, tail, want in _ops(3, 2, 40, 100, 48):  # the next op closes it first
            pool.run(fn, *args, out, *tail)
            assert np.array_equal(out, want)
            assert pool.ctl[sp.SEQ] % 2 == 1 and pool.ctl[sp.ACTIVE] == 0
        # A prefetch cut short: the op after it closes it at once and computes as usual.
        pool.run(sp._open_prefetch, big.wb, 40, big.wb, 40, keep=(big.wb,))
        for fn, args, out, tail, want in _ops(4, 17, 130, 260, 96):
            pool.run(fn, *args, out, *tail)
            assert np.array_equal(out, want)
        assert pool.ctl[sp.SEQ] % 2 == 1 and pool.ctl[sp.ACTIVE] == 0
    finally:
        pool.close()


def test_pool_sizes_are_checked():
    with pytest.raises(ValueError, match="0 to 16 workers"):
        sp.SpinPool(17)
    assert sp.shared(1) is None


GEOMETRY = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 40,
            "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 5, "num_key_value_heads": 1,
            "head_dim": 8, "vocab_size": 100, "max_position_embeddings": 256, "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0, "tie_word_embeddings": True, "dtype": "bfloat16"}


@pytest.mark.parametrize("pairs", [False, True])  # gemv_pairs' layout (vdpbf16ps, or emulated)
@torch.inference_mode()
def test_fused_layer_through_the_pool_is_bit_equal_to_one_thread(pairs, monkeypatch):
    monkeypatch.setattr(fused, "USE_PAIRS", pairs)
    base = random_model("bfloat16", seed=5, geometry=GEOMETRY)
    pooled, single = copy.deepcopy(base).prepare("gemv"), copy.deepcopy(base).prepare("gemv")
    single._fused.pool_max_rows, single._fused.min_bytes = 0, 1 << 62  # the serial kernels
    pooled._fused.min_bytes = 0
    g = torch.Generator().manual_seed(6)
    c = base.config
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # the pool serves more than one compute thread
    try:
        for rows in ROWS:
            x = torch.randn(rows, c.hidden_size, generator=g).to(torch.bfloat16)
            positions = torch.randint(0, 200, (rows,), generator=g)
            attn = torch.randn(rows, c.num_heads, c.head_dim, generator=g).to(torch.bfloat16)
            for layer in range(c.num_layers):
                for a, b in zip(pooled.pre(layer, x, positions), single.pre(layer, x, positions)):
                    assert torch.equal(a, b)
                assert torch.equal(pooled.post(layer, x, attn), single.post(layer, x, attn))
            assert torch.equal(pooled.logits(x), single.logits(x))
            # Chained as the engine calls it: a post's output is the next pre's and post's input (the pool path
            # keeps its bits and reuses its intermediates), q/k/v outlive the next layer's calls.
            xp = xs = x
            kept = []
            for layer in range(c.num_layers):
                qkv_p, qkv_s = pooled.pre(layer, xp, positions), single.pre(layer, xs, positions)
                kept.append((qkv_p, [t.clone() for t in qkv_s]))
                xp, xs = pooled.post(layer, xp, attn), single.post(layer, xs, attn)
                assert torch.equal(xp, xs)
            for got, want in kept:
                assert all(torch.equal(a, b) for a, b in zip(got, want))
            assert torch.equal(pooled.logits(xp), single.logits(xs))
        assert not sp.shared(2).lock.locked()  # every call released it
    finally:
        torch.set_num_threads(threads)


def test_the_pool_is_switched_per_model_and_on_for_in_process_attention():
    from lamina_p2p.compute.engine import Engine
    from lamina_p2p.compute.local import LocalTransport
    from lamina_p2p.compute.sequence import SamplingParams

    model = random_model("bfloat16", geometry=GEOMETRY)
    model.dense_pool = False  # before prepare: kept for the fused path made there
    model.prepare("gemv")
    assert model._fused.pool_max_rows == 0
    engine = Engine(model, LocalTransport(1 << 20))  # attention in this process: the pool pays
    try:
        assert engine.dense_pool
        # Another engine on the same model (a cluster's) turned it off: this engine's step turns it back on.
        model.dense_pool = False

        async def one_step():
            seq = engine.new_sequence([1, 2, 3], SamplingParams(max_tokens=1, ignore_eos=True))
            await engine.step([seq])
            await engine.release([seq])

        asyncio.run(one_step())
        assert model.dense_pool and model._fused.pool_max_rows == sp.POOL_MAX_ROWS
    finally:
        engine.close()

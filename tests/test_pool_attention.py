"""Attention on the spin pool (model/pool_attention.py, kernels/lamina_kernels/pooled.py) against the kernel.

Each planned item is computed wholly by one thread with the kernel's item code, so the result
must not depend on who computed it: a spinning worker, a worker that parks after every op, and
no worker at all (the caller computes every item) give the same bits. The pooled plan cut like
the kernel's threaded one gives the threaded kernel's bits; without splits, the inline kernel's.
Every storage (bfloat16 with and without the dot-product QK), GQA groups 1, 3, 4 and 7, head_dim 64, 128, 32 and 40 (the scalar loops), decode,
attend-only and chunked (append) calls. Malformed calls raise the kernel's own errors and post
nothing to the pool nor write to the KV pool. Then the engine with in-process attention.
"""

from __future__ import annotations

import asyncio
import math

import numpy as np
import pytest
import torch

from lamina_kernels import cpu, drivers, pooled, simd, to_storage
from lamina_kernels.reference import append_attend_ref
from lamina_p2p.model import pool_attention as pa
from lamina_p2p.model import spin_pool as sp

from kernel_calls import CPU_PATHS, enter_path
from waiting import wait_until

# (query heads, kv heads, head_dim): GQA groups 1, 3, 4, 7; vector tiles 64/128/any, scalar loops (40).
GEOMETRIES = [(4, 4, 64), (9, 3, 64), (8, 2, 128), (7, 1, 32), (6, 2, 40)]
BS = 16


def _case(geom, storage, contexts, n_new, seed, attend_only=False):
    """A pool holding each sequence's context (scattered blocks) with room for n_new more, and a call
    appending n_new rows (or, attend_only, none) per sequence."""
    hq, hkv, d = geom
    rng = np.random.default_rng(seed)
    n_seq = len(contexts)
    per = -(-(max(contexts) + n_new) // BS)
    n_blocks = n_seq * hkv * per + 2
    pools = [to_storage(rng.standard_normal((2, n_blocks, BS, d), dtype=np.float32), storage) for _ in range(2)]
    table = rng.permutation(n_blocks)[:n_seq * hkv * per].astype(np.int32).reshape(n_seq, hkv, per)
    t = n_seq * n_new
    q = to_storage(rng.standard_normal((t, hq, d), dtype=np.float32), storage)
    t_kv = 0 if attend_only else t
    kv = [to_storage(rng.standard_normal((t_kv, hkv, d), dtype=np.float32), storage) for _ in range(2)]
    q_start = np.arange(0, t + 1, n_new, dtype=np.int32)
    kv_start = np.zeros(n_seq + 1, np.int32) if attend_only else q_start.copy()
    return [q, kv[0], kv[1], pools[0], pools[1], table, np.arange(n_seq, dtype=np.int32)[::-1].copy(), q_start,
            kv_start, np.array(contexts, np.int32), 1, 1.0 / math.sqrt(d), storage]


def _copy(args):
    return [a.copy() if isinstance(a, np.ndarray) else a for a in args]


# (contexts, new tokens per sequence, attend-only): decode at batch 1 long enough to split, a batch
# with an empty context, a chunk (causal inside it), attend-only rows over a cached context.
CALLS = [([300], 1, False), ([0, 37, 260, 5], 1, False), ([90, 3], 6, False), ([200, 64], 2, True)]


def _pooled(pool, args, **kw):
    with pool.lock:
        return pa.attend(pool, *args, **kw)


@pytest.fixture
def storage(request):
    """A kernel_calls.CPU_PATHS name (parametrized indirectly) -> its storage, with the bfloat16
    dot-product flag set for the test: the pooled item code reads it per call, as the driver."""
    name, old = enter_path(request.param)
    yield name
    simd.set_dpbf16(old)


@pytest.fixture(scope="module")
def spinning():
    pool = sp.SpinPool(1, spin_s=3600.0)  # awake throughout
    yield pool
    pool.close()


@pytest.mark.parametrize("storage", CPU_PATHS, indirect=True)
@pytest.mark.parametrize("geom", GEOMETRIES)
def test_pooled_is_bit_equal_with_or_without_a_worker(spinning, geom, storage):
    alone = sp.SpinPool(1, start=False)
    parking = sp.SpinPool(1, spin_s=0.0)  # parks after every op, woken for the next
    try:
        for n, (contexts, n_new, attend_only) in enumerate(CALLS):
            args = _case(geom, storage, contexts, n_new, n, attend_only)
            for split in ((32, 16), (pooled.MIN_SPLIT, pooled.ALIGN), (16, 1)):
                runs = [(pool, _copy(args)) for pool in (alone, spinning, parking)]
                outs = [_pooled(pool, a, min_split=split[0], align=split[1]) for pool, a in runs]
                for (pool, a), (out, lse) in zip(runs[1:], outs[1:]):
                    assert np.array_equal(out, outs[0][0]) and np.array_equal(lse, outs[0][1]), (contexts, split)
                    assert np.array_equal(a[3], runs[0][1][3]) and np.array_equal(a[4], runs[0][1][4])
            ref = _copy(args)
            want, want_lse = append_attend_ref(*ref)
            got, got_lse = _pooled(spinning, _copy(args), min_split=32, align=16)
            assert np.abs(got - want.numpy() if hasattr(want, "numpy") else got - want).max() < 2e-5
            finite = np.isfinite(want_lse)
            assert np.array_equal(finite, np.isfinite(got_lse))
            assert np.abs(np.asarray(got_lse)[finite] - np.asarray(want_lse)[finite]).max() < 2e-5
        assert alone.ctl[sp.WORKED] == 0  # never started: the caller computed every item
        assert alone.ctl[sp.SEQ] % 2 == 1 and spinning.ctl[sp.ACTIVE] == 0
    finally:
        parking.close()
        alone.close()


@pytest.mark.parametrize("storage", CPU_PATHS, indirect=True)
@pytest.mark.parametrize("geom", [GEOMETRIES[1], GEOMETRIES[2], GEOMETRIES[4]])
def test_pooled_is_bit_equal_to_the_kernel_with_the_same_plan(spinning, geom, storage):
    for n, (contexts, n_new, attend_only) in enumerate(CALLS):
        args = _case(geom, storage, contexts, n_new, 10 + n, attend_only)
        # The threaded kernel: plan for 2 threads, items of >= MIN_SPLIT keys cut at whole blocks.
        a = _copy(args)
        out, lse = np.empty(a[0].shape, np.float32), np.empty(a[0].shape[:2], np.float32)
        err, _, inline = drivers.append_attend(*a[:-1], storage == "bfloat16", 2, -1, out, lse)
        assert err == 0 and not inline
        b = _copy(args)
        got, got_lse = _pooled(spinning, b, min_split=drivers.MIN_SPLIT, align=BS)
        assert np.array_equal(got, out) and np.array_equal(got_lse, lse)
        assert np.array_equal(a[3], b[3]) and np.array_equal(a[4], b[4])
        # No split: the inline kernel's bits.
        want, want_lse = cpu.append_attend(*_copy(args))
        got, got_lse = _pooled(spinning, _copy(args), min_split=1 << 40)
        assert np.array_equal(got, want) and np.array_equal(got_lse, want_lse)


def test_a_split_call_is_shared_with_the_worker(spinning):
    args = _case((9, 3, 64), "bfloat16", [1000], 1, 3)
    want = _pooled(spinning, _copy(args), min_split=16, align=16)
    worked = spinning.ctl[sp.WORKED]

    def shared():
        got = _pooled(spinning, _copy(args), min_split=16, align=16)
        assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])
        return spinning.ctl[sp.WORKED] > worked

    # A generous deadline: on a loaded machine the worker may not get a CPU for seconds at a time.
    wait_until(shared, timeout_s=180, what="the worker to compute an item")


@pytest.mark.parametrize("read_ahead", [True, False])
def test_a_prefetch_left_open_is_closed_first_then_goes_on(spinning, read_ahead):
    from lamina_p2p.model.gemv import Gemv

    w = Gemv(torch.randn(16 * 40, 96).to(torch.bfloat16), None)
    args = _case((9, 3, 64), "float16", [3000], 1, 4)
    want = _pooled(spinning, _copy(args), min_split=64)
    spinning.attend_read_ahead = read_ahead
    try:
        for _ in range(3):
            spinning.run(sp._open_prefetch, w.wb, 40, w.wb, 40, keep=(w.wb,))
            assert spinning.ctl[sp.SEQ] % 2 == 0
            got = _pooled(spinning, _copy(args), min_split=64)
            assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])
            # With read_ahead the prefetch is open again (its arrays held) for the next op to close.
            assert spinning.ctl[sp.SEQ] % 2 == (0 if read_ahead else 1)
            assert (spinning._kept is not None) == read_ahead
        got = _pooled(spinning, _copy(args), min_split=64)  # closes it first, reopens it
        assert np.array_equal(got[0], want[0])
        if read_ahead:
            wait_until(lambda: spinning.ctl[sp.A_OP] == sp.OP_PREFETCH and spinning.ctl[sp.PREFETCHED] > 0,
                       what="the worker to read ahead")
    finally:
        spinning.attend_read_ahead = True
        sp._close_prefetch(spinning.ctl)
        spinning._kept = None


def _bad_calls():
    base = _case((9, 3, 64), "bfloat16", [100, 20], 1, 5)
    yield base[:6] + [np.array([0, 7], np.int32)] + base[7:]  # table row outside the table
    t = base[5].copy()
    t[1, 2, 0] = -1
    yield base[:5] + [t] + base[6:]  # a block the call needs is -1
    yield base[:9] + [np.array([100, 2000], np.int32)] + base[10:]  # past the block table
    yield [base[0][:, :8].copy()] + base[1:]  # 8 query heads over 3 kv heads
    yield [base[0].astype(np.float32)] + base[1:]  # q of the wrong dtype
    yield base[:-1] + ["bfloat8"]
    yield base[:10] + [5] + base[11:]  # a layer outside the pool


def test_errors_raise_as_the_kernel_and_post_nothing(spinning):
    for args in _bad_calls():
        with pytest.raises((TypeError, ValueError)) as want:
            cpu.append_attend(*_copy(args))
        a = _copy(args)
        seq, units = spinning.ctl[sp.SEQ], spinning.ctl[sp.A_UNITS]
        with pytest.raises(want.type) as got:
            _pooled(spinning, a)
        assert str(got.value) == str(want.value)
        assert spinning.ctl[sp.SEQ] == seq and spinning.ctl[sp.A_UNITS] == units  # nothing posted
        for x, y in zip(a[3:5], args[3:5]):
            assert np.array_equal(x, y)  # nothing appended


def test_the_engine_runs_in_process_attention_on_its_pool():
    from lamina_p2p.compute.engine import Engine
    from lamina_p2p.compute.local import LocalTransport
    from lamina_p2p.compute.sequence import SamplingParams
    from lamina_p2p.model.bench_dense import random_model

    from test_spin_pool import GEOMETRY

    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # the dense pool (and so this path) needs more than one thread
    try:
        outputs = []
        for max_tokens in (0, 64):
            model = random_model("bfloat16", seed=3, geometry=GEOMETRY).prepare("gemv")
            transport = LocalTransport(1 << 22)
            transport.pool_max_tokens = max_tokens
            engine = Engine(model, transport)

            async def go():
                seqs, _ = await engine.generate([[1, 2, 3, 4, 5], [7, 8]],
                                                SamplingParams(max_tokens=12, ignore_eos=True))
                return [s.output for s in seqs]

            try:
                outputs.append(asyncio.run(go()))
            finally:
                engine.close()
            assert (transport.pooled_calls > 0) == (max_tokens > 0)
        assert outputs[0] == outputs[1]
    finally:
        torch.set_num_threads(threads)

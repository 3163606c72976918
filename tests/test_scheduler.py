"""The scheduler in process: admission by KV, FIFO waiting, preemption with recompute, aborts."""

from __future__ import annotations

import asyncio
import random

import pytest
from helpers import BYTES_PER_TOKEN

from lamina_p2p.compute.engine import Engine
from lamina_p2p.compute.local import LocalTransport
from lamina_p2p.compute.scheduler import Scheduler
from lamina_p2p.compute.sequence import SamplingParams


@pytest.fixture(scope="module")
def model(tiny):
    from lamina_p2p.model.loader import load_model

    return load_model(tiny)


def prompts(n, seed=0):
    rng = random.Random(seed)
    return [[rng.randrange(3, 512) for _ in range(rng.randrange(4, 40))] for _ in range(n)]


def params(i):
    return SamplingParams(max_tokens=8 + (i * 7) % 25, ignore_eos=True)


async def reference(model, ps):
    """Each prompt alone, greedy, with plenty of KV."""
    transport = LocalTransport(64 << 20)
    engine = Engine(model, transport)
    try:
        out = []
        for i, p in enumerate(ps):
            seqs, _ = await engine.generate([p], params(i))
            out.append(seqs[0].output)
        return out
    finally:
        engine.close()
        transport.close()


async def run_all(model, ps, kv_bytes, **kw):
    transport = LocalTransport(kv_bytes)
    engine = Engine(model, transport, **{k: kw.pop(k) for k in ("micro_batches",) if k in kw})
    sched = Scheduler(engine, **kw)
    peak = {"used": 0}
    orig = engine.step

    async def watched_step(seqs):
        out = await orig(seqs)
        # Sample usage at every step boundary (the pool itself also refuses to overrun).
        total, free = transport.kv_capacity()["local"]
        peak["used"] = max(peak["used"], total - free)
        peak["batch"] = max(peak.get("batch", 0), len(seqs))
        return out

    engine.step = watched_step
    stop = asyncio.Event()
    loop_task = asyncio.create_task(sched.run(stop))
    try:
        reqs = [sched.submit(p, params(i)) for i, p in enumerate(ps)]

        async def collect(r):
            toks = []
            async for d in r.stream():
                toks += d.tokens
                if d.finish_reason:
                    return toks, d.finish_reason

        results = await asyncio.wait_for(asyncio.gather(*(collect(r) for r in reqs)), timeout=120)
        assert transport.kv_capacity()["local"][1] == kv_bytes, "all KV is freed at the end"
        return results, reqs, sched, peak
    finally:
        stop.set()
        await loop_task
        engine.close()
        transport.close()


def test_demand_far_above_capacity_queues_and_completes(model):
    ps = prompts(20)
    kv = 3 * 64 * BYTES_PER_TOKEN  # room for ~3 sequences of <= 64 tokens at once
    demand = sum(len(p) + params(i).max_tokens for i, p in enumerate(ps)) * BYTES_PER_TOKEN

    async def main():
        ref = await reference(model, ps)
        results, reqs, sched, peak = await run_all(model, ps, kv, max_batch=64)
        return ref, results, sched, peak

    ref, results, sched, peak = asyncio.run(main())
    assert demand > 3 * kv
    assert [r[1] for r in results] == ["length"] * len(ps)
    assert [r[0] for r in results] == ref
    assert peak["used"] <= kv
    assert sched.preempted_total == 0  # full reservation never runs out in decode
    assert 1 < peak["batch"] < len(ps)  # batched, but not everything at once


def test_optimistic_admission_preempts_and_recomputes_identically(model):
    ps = prompts(12, seed=1)
    kv = 4 * 64 * BYTES_PER_TOKEN

    async def main():
        ref = await reference(model, ps)
        results, reqs, sched, peak = await run_all(model, ps, kv, reserve="prompt", micro_batches=2)
        return ref, results, sched, peak

    ref, results, sched, peak = asyncio.run(main())
    assert sched.preempted_total > 0
    assert [r[0] for r in results] == ref
    assert peak["used"] <= kv


def test_abort_frees_kv_at_the_next_step(model):
    async def main():
        transport = LocalTransport(2 << 20)  # 1024 tokens
        engine = Engine(model, transport)
        sched = Scheduler(engine, max_batch=4)
        stop = asyncio.Event()
        task = asyncio.create_task(sched.run(stop))
        try:
            long = sched.submit(prompts(1)[0], SamplingParams(max_tokens=900, ignore_eos=True))
            short = sched.submit([5, 6, 7], SamplingParams(max_tokens=4, ignore_eos=True))
            first = await asyncio.wait_for(long.queue.get(), 30)
            assert first.tokens
            total, free = transport.kv_capacity()["local"]
            assert free < total
            sched.abort(long)
            finals = [d async for d in long.stream()]
            assert finals[-1].finish_reason == "abort"
            async for d in short.stream():
                pass
            assert d.finish_reason == "length"
            assert transport.kv_capacity()["local"][1] == total
            with pytest.raises(ValueError, match="more than the attention peers hold"):
                sched.submit([1] * 100, SamplingParams(max_tokens=3900))
        finally:
            stop.set()
            await task
            engine.close()
            transport.close()

    asyncio.run(main())

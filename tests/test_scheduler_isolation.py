"""A step that fails because of one request ends that request only; the others finish unchanged."""

from __future__ import annotations

import asyncio

import pytest

from lamina_p2p.compute.engine import Engine
from lamina_p2p.compute.local import LocalTransport
from lamina_p2p.compute.scheduler import Scheduler
from lamina_p2p.compute.sequence import SamplingParams

POISON = 13  # a prompt holding this token fails every step it is in (a request-specific fault)


@pytest.fixture(scope="module")
def model(tiny):
    from lamina_p2p.model.loader import load_model

    return load_model(tiny)


class FaultyEngine(Engine):
    """A real engine whose step raises when the poisoned request is in the batch (fault injection)."""

    async def step(self, running):
        if any(POISON in s.prompt for s in running):
            raise ValueError("this request cannot be computed")
        return await super().step(running)


def test_a_request_that_fails_every_step_fails_alone(model):
    prompts = [[0, 40, 41, 42], [0, POISON, 7], [0, 99, 98], [0, 300, 301, 302, 303]]

    async def run(engine_cls, ps):
        transport = LocalTransport(16 << 20)
        engine = engine_cls(model, transport)
        sched = Scheduler(engine)
        stop = asyncio.Event()
        task = asyncio.create_task(sched.run(stop))
        try:
            reqs = [sched.submit(p, SamplingParams(max_tokens=6, ignore_eos=True)) for p in ps]

            async def collect(r):
                toks = []
                async for d in r.stream():
                    toks += d.tokens
                    if d.finish_reason:
                        return toks, d.finish_reason, d.error

            out = await asyncio.wait_for(asyncio.gather(*(collect(r) for r in reqs)), 120)
            assert transport.kv_capacity()["local"][1] == 16 << 20, "all KV freed"
            return out
        finally:
            stop.set()
            await task
            engine.close()
            transport.close()

    alone = asyncio.run(run(Engine, [p for p in prompts if POISON not in p]))
    together = asyncio.run(run(FaultyEngine, prompts))
    assert together[1][1] == "error" and "cannot be computed" in together[1][2] and together[1][0] == []
    assert [r for i, r in enumerate(together) if i != 1] == alone
    assert all(reason == "length" for _, reason, _ in alone)


def test_a_sampling_failure_ends_its_request_without_a_token(model):
    """A row whose sampling fails (here a logit_bias past the vocabulary, which the HTTP layer would
    have refused) ends alone with "error" and no placeholder token; its batch-mates are unchanged."""
    good = [[0, 40, 41, 42], [0, 99, 98]]

    async def run(with_broken: bool):
        transport = LocalTransport(16 << 20)
        engine = Engine(model, transport)
        sched = Scheduler(engine)
        stop = asyncio.Event()
        task = asyncio.create_task(sched.run(stop))
        try:
            reqs = [sched.submit(p, SamplingParams(max_tokens=6, ignore_eos=True)) for p in good]
            if with_broken:
                reqs.insert(1, sched.submit([0, 7, 8], SamplingParams(max_tokens=6, ignore_eos=True, temperature=0.5,
                                                                      logit_bias={10**6: 1.0})))

            async def collect(r):
                toks = []
                async for d in r.stream():
                    toks += d.tokens
                    if d.finish_reason:
                        return toks, d.finish_reason, d.error

            out = await asyncio.wait_for(asyncio.gather(*(collect(r) for r in reqs)), 120)
            assert transport.kv_capacity()["local"][1] == 16 << 20, "all KV freed"
            return out
        finally:
            stop.set()
            await task
            engine.close()
            transport.close()

    alone = asyncio.run(run(False))
    together = asyncio.run(run(True))
    assert together[1][0] == [] and together[1][1] == "error" and "sampling failed" in together[1][2]
    assert [together[0], together[2]] == alone

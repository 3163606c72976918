"""The engine reports every piece of a step to its observers (tracer, metrics); the scheduler, not the
engine, decides when a sequence is finished."""

from __future__ import annotations

import asyncio

import pytest

from lamina_p2p.compute.engine import Engine
from lamina_p2p.compute.local import LocalTransport
from lamina_p2p.compute.scheduler import Scheduler
from lamina_p2p.compute.sequence import SamplingParams
from lamina_p2p.serve.metrics import ServeMetrics
from lamina_p2p.trace import EMBED, LAST, LAYER, SAMPLE, Tracer

PROMPTS = [[1, 5, 9, 200, 31], [1, 77, 12], [1, 300, 301, 302, 303, 304, 305]]
STEPS = 4


@pytest.fixture(scope="module")
def model(tiny_preset):
    from lamina_p2p.model.loader import load_model

    return load_model(tiny_preset())


class Recorder:
    def __init__(self):
        self.dense, self.attention = [], []

    def on_dense(self, piece, layer, micro_batch, tokens, t0, t1):
        self.dense.append((piece, layer, micro_batch, tokens, t0, t1))

    def on_attention(self, layer, micro_batch, tokens, requests, sent_at, wait_from, t1):
        self.attention.append((layer, micro_batch, tokens, requests, sent_at, wait_from, t1))


def generate(model, observers):
    async def main():
        transport = LocalTransport(16 << 20)
        engine = Engine(model, transport, micro_batches=2)
        metrics = ServeMetrics(transport)
        engine.observers.extend(o if o != "metrics" else metrics for o in observers)
        try:
            seqs, _ = await engine.generate(PROMPTS, SamplingParams(max_tokens=STEPS, ignore_eos=True))
            return [s.output for s in seqs], engine, metrics.render().decode()
        finally:
            engine.close()
            transport.close()

    return asyncio.run(main())


def test_tracer_metrics_and_any_observer_see_every_piece_of_every_step(model):
    plain, bare, _ = generate(model, [])
    assert bare.tracer is None
    rec, tracer = Recorder(), Tracer()
    outputs, engine, page = generate(model, [rec, tracer, "metrics"])
    assert outputs == plain  # watching changes nothing
    assert engine.tracer is tracer
    layers, steps = model.config.num_layers, engine.steps
    assert steps == STEPS
    # Per step: embed, L-1 layer pieces and the last post per micro-batch (2), one LM head + sampling.
    pieces = [d[0] for d in rec.dense]
    assert pieces.count(SAMPLE) == steps
    assert pieces.count(EMBED) == pieces.count(LAST) == 2 * steps
    assert pieces.count(LAYER) == 2 * steps * (layers - 1)
    assert sorted({d[1] for d in rec.dense if d[0] == LAYER}) == list(range(layers - 1))
    assert all(t0 <= t1 for *_, t0, t1 in rec.dense)
    assert len(rec.attention) == 2 * steps * layers
    assert all(sent <= wait <= t1 for *_, sent, wait, t1 in rec.attention)
    assert sum(a[2] for a in rec.attention if a[0] == 0) == sum(len(p) for p in PROMPTS) + (steps - 1) * 3
    # The same pieces as trace spans and as Prometheus histograms.
    names = {e["name"] for e in tracer.chrome()["traceEvents"] if e["ph"] == "X"}
    assert {"dense embed+L0", "dense L0/L1", f"dense L{layers - 1}", "attention L0", "logits+sample"} <= names
    waits = [e for e in tracer.chrome()["traceEvents"] if e["name"].startswith("attention L")]
    assert waits and all(0 <= e["args"]["exposed_ms"] <= e["dur"] / 1e3 + 1e-3 for e in waits)
    for label in ("embed", "0", "last", "sample"):
        assert f'lamina_layer_dense_seconds_count{{layer="{label}"}} {2 * steps if label in ("embed", "0", "last") else steps}.0' in page
    assert f'lamina_layer_attention_wait_seconds_count{{layer="{layers - 1}"}} {2 * steps}.0' in page
    assert "lamina_wire_sent_bytes_total 0.0" in page  # in process: nothing on a wire


def test_the_engine_runs_steps_and_the_scheduler_finishes_sequences(model):
    async def main():
        transport = LocalTransport(16 << 20)
        engine = Engine(model, transport)
        try:
            total, free0 = transport.kv_capacity()["local"]
            seq = engine.new_sequence(PROMPTS[0], SamplingParams(max_tokens=1, ignore_eos=True))
            sampled = await engine.step([seq])
            assert sampled == [seq] and len(seq.output) == 1
            assert seq.finish_reason is None  # max_tokens reached, but that is not the engine's call
            assert transport.kv_capacity()["local"][1] < free0  # and its KV is still held
            await engine.release([seq])
            seq = engine.new_sequence(PROMPTS[0], SamplingParams(max_tokens=1, ignore_eos=True))
            finished = await Scheduler(engine).step([seq])
            assert finished == [seq] and seq.finish_reason == "length"
            assert transport.kv_capacity()["local"][1] == free0  # freed by the scheduler's step
        finally:
            engine.close()
            transport.close()

    asyncio.run(main())

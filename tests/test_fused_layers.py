"""A single-process step's layers in one compiled call (model/fused_step.py) against the per-layer path.

The fused layers run the per-layer path's compiled functions on the same values in the same order, so
every logit must be the same bits, whether the pool's worker spins, parks after every op (the call then
returns after each layer to wake it and resumes), or the weights are in either GEMV layout; observers
get the same pieces; an attention call the kernel refuses raises what the per-layer path raises, having
written nothing; steps the path does not cover (several micro-batches, one compute thread) take the
per-layer path.
"""

from __future__ import annotations

import asyncio

import pytest
import torch

from lamina_p2p.attention.kv_pool import KVFull
from lamina_p2p.compute.engine import Engine
from lamina_p2p.compute.local import LocalTransport
from lamina_p2p.compute.sequence import SamplingParams
from lamina_p2p.model import fused, fused_step
from lamina_p2p.model import spin_pool as sp
from lamina_p2p.model.bench_dense import random_model
from lamina_p2p.trace import EMBED, LAST, LAYER, SAMPLE

from test_observers import Recorder

# GQA group 2, head_dim 16 (the vector tiles), an intermediate size the fused layer takes, three layers.
GEOMETRY = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
            "intermediate_size": 96, "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2,
            "head_dim": 16, "vocab_size": 128, "max_position_embeddings": 512, "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0, "tie_word_embeddings": True, "dtype": "bfloat16"}
# A prefill step of 45 tokens (within the spin pool's rows), then decode steps of 3.
PROMPTS = [list(range(1, 30)), [5, 9, 3], list(range(40, 53))]


@pytest.fixture
def two_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # the spin pool (and so this path) serves more than one compute thread
    yield
    torch.set_num_threads(threads)


def _generate(model, fused_layers: bool, *, micro_batches: int = 1, observer=None, max_tokens: int = 8):
    """(outputs, every sampled logits row in step order, FusedLayers.run calls) of one generation."""
    transport = LocalTransport(1 << 22)
    engine = Engine(model, transport, micro_batches=micro_batches)
    engine.fused_layers = fused_layers
    logits = []
    engine.logits_sink = lambda seqs, rows: logits.append(rows.clone())
    if observer is not None:
        engine.observers.append(observer)
    runs = []
    run = fused_step.FusedLayers.run

    def counted(self, *a, **k):
        runs.append(1)
        return run(self, *a, **k)

    fused_step.FusedLayers.run = counted
    try:
        seqs, _ = asyncio.run(engine.generate(PROMPTS, SamplingParams(max_tokens=max_tokens, ignore_eos=True)))
        return [s.output for s in seqs], logits, len(runs)
    finally:
        fused_step.FusedLayers.run = run
        engine.close()


@pytest.mark.parametrize("pairs", [False, True])  # gemv_pairs' layout (vdpbf16ps, or emulated)
@pytest.mark.parametrize("worker", ["spinning", "parking"])
def test_the_fused_layers_give_the_per_layer_paths_bits(two_threads, pairs, worker, monkeypatch):
    monkeypatch.setattr(fused, "USE_PAIRS", pairs)
    model = random_model("bfloat16", seed=11, geometry=GEOMETRY).prepare("gemv")
    want, want_logits, none = _generate(model, False)
    assert none == 0
    pool = sp.shared(2)
    calls = []
    if worker == "parking":  # the worker parks after every op: each call returns after a layer to wake it
        monkeypatch.setattr(pool, "spin_cycles", 0)
        layers = fused_step.decode_layers

        def counted(*a):
            calls.append(a[1])  # the layer it starts from
            return layers(*a)

        monkeypatch.setattr(fused_step, "decode_layers", counted)
    got, got_logits, runs = _generate(model, True)
    assert runs == len(want_logits)  # every step took the path
    assert got == want
    assert len(got_logits) == len(want_logits)
    for a, b in zip(got_logits, want_logits):
        assert torch.equal(a, b)
    if worker == "parking":
        assert any(start > 0 for start in calls)  # resumed after waking the worker
    assert not pool.lock.locked()


def test_observers_get_the_per_layer_paths_pieces(two_threads):
    model = random_model("bfloat16", seed=12, geometry=GEOMETRY).prepare("gemv")
    per_layer, fused_rec = Recorder(), Recorder()
    _, _, none = _generate(model, False, observer=per_layer)
    _, _, runs = _generate(model, True, observer=fused_rec)
    assert none == 0 and runs > 0
    assert [d[:4] for d in fused_rec.dense] == [d[:4] for d in per_layer.dense]
    assert [a[:4] for a in fused_rec.attention] == [a[:4] for a in per_layer.attention]
    pieces = [d[0] for d in fused_rec.dense]
    layers = model.config.num_layers
    assert pieces.count(LAYER) == pieces.count(EMBED) * (layers - 1) and pieces.count(LAST) == pieces.count(SAMPLE)
    assert all(t0 <= t1 for *_, t0, t1 in fused_rec.dense)
    assert all(sent <= wait <= t1 for *_, sent, wait, t1 in fused_rec.attention)
    # In step order: embed, then each layer's attention before its post.
    step = [d for d in fused_rec.dense if d[0] != SAMPLE][: layers]
    assert [d[5] for d in step] == sorted(d[5] for d in step)


def test_a_kv_pool_too_small_raises_as_the_per_layer_path_and_writes_nothing(two_threads):
    model = random_model("bfloat16", seed=13, geometry=GEOMETRY).prepare("gemv")
    errors = []
    for fused_layers in (False, True):
        transport = LocalTransport(64 << 10)  # far less than the prompts' KV
        engine = Engine(model, transport)
        engine.fused_layers = fused_layers
        seqs = [engine.new_sequence(p, SamplingParams(max_tokens=4)) for p in PROMPTS]
        try:
            with pytest.raises(KVFull) as err:
                asyncio.run(engine.step(seqs))
            errors.append(str(err.value))
            assert all(s.cached == 0 and not s.output for s in seqs)  # the step is undone
            assert engine.steps == 0
        finally:
            engine.close()
    assert errors[0] == errors[1]
    assert not sp.shared(2).lock.locked()


def test_steps_it_does_not_cover_take_the_per_layer_path(two_threads):
    model = random_model("bfloat16", seed=14, geometry=GEOMETRY).prepare("gemv")
    want, _, _ = _generate(model, False)
    got, _, runs = _generate(model, True, micro_batches=2)  # two micro-batches: the pipeline
    assert runs == 0 and got == want
    torch.set_num_threads(1)  # one compute thread: no spin pool
    got, _, runs = _generate(model, True)
    assert runs == 0 and got == want

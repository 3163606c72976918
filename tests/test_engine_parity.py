"""The in-process engine (real kernels, real KV pool) against transformers, for every path.

Every placement and micro-batch count: logits of the prompt's last position and
of 32 decode steps within 1e-4 of transformers (float32), identical greedy tokens.
"""

from __future__ import annotations

import pytest
import torch
from hf_models import ARCHITECTURES, bf16_greedy_tokens_agree, build_hf_model, load_hf_model

from lamina_p2p.compute.engine import Engine
from lamina_p2p.compute.local import LocalTransport
from lamina_p2p.compute.sequence import SamplingParams
from lamina_p2p.model.loader import load_model
from lamina_p2p.runtime import run_async

PROMPTS = [[1, 5, 9, 22, 7], [3, 4, 8, 10, 11, 12, 13, 14, 2, 2, 2, 40, 41], [17, 200]]
STEPS = 32


def run_engine(path, placement="request", micro_batches=1, shard_tokens=None, prompts=PROMPTS, steps=STEPS,
               max_step_tokens=4096, dtype=None):
    model = load_model(path, dtype=dtype)
    logits_by_seq: dict[int, list[torch.Tensor]] = {}

    def sink(seqs, logits):
        for s, row in zip(seqs, logits):
            logits_by_seq.setdefault(s.seq_id, []).append(row.float().clone())

    async def go():
        transport = LocalTransport(64 << 20)
        engine = Engine(model, transport, placement=placement, micro_batches=micro_batches,
                        shard_tokens=shard_tokens, max_step_tokens=max_step_tokens)
        engine.logits_sink = sink
        try:
            seqs, _ = await engine.generate(prompts, SamplingParams(max_tokens=steps, ignore_eos=True))
            stats = transport.service.stats()
        finally:
            engine.close()
            transport.close()
        return seqs, stats

    seqs, stats = run_async(go())
    return [s.output for s in seqs], [torch.stack(logits_by_seq[s.seq_id]) for s in seqs], stats


_reference: dict = {}


def hf_reference(arch, prompts=PROMPTS, steps=STEPS):
    """Greedy tokens and per-step logits from transformers (teacher-forced over its own tokens)."""
    key = (arch, tuple(map(tuple, prompts)), steps)
    if key not in _reference:
        hf = load_hf_model(build_hf_model(arch))
        tokens, logits = [], []
        with torch.no_grad():
            for p in prompts:
                out = hf.generate(torch.tensor([p]), max_new_tokens=steps, min_new_tokens=steps, do_sample=False)
                full = hf(out[:, :-1]).logits[0]
                tokens.append(out[0, len(p):].tolist())
                logits.append(full[len(p) - 1:].float())
        _reference[key] = (tokens, logits)
    return _reference[key]


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_single_process_matches_transformers(arch):
    ref_tokens, ref_logits = hf_reference(arch)
    tokens, logits, stats = run_engine(build_hf_model(arch))
    assert tokens == ref_tokens
    for mine, ref in zip(logits, ref_logits):
        assert (mine - ref).abs().max().item() < 1e-4
    assert stats["sequences"] == 0 and stats["kv_used_bytes"] == 0  # everything freed at the end


@pytest.mark.parametrize("placement,micro_batches,shard_tokens", [
    ("request", 2, None), ("request", 3, None), ("head", 2, None),
    ("sequence", 1, 8), ("sequence", 2, 5), ("sequence", 3, 16),
])
def test_every_path_matches_transformers(placement, micro_batches, shard_tokens):
    arch = "llama"
    ref_tokens, ref_logits = hf_reference(arch)
    tokens, logits, _ = run_engine(build_hf_model(arch), placement, micro_batches, shard_tokens)
    assert tokens == ref_tokens
    for mine, ref in zip(logits, ref_logits):
        assert (mine - ref).abs().max().item() < 1e-4


def test_chunked_prefill_matches_transformers():
    """A step budget smaller than the prompts forces prefill in several chunks."""
    ref_tokens, ref_logits = hf_reference("qwen3")
    tokens, logits, _ = run_engine(build_hf_model("qwen3"), max_step_tokens=4)
    assert tokens == ref_tokens
    for mine, ref in zip(logits, ref_logits):
        assert (mine - ref).abs().max().item() < 1e-4


def test_bfloat16_greedy_matches_transformers_on_tiny_preset(tiny_preset):
    """bf16 through the real kernels: transformers' greedy choice at every step, up to a near-tie
    (hf_models.bf16_greedy_tokens_agree: transformers' CPU attention also rounds the softmax weights to bf16
    before P@V; our kernel keeps them in float32)."""
    path = tiny_preset(seed=0, dtype="bfloat16")
    hf = load_hf_model(path, dtype=torch.bfloat16)
    prompts = [[0, 40, 41, 42, 300, 17], [0, 99], [0, 7, 8, 9, 10, 11, 12, 13, 14]]
    for placement, mb, shard in (("request", 1, None), ("sequence", 2, 8)):
        tokens, _, _ = run_engine(path, placement, mb, shard, prompts=prompts)
        assert all(len(t) == STEPS for t in tokens)
        assert bf16_greedy_tokens_agree(hf, prompts, tokens) >= 0.9, (placement, mb)


def test_small_in_process_steps_run_on_the_event_loop_thread():
    """Decode steps of at most INLINE_STEP_TOKENS tokens run on the loop's thread (no hop), larger ones (this
    prefill) on the dense thread; the tokens match transformers either way (the tests above run both)."""
    import threading

    from lamina_p2p.compute.engine import INLINE_STEP_TOKENS

    prompt = list(range(3, 3 + INLINE_STEP_TOKENS + 4))
    model = load_model(build_hf_model("llama"))
    threads: list[tuple[int, int]] = []  # (tokens of the step's first piece, thread id)

    class Watch:
        def on_dense(self, piece, layer, micro_batch, tokens, t0, t1):
            if piece == "embed":
                threads.append((tokens, threading.get_ident()))

        def on_attention(self, *args):
            pass

    async def go():
        transport = LocalTransport(64 << 20)
        engine = Engine(model, transport)
        engine.observers.append(Watch())
        try:
            seqs, _ = await engine.generate([prompt], SamplingParams(max_tokens=4, ignore_eos=True))
        finally:
            engine.close()
            transport.close()
        return threading.get_ident(), seqs[0].output

    loop_thread, output = run_async(go())
    assert len(output) == 4
    assert threads[0] == (len(prompt), threads[0][1]) and threads[0][1] != loop_thread  # prefill: the dense thread
    assert threads[1:] == [(1, loop_thread)] * 3  # decode: inline

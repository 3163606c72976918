"""A process's compute thread count holds on the dense thread, whatever Numba runs there.

Numba's OpenMP layer sets OpenMP's thread count to Numba's own at each parallel region, on the
thread that runs it, and torch reads its count from OpenMP: a compute process set to one thread
(a cluster's compute peer pinned to one CPU) read two after the first Numba region, and its torch
and Numba work split over two threads on one CPU (issue 11).
"""

from __future__ import annotations

import asyncio

import numba
import numpy as np
import pytest
import torch

from lamina_p2p import runtime
from lamina_p2p.model.bench_dense import random_model

GEOMETRY = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
            "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "head_dim": 16, "vocab_size": 100, "max_position_embeddings": 256, "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0, "tie_word_embeddings": True, "dtype": "bfloat16"}


@numba.njit(parallel=True, cache=True)
def _parallel_sum(a):
    total = 0.0
    for i in numba.prange(a.shape[0]):
        total += a[i]
    return total


@pytest.fixture
def one_compute_thread():
    before = (runtime._compute_threads, torch.get_num_threads())
    runtime.set_threads(1)
    try:
        yield
    finally:
        runtime._compute_threads = before[0]
        torch.set_num_threads(before[1])


@pytest.mark.skipif(numba.config.NUMBA_NUM_THREADS < 2, reason="needs Numba's default of two threads or more")
def test_the_dense_thread_keeps_the_process_count_after_numba_regions(one_compute_thread):
    from lamina_p2p.compute.engine import INLINE_STEP_TOKENS, Engine
    from lamina_p2p.compute.local import LocalTransport
    from lamina_p2p.compute.sequence import SamplingParams

    assert runtime.compute_threads() == 1
    engine = Engine(random_model("bfloat16", geometry=GEOMETRY), LocalTransport(1 << 20))
    try:
        async def two_steps():
            # The prefill (more than INLINE_STEP_TOKENS tokens) runs on the dense thread, the decode step
            # on this (the event loop's) thread: both threads take the process's count.
            prompt = list(range(1, 2 + INLINE_STEP_TOKENS))
            seq = engine.new_sequence(prompt, SamplingParams(max_tokens=2, ignore_eos=True))
            await engine.step([seq])
            await engine.step([seq])
            await engine.release([seq])

        asyncio.run(two_steps())

        def counts_after_a_numba_region():
            _parallel_sum(np.ones(1024))
            return torch.get_num_threads(), numba.get_num_threads()

        assert engine.dense.submit(counts_after_a_numba_region).result(timeout=60) == (1, 1)
        assert counts_after_a_numba_region() == (1, 1)
    finally:
        engine.close()


def test_compute_threads_is_what_set_threads_was_given(one_compute_thread):
    _parallel_sum(np.ones(1024))  # on this thread: torch may read Numba's count now
    assert runtime.compute_threads() == 1
    runtime.set_threads(numba_threads=1)  # Numba's alone: the compute count stays
    assert runtime.compute_threads() == 1
